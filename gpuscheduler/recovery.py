"""Recovery: attempts whose worker died or hung, and jobs Redis lost, re-run exactly once.

Every idle worker and every gpumonitor offer to reconcile; a Redis turn lets one of them, cluster
wide, do it per RECOVERY_SECONDS (and all of them while Redis is down: a turn is an economy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q

from gpuscheduler import queues, workloads
from gpuscheduler.assignments import DEADLINE_GRACE, assignment_ended, assignment_retry
from gpuscheduler.clock import clock_text, db_now
from gpuscheduler.conf import lease, samples_config
from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    abandoned: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    repaired_requests: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.abandoned or self.requeued or self.repaired_requests)


# Every idle worker and gpumonitor offer to reconcile this often; one of them, cluster-wide, does.
RECOVERY_SECONDS = 2.0


def assignments_recover_in_turn() -> RecoveryReport | None:
    """Reconcile unless another process (gpumonitor, or a worker on any host) did so within
    RECOVERY_SECONDS; None when it was not this caller's turn. Recovery then keeps working when
    the monitor is down, without N workers each scanning every queue every 2 s."""
    if not queues.take_turn("recover", RECOVERY_SECONDS):
        return None
    return assignments_recover()


def assignments_recover(*, now: datetime | None = None, requeue_grace: float = 5.0) -> RecoveryReport:
    """Find attempts whose worker died or hung, and jobs Redis lost; re-run them exactly once.

    - A RUNNING attempt whose heartbeat is older than the lease (the worker died, or hangs
      holding the GIL) or that ran past its deadline is ABANDONED and its chunk placed again.
      If the old attempt is still alive somewhere, its commit finds the row ABANDONED and drops
      its images; files it had already renamed into place are removed here.
    - A QUEUED attempt that is not on its Redis queue (Redis was down at enqueue, lost its data,
      or a worker died between popping it and claiming it) is enqueued again. A copy delivered
      twice is harmless: only one execution can claim the row.

    Every time here is the database's (gpuscheduler/clock.py), read once per pass: a reconciler on
    a host whose clock runs ahead would otherwise judge every other host's heartbeats as old.
    """
    now = now or db_now()
    report = RecoveryReport()
    stale = Assignment.objects.filter(state=AssignmentState.RUNNING).filter(
        Q(heartbeat_at__lt=now - lease()) | Q(deadline_at__lt=now - DEADLINE_GRACE)
    )
    for old in stale.select_related("device", "request")[:200]:
        timed_out = old.deadline_at is not None and old.deadline_at < now - DEADLINE_GRACE
        why = (
            f"ran past its deadline ({clock_text(old.deadline_at)})"
            if timed_out and old.deadline_at is not None
            else f"worker {old.worker_name or '?'} stopped sending heartbeats (last {_last(old.heartbeat_at)})"
        )
        with transaction.atomic():
            # Only the reconciler whose UPDATE matches the stale row abandons it.
            won = Assignment.objects.filter(
                pk=old.pk, state=AssignmentState.RUNNING, heartbeat_at=old.heartbeat_at
            ).update(state=AssignmentState.ABANDONED, finished_at=now, error=why)
            if not won:
                continue
            if old.kind == AssignmentKind.SAMPLES and old.attempt < samples_config()["MAX_ATTEMPTS"]:
                assignment_retry(old, reason=why)
            else:
                Assignment.objects.filter(pk=old.pk).update(
                    state=AssignmentState.FAILED, error=f"{why}; no attempts left" if old.request_id else why
                )
        # After the commit, in a statement of its own: locking this device row inside the
        # transaction, before placement locks every row in pk order, deadlocked with a press.
        Device.objects.filter(current_assignment=old).update(current_assignment=None)
        report.abandoned.append(old.job_id)
        assignment_ended(old, discard_files=True)

    report.requeued = _requeue_missing(now=now, grace=timedelta(seconds=requeue_grace))
    report.repaired_requests = workloads.sample_work().repair_requests(now)
    if report:
        log.warning(
            "recovery: abandoned %s, re-enqueued %s, repaired requests %s",
            report.abandoned,
            report.requeued,
            report.repaired_requests,
        )
    return report


def _last(heartbeat_at: datetime | None) -> str:
    return clock_text(heartbeat_at) if heartbeat_at is not None else "never"


def _requeue_missing(*, now: datetime, grace: timedelta) -> list[str]:
    waiting = list(
        Assignment.objects.filter(state=AssignmentState.QUEUED, queued_at__lt=now - grace).order_by("id")[:1000]
    )
    if not waiting:
        return []
    try:
        connection = queues.redis_connection()
        present = {name: queues.queue_job_ids(name, connection) for name in {a.queue_name for a in waiting}}
    except queues.REDIS_ERRORS as exc:
        log.info("reconciler: Redis unavailable (%s); will retry", exc)
        return []
    missing = [a.pk for a in waiting if a.job_id not in present[a.queue_name]]
    if not missing:
        return []
    # Read again, in one query, what is still queued: skip what was (re-)enqueued within the
    # grace, which may have been popped a moment ago and be about to be claimed. A job popped
    # earlier and never claimed (its worker died in between, or handed it on) is enqueued again;
    # a second copy cannot be claimed twice.
    fresh = list(
        Assignment.objects.filter(pk__in=missing, state=AssignmentState.QUEUED)
        .filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lte=now - grace))
        .order_by("id")
    )
    done = queues.enqueue_assignments(fresh)
    return [a.job_id for a in fresh[:done]]
