"""Placement: split a request's images into pipeline calls and put each on a device, in a fixed
number of queries whatever the number of devices and snapshots, exact under concurrency
(placement_locked says how); and the hand-off of a retry away from the device it failed on.

The life of an attempt once placed (claim, heartbeat, finish, retry) is in
gpuscheduler/assignments.py.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import NOT_PROVIDED, Field

from gpuscheduler import queues, workloads
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device
from gpuscheduler.placement_reads import (
    DeviceRead,
    device_backlogs_for,
    device_reads,
    placement_sequence,
    recent_device_reads,
    views_with,
)
from gpuscheduler.planning import plan_chunks, plan_pinned
from gpuscheduler.policies import Chunk, DeviceView, get_policy
from gpuscheduler.services import placement_turn_statement

log = logging.getLogger(__name__)


class NoDeviceAvailable(Exception):
    """No device may take work now; the message says which and why."""


def _unavailable_message(views: list[DeviceView]) -> str:
    if not views:
        return "No device is registered yet: start `python manage.py gpuworkers` (or `gpumonitor`) first."
    devices = Device.objects.in_bulk([v.id for v in views])  # only on the way to an error
    reasons = "; ".join(
        f"{v.label} is {v.blocked or f'{devices[v.id].health} ({devices[v.id].health_reason})'}"
        for v in views
        if v.id in devices
    )
    return f"No healthy device can take work now: {reasons}."


def assignments_place(
    *,
    request_id: int,
    count: int,
    first_index: int = 0,
    attempt: int = 1,
    pinned_device: Device | None = None,
    avoid_device_id: int | None = None,
    whole: bool = False,
    require_worker: bool = True,
    model: str | None = None,
    steps: int | None = None,
) -> list[Assignment]:
    """Split `count` images into chunks, place each on a device and store the assignments.

    `whole` keeps the images in one chunk (a retry re-runs exactly the chunk that failed).
    A pinned device must have a live worker unless `require_worker` is off: only that device's
    worker reads its pinned queue. `model` and `steps` choose the cost curves (the default ones
    when not given). Runs inside the caller's transaction; the caller enqueues after commit.
    A fixed number of queries whatever the number of devices and snapshots (placement_locked).
    """
    assert transaction.get_connection().in_atomic_block, "assignments_place must run in a transaction"
    max_batch = count if whole else int(samples_config()["MAX_BATCH"])
    policy_name = "explicit" if pinned_device is not None else gpu_config()["POLICY"]
    policy = None if pinned_device is not None else get_policy(policy_name)

    def plan(views: list[DeviceView]) -> list[Chunk]:
        if pinned_device is not None:
            return _plan_pinned(views, pinned_device, count=count, max_batch=max_batch, require_worker=require_worker)
        assert policy is not None
        ranked = policy(views, placement_sequence() if policy_name == "round_robin" else 0)
        if avoid_device_id is not None and len(ranked) > 1:
            ranked = [r for r in ranked if r.device.id != avoid_device_id]
        if not ranked:
            raise NoDeviceAvailable(_unavailable_message(views))
        if whole:
            return [Chunk(ranked[0].device.id, 0, count, ranked[0].reason)]
        return plan_chunks(count, ranked, max_batch=max_batch, by_finish=policy_name == "balanced")

    if model is None:
        model, default_steps = workloads.default_key_and_steps()
        steps = steps or default_steps
    # A retry, or work pinned to a device, reads the devices anew; a press may reuse a recent read.
    fresh = pinned_device is not None or avoid_device_id is not None or whole
    reads = device_reads(model=model, steps=steps) if fresh else recent_device_reads(model=model, steps=steps)
    chunks = placement_locked(reads, plan, model=model)
    pinned = pinned_device is not None
    created = _insert(
        [
            Assignment(
                kind=AssignmentKind.SAMPLES,
                request_id=request_id,
                first_index=first_index + chunk.first_index,
                image_count=chunk.size,
                attempt=attempt,
                job_id=f"samples-{uuid.uuid4().hex}",
                queue_name=queues.device_queue_name(chunk.device_id, pinned=pinned),
                planned_device_id=chunk.device_id,
                pinned=pinned,
                avoid_device_id=None if pinned else avoid_device_id,
                policy=policy_name,
                reason=chunk.reason[:500],
            )
            for chunk in chunks
        ]
    )
    if log.isEnabledFor(logging.INFO):
        for assignment, chunk in zip(created, chunks, strict=True):
            log.info(
                "request %s, %s (attempt %d) -> %s [%s]",
                request_id,
                assignment.images_label,
                attempt,
                assignment.queue_name,
                chunk.reason,
            )
    return created


@functools.cache
def _inserted_fields() -> list[Field[Any, Any]]:
    """The columns an INSERT of a new attempt writes: all but its id and queued_at, which the
    database fills (its clock: gpuscheduler/clock.py)."""
    return [f for f in Assignment._meta.concrete_fields if not f.primary_key and f.db_default is NOT_PROVIDED]


# INSERT ... RETURNING id, by vendor and number of rows: built once per process.
_INSERTS: dict[tuple[str, int], str] = {}


def _insert(assignments: list[Assignment]) -> list[Assignment]:
    """Store these new attempts in one INSERT and return them as saved rows (their queued_at,
    the database's, is read on first use).

    What bulk_create does, less its compiling of the statement on every call: a third of a
    millisecond of each placement's turn (bench/bench_placement.py).
    """
    connection = transaction.get_connection()
    fields = _inserted_fields()
    key = (connection.vendor, len(assignments))
    if key not in _INSERTS:
        quote = connection.ops.quote_name
        row = f"({', '.join(['%s'] * len(fields))})"
        _INSERTS[key] = (  # names from the model, quoted; the values are parameters
            f"INSERT INTO {quote(Assignment._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608
            f"VALUES {', '.join([row] * len(assignments))} RETURNING {quote(Assignment._meta.pk.column)}"
        )
    values = [[getattr(a, f.attname) for f in fields] for a in assignments]
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERTS[key],
            [f.get_db_prep_save(v, connection) for row in values for f, v in zip(fields, row, strict=True)],
        )
        ids = [pk for (pk,) in cursor.fetchall()]
    names = [Assignment._meta.pk.attname, *(f.attname for f in fields)]
    return [Assignment.from_db(connection.alias, names, [pk, *row]) for pk, row in zip(ids, values, strict=True)]


def _plan_pinned(
    views: list[DeviceView], device: Device, *, count: int, max_batch: int, require_worker: bool
) -> list[Chunk]:
    view = next((v for v in views if v.id == device.pk), None)
    if view is None and Device.objects.filter(pk=device.pk).exists():
        raise NoDeviceAvailable(
            f"{device.label} is retired (nothing was heard of it for a long time), so it takes no work: "
            "let the policy choose a device; it comes back by itself once its monitor or worker runs again."
        )
    if view is None:
        raise NoDeviceAvailable(f"Device {device} is not registered.")
    if require_worker and view.blocked:
        raise NoDeviceAvailable(
            f"{device.label} is {view.blocked}, so it takes no work now: let the policy choose a device, "
            "or pin it again once this one is back."
        )
    if require_worker and not view.worker_alive:
        raise NoDeviceAvailable(
            f"{device.label} has no running worker, so nothing would take work pinned to it: "
            f"start `python manage.py gpuworkers` on {device.host}, or let the policy choose."
        )
    state = "" if view.healthy else f" ({device.health}: the images wait for it to recover)"
    return plan_pinned(count, view, max_batch=max_batch, reason=f"chosen explicitly: {view.describe()}{state}")


def placement_locked(
    reads: list[DeviceRead], plan: Callable[[list[DeviceView]], list[Chunk]], *, model: str | None = None
) -> list[Chunk]:
    """Plan on the devices as `reads` has them (read before the turn) and on their backlogs as
    they are once this transaction has its placement turn.

    Placements take turns (services.placement_turn), each holding its turn until its transaction
    commits and reading the backlogs once it has it, so it sees the work of every placement
    before it (READ COMMITTED reads what committed before each statement): exact, as when each
    placement locked every device row. The devices, their readings and curves are read before
    the turn (no placement changes them); in it, one aggregate, the plan and the insert.

    Why turns, not row locks on the devices chosen: submitters that read the same backlogs
    choose the same device, so with row locks alone all but one waited for it, found its backlog
    changed and planned again, over and over (8 submitter processes on bench/bench_placement.py's
    data, PostgreSQL, 2 cores: 43 placements/s and p99 600 ms that way, 96/s and 154 ms in turns).
    Placement locks no device row since: the turn alone makes it exact, nothing a placement
    decides is read from a row it would lock (the readings are read before the turn), and the
    lock cost a round trip of every turn (0.2-0.3 ms) and made heartbeats wait for placements.

    THE LOCK ORDER, for every transaction that writes device rows: the persona (a press) or the
    ending attempt's own row (fail, recovery) first, then the placement turn, which every
    transaction takes that places work or locks several device rows (the monitor's tick), then
    those device rows in pk order, in one statement, then new or queued attempts. Nothing may
    lock or UPDATE a device row before that: recovery once cleared the dead worker's device row
    first and then waited for the rows a press held while it waited for that one (a PostgreSQL
    deadlock). Other device writes are one-row autocommit UPDATEs, which never wait holding a
    row. A placement's new attempts take FOR KEY SHARE on their device rows at commit (Django's
    foreign keys are checked then), which waits for no NO KEY UPDATE (the monitor's tick,
    heartbeats). SQLite takes no lock: its IMMEDIATE transactions serialize writers
    (config/env.py).
    """
    # The turn and the aggregate in one round trip (services.placement_turn_statement says why
    # the aggregate still sees every placement before this one).
    backlogs = device_backlogs_for(model, after=placement_turn_statement())
    return plan(views_with(reads, *backlogs, model=model))


def enqueue_on_commit(assignments: list[Assignment], on_done: Callable[[int], None] | None = None) -> None:
    """Once the transaction commits, enqueue these attempts in image order (Assignment's default
    ordering is newest first, which would queue the last images first); `on_done` gets how many
    reached Redis."""
    ids = [a.pk for a in assignments]

    def enqueue() -> None:
        done = queues.enqueue_assignments(list(Assignment.objects.filter(pk__in=ids).order_by("first_index", "pk")))
        if on_done is not None:
            on_done(done)

    transaction.on_commit(enqueue)


def assignment_move_away(*, assignment_id: int, device: Device) -> bool:
    """Hand a retry that failed on `device` to the best other device that can run it now.

    Any worker may steal any queued job, so placing a retry elsewhere is not enough: the worker
    of the device it failed on (out of memory at one image, a timeout) hands it on when it pops it.
    """
    with transaction.atomic():
        policy_name = gpu_config()["POLICY"]
        policy = get_policy(policy_name)

        def plan(views: list[DeviceView]) -> list[Chunk]:
            others = [v for v in views if v.id != device.pk and v.healthy and v.worker_alive]
            ranked = policy(others, placement_sequence() if policy_name == "round_robin" else 0) if others else []
            return [Chunk(ranked[0].device.id, 0, 1, ranked[0].reason)] if ranked else []

        # The views for its own request's model: where it is warm, or failed to load.
        of = Assignment.objects.filter(pk=assignment_id).values_list("request__model", "request__steps").first()
        model, steps = of if of is not None and of[0] else (None, None)
        if model is None:
            model, steps = workloads.default_key_and_steps()
        reads = device_reads(model=model, steps=steps)
        chosen = placement_locked(reads, plan, model=model)
        if not chosen:
            return False
        target = chosen[0]
        moved = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED).update(
            planned_device_id=target.device_id,
            queue_name=queues.device_queue_name(target.device_id),
            reason=f"moved away from {device.label}, where it failed: {target.reason}"[:500],
        )
        if not moved:
            return False
        label = next(read["label"] for read in reads if read["id"] == target.device_id)
        log.info("assignment %s moved from %s to %s", assignment_id, device.label, label)
        enqueue_on_commit(list(Assignment.objects.filter(pk=assignment_id)))
    return True
