"""Writes of the scheduler's assignments: placement, the life of one attempt (claim, heartbeat,
finish, fail and retry, hand-off) and canary records. Recovery from dead workers and lost Redis
data is in gpuscheduler/recovery.py.

An assignment is one attempt at one chunk of a request's images. Every change of its state is a
conditional UPDATE whose row count says who won, so workers, monitors and reconcilers on any
number of hosts may run this code at once: an attempt is claimed once, committed at most once,
and retried by exactly one reconciler.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q

from gpuscheduler import queues
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.models import (
    Assignment,
    AssignmentKind,
    AssignmentState,
    Device,
    Health,
)
from gpuscheduler.policies import Chunk, DeviceView, get_policy, plan_chunks, plan_pinned
from gpuscheduler.selectors import (
    DeviceRead,
    device_backlogs,
    device_reads,
    live_worker,
    placement_sequence,
    views_with,
)
from gpuscheduler.services import placement_turn

log = logging.getLogger(__name__)

# A retry avoids the device its previous attempt failed on for this long; after that (or when no
# other device could take it) that device may try again.
AVOID_SECONDS = 60.0
AVOID_UNHEALTHY_SECONDS = 15.0
# rq's SIGALRM gets the first chance to end a job that runs past its timeout; the reconciler
# abandons it only this much later (a hang in native code, which SIGALRM cannot interrupt).
DEADLINE_GRACE = timedelta(seconds=5)


class NoDeviceAvailable(Exception):
    """No device may take work now; the message says which and why."""


# --- placement ------------------------------------------------------------------------------------

# What select_for_update(no_key=True) says, with one array parameter: the same statement for any
# number of devices, and no queryset to compile during the turn (gpuscheduler.models.Device).
LOCK_DEVICES = "SELECT id FROM gpuscheduler_device WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE"


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

    chunks = placement_locked(device_reads(model=model, steps=steps), plan)
    pinned = pinned_device is not None
    created = Assignment.objects.bulk_create(
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
    )
    for assignment, chunk in zip(created, chunks, strict=True):
        log.info(
            "request %s images %s (attempt %d) -> %s [%s]",
            request_id,
            assignment.images_label,
            attempt,
            assignment.queue_name,
            chunk.reason,
        )
    return created


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


def placement_locked(reads: list[DeviceRead], plan: Callable[[list[DeviceView]], list[Chunk]]) -> list[Chunk]:
    """Plan on the devices as `reads` has them (read before the turn) and on their backlogs as
    they are once this transaction has its placement turn; lock the rows of the devices chosen.

    Placements take turns (services.placement_turn), each holding its turn until its transaction
    commits and reading the backlogs once it has it, so it sees the work of every placement
    before it (READ COMMITTED reads what committed before each statement): exact, as when each
    placement locked every device row. The devices, their readings and curves are read before
    the turn (no placement changes them); in it, one aggregate, the plan, the rows of the
    devices chosen and the insert.

    Why turns, not only the rows of the devices chosen: submitters that read the same backlogs
    choose the same device, so with row locks alone all but one waited for it, found its backlog
    changed and planned again, over and over (8 submitter processes on bench/bench_placement.py's
    data, PostgreSQL, 2 cores: 43 placements/s and p99 600 ms that way, 96/s and 154 ms in turns).

    THE LOCK ORDER, for every transaction that writes device rows: the persona (a press) or the
    ending attempt's own row (fail, recovery) first, then the placement turn, which every
    transaction takes that places work or locks several device rows (the monitor's tick), then
    those device rows in pk order, in one statement, then new or queued attempts. Nothing may
    lock or UPDATE a device row before that: recovery once cleared the dead worker's device row
    first and then waited for the rows a press held while it waited for that one (a PostgreSQL
    deadlock). Other device writes are one-row autocommit UPDATEs, which never wait holding a
    row; so a transaction that places twice may lock a row below one it holds. NO KEY: the
    foreign-key checks of snapshot, image and canary rows (FOR KEY SHARE) need not wait for
    placement, nor placement for them. SQLite takes no lock: its IMMEDIATE transactions
    serialize writers (config/env.py).
    """
    placement_turn()
    chunks = plan(views_with(reads, device_backlogs()))
    _lock_devices(sorted({c.device_id for c in chunks}))
    return chunks


def _lock_devices(ids: list[int]) -> None:
    """Lock these device rows, in pk order, in one statement (FOR NO KEY UPDATE); nothing on SQLite,
    whose IMMEDIATE transactions serialize writers."""
    connection = transaction.get_connection()
    if ids and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(LOCK_DEVICES, [ids])


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


# --- the life of one attempt ------------------------------------------------------------------------


def assignment_claim(
    *, assignment_id: int, device: Device, worker_name: str, host: str, timeout: float
) -> Assignment | None:
    """Take a queued attempt for this worker; None if it was already taken, cancelled or replaced,
    or if it is a retry of an attempt that failed on this device and another device can take it."""
    # How old the attempt is, judged by the database's clock (queued_at is the database's too).
    row = (
        Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED)
        .annotate(avoiding=_queued_within(AVOID_SECONDS), recent=_queued_within(AVOID_UNHEALTHY_SECONDS))
        .values("avoid_device_id", "avoiding", "recent")
    )
    first = row.first()
    if first is None:
        return None
    if first["avoid_device_id"] == device.pk and first["avoiding"]:
        if assignment_move_away(assignment_id=assignment_id, device=device):
            return None
        # Another device with a live worker that cannot take work this instant (busy, in
        # probation, or just out of service) is worth a wait: leave the job; the reconciler puts
        # it back on its queue within seconds, and it moves as soon as that device can take it.
        # For a device that is out of service the wait is short: it may stay so for hours.
        others = Device.objects.exclude(pk=device.pk).filter(live_worker())
        soon = others if first["recent"] else others.filter(health__in=[Health.HEALTHY, Health.PROBATION])
        if soon.exists():
            log.info("assignment %s failed on %s before: leaving it for another device", assignment_id, device.label)
            return None
    claimed = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED).update(
        **claim_fields(device=device, worker_name=worker_name, host=host, timeout=timeout)
    )
    if not claimed:
        return None
    return Assignment.objects.select_related("planned_device", "device").get(pk=assignment_id)


def claim_fields(*, device: Device, worker_name: str, host: str, timeout: float) -> dict[str, object]:
    """What a claim writes on a queued attempt (here, and for the partners of a batched call)."""
    return {
        "state": AssignmentState.RUNNING,
        "device": device,
        "worker_name": worker_name,
        "host": host,
        "started_at": DbNow(),
        "heartbeat_at": DbNow(),
        "deadline_at": DbNow() + timedelta(seconds=timeout),
    }


def _queued_within(seconds: float) -> ExpressionWrapper:
    return ExpressionWrapper(Q(queued_at__gt=DbNow() - timedelta(seconds=seconds)), output_field=BooleanField())


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

        reads = device_reads()
        chosen = placement_locked(reads, plan)
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


def assignment_heartbeat(*, assignment_id: int) -> bool:
    """Extend this attempt's lease; False means it was abandoned and its work will be dropped."""
    return bool(Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(heartbeat_at=DbNow()))


def assignment_succeed(
    *, assignment_id: int, calls: int, peak_memory: int | None, note: str = "", pipeline_call_id: int | None = None
) -> bool:
    """Close a running attempt as succeeded; False if it lost its lease (its images must go).
    `pipeline_call_id`: the timed call that made its images (shared by attempts batched together)."""
    assert transaction.get_connection().in_atomic_block, "commit images and the attempt together"
    return bool(
        Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
            state=AssignmentState.SUCCEEDED,
            finished_at=DbNow(),
            calls=calls,
            peak_memory=peak_memory,
            error=note[:10000],
            pipeline_call_id=pipeline_call_id,
        )
    )


