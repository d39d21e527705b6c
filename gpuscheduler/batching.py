"""Cross-request batching: a worker about to run a chunk claims other queued chunks it may run with
the same model and steps, and makes them all in one pipeline call.

Why: a diffusion call costs about the same for 1 image as for 6 on an H100 (1.23 s for 1, 1.26 s
for 4, 1.48 s for 8, 2.85 s for 16). A burst of 4-image requests from different personas ran one
call per request (3.2 images/s); calls of 8 give 5.4 images/s.

What may join a call: QUEUED sample attempts matching the caller's filter (the same model and
steps), planned on this device (its own queue, pinned ones included) first, then unpinned ones
planned on other devices where this worker would make the whole call before their owner made
them (policies.steal_pays), oldest first, and only while a chunk brings the call nearer the
device's best call size by its learned curve (costs.best_call_size), never past SAMPLES_MAX_BATCH.
A retry that failed on this device is left alone. They are claimed with the conditional UPDATE of a popped job
(assignments.assignment_claim), one statement for all of them (attempts_claim), so an attempt is
claimed once whoever else pops it; their rq jobs are then taken off their queues (a worker that
pops one anyway finds it claimed and skips it).
Every attempt keeps its own lease, commit and recovery: exactly once is unchanged.

SAMPLES_BATCH_WAIT_MS (default 0: only work already queued) bounds how long a worker waits for
more work to fill its call, like Triton's dynamic batcher's max_queue_delay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError
from django.db.models import Q
from rq.job import Job

from gpuscheduler import assignments, costs, placement_reads, queues
from gpuscheduler.clock import DbNow
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device
from gpuscheduler.policies import DeviceView, steal_pays

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext

log = logging.getLogger(__name__)

# How often a worker waiting to fill its call (SAMPLES_BATCH_WAIT_MS) looks for new work.
POLL_SECONDS = 0.02
# How many queued candidates one look reads (oldest first): more than a call can hold.
CANDIDATES = 64
# How many more looks a call takes at once when other workers won some of the attempts it chose.
CONTESTED_LOOKS = 3


def call_size(*, device: Device, model: str, steps: int, overhead: float = 0.0) -> int:
    """The call size this device fills towards for this model and step count: the best by its learned
    curve, with `overhead` seconds (the worker's own cost of a call) added to each call.

    The curve times the pipeline call alone. Around it the worker claims, stores and commits, about
    40 ms a call on a small machine: nothing beside a diffusion call of a second, but for a model of
    a few milliseconds (the zero-second simulated one) a curve without it finds no gain in batching
    and the calls of one image each cost 40 ms."""
    curve = costs.curves_for([device.pk], model=model, steps=steps)[device.pk]
    if overhead > 0:
        curve = replace(curve, fixed=curve.fixed + overhead)
    return costs.best_call_size(curve)


def joins(size: int, chunk: int, *, best: int, limit: int) -> bool:
    """Whether a chunk of `chunk` images joins a call of `size`: when the call stays within `limit`
    and comes nearer the best size. Chunks are not split, so a call may end a little past the best
    size: with a best size of 7, two 4-image chunks make a call of 8 (5.4 images/s on the H100)
    rather than two calls of 4 (3.2 images/s)."""
    total = size + chunk
    return chunk > 0 and total <= limit and abs(total - best) < abs(size - best)


def call_fill(
    *,
    first: Assignment,
    context: WorkerContext,
    model: str,
    steps: int,
    match: dict[str, Any],
    timeout: float,
    wait: float = 0.0,
) -> list[Assignment]:
    """Claim the queued attempts that share `first`'s call on this worker's device; returns `first`
    and them, in the order their images go into the call.

    `match` filters Assignment rows to those the caller can make in the same call (the same model
    and steps); `wait` is how many seconds to wait for more to arrive while the call is not full.
    Each attempt claimed is added to the context at once, so the heartbeat renews its lease.
    """
    config = samples_config()
    limit = int(config["MAX_BATCH"])
    best = call_size(device=context.device, model=model, steps=steps, overhead=context.call_overhead)
    taken = [first]
    size = first.image_count
    deadline = time.monotonic() + max(0.0, wait)
    views: dict[int, DeviceView] | None = None
    looked = False  # views are read once, at the first chunk planned on another device
    contested = 0
    while size < best:
        rows = _candidates(device=context.device, match=match, size=size, best=best, limit=limit, taken=taken)
        chosen, planned = [], size
        for row in rows:
            if not joins(planned, row["image_count"], best=best, limit=limit):
                continue
            if row["planned_device"] != context.device.pk:
                if not looked:
                    views, looked = _steal_views(context.device, model=model, steps=steps), True
                if not _may_join(views, context.device.pk, row["planned_device"], planned + row["image_count"]):
                    continue
            chosen.append(row["pk"])
            planned += row["image_count"]
        claimed = attempts_claim(
            assignment_ids=chosen,
            device=context.device,
            worker_name=context.name,
            host=context.host,
            timeout=timeout,
        )
        for attempt in claimed:
            context.add_running(attempt)
            size += attempt.image_count
        _jobs_remove(claimed)
        taken.extend(claimed)
        if size >= best:
            break
        if len(claimed) < len(chosen) and contested < CONTESTED_LOOKS:
            contested += 1
            continue  # another worker took some a moment ago: others may fit in their place
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(POLL_SECONDS, left))
    if len(taken) > 1:
        log.info(
            "%s: one call of %d images (best %d) for attempts %s",
            context.device.label,
            size,
            best,
            ", ".join(str(a.pk) for a in taken),
        )
    return taken


def attempt_claim(
    *, assignment_id: int, device: Device, worker_name: str, host: str, timeout: float
) -> Assignment | None:
    """Claim the attempt whose job this worker popped; None if it was already taken, cancelled or
    replaced, or is a retry left for another device.

    One UPDATE and one read (attempts_claim) instead of assignments.assignment_claim's three queries:
    a popped job is most often a first attempt. A retry that failed on this device is left to
    assignment_claim, which decides whether it waits for another device.
    """
    claimed = attempts_claim(
        assignment_ids=[assignment_id], device=device, worker_name=worker_name, host=host, timeout=timeout
    )
    if claimed:
        return claimed[0]
    return assignments.assignment_claim(
        assignment_id=assignment_id, device=device, worker_name=worker_name, host=host, timeout=timeout
    )


def attempts_claim(
    *, assignment_ids: Sequence[int], device: Device, worker_name: str, host: str, timeout: float
) -> list[Assignment]:
    """Claim queued attempts for this worker in one statement, the conditional UPDATE of
    assignments.assignment_claim for many rows at once (a retry that failed on this device is left
    alone); returns those it won, in the order asked.

    When it wins fewer than asked, the rows it won are told by their new state and this worker's
    name: pass only attempts read as QUEUED a moment ago (call_fill's candidates), as the name is
    unique to this process and the process claims in one thread.
    """
    ids = list(dict.fromkeys(assignment_ids))
    if not ids:
        return []
    won = (
        Assignment.objects.filter(pk__in=ids, state=AssignmentState.QUEUED)
        .exclude(avoid_device=device)
        .update(**assignments.claim_fields(device=device, worker_name=worker_name, host=host, timeout=timeout))
    )
    if not won:
        return []
    rows = Assignment.objects.filter(pk__in=ids)
    if won < len(ids):
        rows = rows.filter(state=AssignmentState.RUNNING, worker_name=worker_name)
    found = rows.in_bulk()
    return [found[pk] for pk in ids if pk in found]


def _candidates(
    *, device: Device, match: dict[str, Any], size: int, best: int, limit: int, taken: list[Assignment]
) -> list[dict[str, Any]]:
    """Queued attempts that could join a call of `size`: this device's own first, then the
    unpinned ones of other devices, each oldest first."""
    largest = min(limit - size, 2 * (best - size) - 1)  # the largest chunk that `joins`
    if largest < 1:
        return []
    queued = (
        Assignment.objects.filter(kind=AssignmentKind.SAMPLES, state=AssignmentState.QUEUED, **match)
        .filter(Q(planned_device=device) | Q(pinned=False), image_count__lte=largest)
        # A retry of an attempt that failed here (out of memory at one image, a timeout) goes elsewhere.
        .exclude(avoid_device=device)
        .exclude(pk__in=[a.pk for a in taken])
        .order_by("queued_at", "id")
        .values("pk", "image_count", "planned_device")[:CANDIDATES]
    )
    rows = [dict(row) for row in queued]
    return sorted(rows, key=lambda row: row["planned_device"] != device.pk)  # stable: oldest first in each


def _steal_views(device: Device, *, model: str, steps: int) -> dict[int, DeviceView] | None:
    """Every device as placement sees it for the call's model, to judge whether work planned on
    another may join this call (GPU_STEAL): None under "always" (any may), empty without the
    database (none may)."""
    if gpu_config()["STEAL"] == "always":
        return None
    try:
        return {view.id: view for view in placement_reads.device_views(readings=False, model=model, steps=steps)}
    except DatabaseError:
        log.exception("could not tell which devices' work may join this call; taking only this device's")
        return {}


def _may_join(views: dict[int, DeviceView] | None, thief_id: int, owner_id: int, call: int) -> bool:
    """Whether a chunk planned on `owner_id` may join this device's call, which would then hold
    `call` images: where the thief makes the whole call before the owner would make the chunk
    (policies.steal_pays). Judged by the chunk alone, a slow device filled a call of several
    stolen chunks that ended long after the owner would have made them."""
    if views is None:
        return True
    thief, owner = views.get(thief_id), views.get(owner_id)
    return thief is not None and owner is not None and steal_pays(thief, owner, call)


def _jobs_remove(claimed: Sequence[Assignment]) -> None:
    """Take the claimed attempts' jobs off their queues, so they cost nothing later. Best effort: a
    job left there is popped, found claimed and skipped, as a job delivered twice."""
    if not claimed:
        return
    try:
        connection = queues.redis_connection()
        with connection.pipeline() as pipe:
            for attempt in claimed:
                pipe.lrem(queues.queue_key(attempt.queue_name), 0, attempt.job_id)
            removed = pipe.execute()
        # Only a job this worker took off its queue is deleted: one that another worker has just
        # popped is left to it (its claim fails and it skips it).
        keys = [Job.key_for(a.job_id) for a, count in zip(claimed, removed, strict=True) if count]
        if keys:
            connection.delete(*keys)
    except queues.REDIS_ERRORS as exc:
        log.info("could not take batched jobs off their queues (%s): they will be skipped when popped", exc)


def attempts_heartbeat(*, assignment_ids: Sequence[int]) -> dict[int, str | None]:
    """Extend the leases of a call's attempts in one statement; returns those that are no longer
    running, with their state (None: no such attempt), whose work must be dropped."""
    ids = list(dict.fromkeys(assignment_ids))
    renewed = Assignment.objects.filter(pk__in=ids, state=AssignmentState.RUNNING).update(heartbeat_at=DbNow())
    if renewed == len(ids):
        return {}
    states = dict(Assignment.objects.filter(pk__in=ids).values_list("pk", "state"))
    return {pk: states.get(pk) for pk in ids if states.get(pk) != AssignmentState.RUNNING}
