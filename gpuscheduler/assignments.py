"""Writes of the scheduler's assignments: the life of one attempt (claim, heartbeat, finish,
fail and retry) and canary records. Placement (and the hand-off of a retry to another device)
is in gpuscheduler/placement.py; recovery from dead workers and lost Redis data in
gpuscheduler/recovery.py.

An assignment is one attempt at one chunk of a request's images. Every change of its state is a
conditional UPDATE whose row count says who won, so workers, monitors and reconcilers on any
number of hosts may run this code at once: an attempt is claimed once, committed at most once,
and retried by exactly one reconciler.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q

from gpuscheduler import workloads
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device, Health
from gpuscheduler.placement import (
    NoDeviceAvailable as NoDeviceAvailable,  # callers place and handle work through this module
)
from gpuscheduler.placement import (
    assignment_move_away,
    assignments_place,
    enqueue_on_commit,
)
from gpuscheduler.selectors import live_worker

log = logging.getLogger(__name__)

# A retry avoids the device its previous attempt failed on for this long; after that (or when no
# other device could take it) that device may try again.
AVOID_SECONDS = 60.0
AVOID_UNHEALTHY_SECONDS = 15.0
# rq's SIGALRM gets the first chance to end a job that runs past its timeout; the reconciler
# abandons it only this much later (a hang in native code, which SIGALRM cannot interrupt).
DEADLINE_GRACE = timedelta(seconds=5)


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
    if not workloads.sample_work().request_active(old.request_id):
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
    """Tell the app that owns the request an attempt ended: its request's state, and files it may
    have left (workloads.SampleWork)."""
    if old.request_id is None:
        return
    workloads.sample_work().attempt_ended(old, discard_files)


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