def assignment_fail(*, assignment_id: int, error: str, retryable: bool = True) -> Assignment | None:
    """Close a running attempt as failed; place a retry if attempts remain. Returns the retry."""
    with transaction.atomic():
        old = Assignment.objects.select_related("request").filter(pk=assignment_id).first()
        if old is None:
            return None
        can_retry = retryable and old.kind == AssignmentKind.SAMPLES and old.attempt < samples_config()["MAX_ATTEMPTS"]
        ended = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
            state=AssignmentState.RETRIED if can_retry else AssignmentState.FAILED,
            finished_at=DbNow(),
            error=error[:10000],
        )
        if not ended:
            return None
        retry = assignment_retry(old, reason=error) if can_retry else None
    assignment_ended(old, discard_files=False)
    return retry


def assignment_state(*, assignment_id: int) -> str | None:
    """The attempt's state as the database has it now (None: no such attempt)."""
    return Assignment.objects.filter(pk=assignment_id).values_list("state", flat=True).first()


def assignment_requeue(*, assignment_id: int, error: str) -> bool:
    """Put a running attempt back to waiting after an infrastructure fault (the media store
    failed), with the real error on it. It keeps its attempt number: a full disk is no reason to
    use up the request's attempts. The reconciler enqueues it again once its job has ended."""
    requeued = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
        state=AssignmentState.QUEUED,
        error=f"waiting: {error}"[:10000],
        device=None,
        worker_name="",
        host="",
        started_at=None,
        heartbeat_at=None,
        deadline_at=None,
        enqueued_at=DbNow(),
    )
    if requeued:
        Device.objects.filter(current_assignment_id=assignment_id).update(current_assignment=None)
    return bool(requeued)


def assignment_retry(old: Assignment, *, reason: str) -> Assignment | None:
    """Place the next attempt of `old`'s chunk (the same images, in one chunk), away from the
    device it failed on if possible. None, and `old` marked failed, when there is no retry."""
    assert old.request_id is not None, "only sample attempts are retried"
    from personas.models import ACTIVE_REQUEST_STATES, SampleRequest

    if not SampleRequest.objects.filter(pk=old.request_id, state__in=ACTIVE_REQUEST_STATES).exists():
        # Cancelled (or already finished) while this attempt ran: nothing more to make.
        Assignment.objects.filter(pk=old.pk).update(
            state=AssignmentState.FAILED, error=f"{reason[:9000]}\nnot retried: the request is no longer active"
        )
        return None
    pinned = old.planned_device if old.pinned else None
    try:
        with transaction.atomic():
            (retry,) = assignments_place(
                request_id=old.request_id,
                count=old.image_count,
                first_index=old.first_index,
                attempt=old.attempt + 1,
                pinned_device=pinned,
                avoid_device_id=old.device_id,
                whole=True,
                require_worker=False,
            )
    except IntegrityError:
        # The chunk already has a live attempt (the unique constraint): nothing to add.
        log.error("retry of %s: the chunk already has a live attempt", old.job_id)
        return None
    except NoDeviceAvailable as exc:
        # Nowhere to go now: keep the chunk on the device it was planned for; its queue is
        # read by every worker, so whichever device recovers first takes it.
        log.warning("retry of %s: %s", old.job_id, exc)
        with transaction.atomic():
            retry = Assignment.objects.create(
                kind=old.kind,
                request_id=old.request_id,
                first_index=old.first_index,
                image_count=old.image_count,
                attempt=old.attempt + 1,
                job_id=f"samples-{uuid.uuid4().hex}",
                queue_name=old.queue_name,
                planned_device_id=old.planned_device_id,
                pinned=old.pinned,
                avoid_device_id=None if old.pinned else old.device_id,
                policy=old.policy,
                reason=f"retry on its planned device: {exc}"[:500],
            )
    log.warning(
        "job %s: attempt %d ended (%s); retry %s placed on %s",
        old.job_id,
        old.attempt,
        reason.splitlines()[0] if reason else "",
        retry.job_id,
        retry.queue_name,
    )
    enqueue_on_commit([retry])
    return retry


def assignment_ended(old: Assignment, *, discard_files: bool) -> None:
    """Tell the personas app an attempt ended: its request's state, and files it may have left."""
    if old.request_id is None:
        return
    from personas.services import sample_attempt_files_remove, sample_request_refresh

    if discard_files:
        sample_attempt_files_remove(assignment=old)
    sample_request_refresh(request_id=old.request_id)


# --- canaries ----------------------------------------------------------------------------------------


def canary_start(*, device: Device, worker_name: str, host: str, timeout: float) -> Assignment:
    """Record the one-image job a device in probation must pass to take work again."""
    now = db_now()
    return Assignment.objects.create(
        kind=AssignmentKind.CANARY,
        image_count=1,
        job_id=f"canary-{uuid.uuid4().hex}",
        queue_name="(in-process)",
        planned_device=device,
        device=device,
        policy="probation",
        reason=device.health_reason[:500],
        worker_name=worker_name,
        host=host,
        state=AssignmentState.RUNNING,
        started_at=now,
        heartbeat_at=now,
        deadline_at=now + timedelta(seconds=timeout),
    )


def canary_finish(*, assignment_id: int, passed: bool, error: str = "") -> bool:
    """Close a canary record; False if the reconciler had already given it up."""
    return bool(
        Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
            state=AssignmentState.SUCCEEDED if passed else AssignmentState.FAILED,
            finished_at=DbNow(),
            calls=1,
            error=error[-5000:],
        )
    )
