"""Writes of the scheduler: devices and their health, snapshots, placement, the assignment
lifecycle (claim, heartbeat, finish, retry) and recovery from dead workers and lost Redis data.

Every shared-state change is a conditional UPDATE whose row count says who won, so monitors,
workers and reconcilers may run the same code at once on any number of hosts.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from gpuscheduler import queues
from gpuscheduler.backends import Backend, DeviceInfo, Reading
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.models import (
    LIVE_STATES,
    Assignment,
    AssignmentKind,
    AssignmentState,
    Device,
    Health,
    Snapshot,
    WorkerState,
)
from gpuscheduler.policies import Admission, Chunk, admit, get_policy, plan_chunks, plan_pinned
from gpuscheduler.selectors import device_views, limits, placement_sequence

log = logging.getLogger(__name__)


REGISTERED = "registered, not read yet"


class NoDeviceAvailable(Exception):
    """No device may take work now; the message says which and why."""


# --- devices and health ---------------------------------------------------------------------


def devices_sync(*, backend: Backend, host: str) -> list[Device]:
    """Create or refresh the Device row of every device the backend reports on this host."""
    return [device_upsert(info=info, host=host) for info in backend.devices()]


def device_upsert(*, info: DeviceInfo, host: str) -> Device:
    fields = {
        "name": info.name,
        "index": info.index,
        "pci_bus_id": info.pci_bus_id,
        "memory_total": info.memory_total,
        "kind": info.kind,
        "speed": info.speed,
    }
    device, created = Device.objects.get_or_create(
        host=host, uuid=info.uuid, defaults={**fields, "health": Health.HEALTHY, "health_reason": REGISTERED}
    )
    changed = {k: v for k, v in fields.items() if getattr(device, k) != v}
    if changed and not created:
        Device.objects.filter(pk=device.pk).update(**changed)
        for key, value in changed.items():
            setattr(device, key, value)
    return device


def reading_admission(reading: Reading) -> Admission:
    return admit(
        ok=reading.ok,
        error=reading.error,
        memory_used=reading.memory_used,
        memory_total=reading.memory_total,
        temperature=reading.temperature,
        limits=limits(),
    )


def device_health_update(*, device: Device, admission: Admission, now: datetime | None = None) -> str:
    """Apply one reading's verdict: bad readings make a device unhealthy at once; good readings
    move an unhealthy device to probation, which only a passing canary job ends."""
    now = now or timezone.now()
    current = Device.objects.filter(pk=device.pk).values_list("health", "health_reason").first()
    if current is None:
        return device.health
    health, reason = current
    if not admission.ok:
        new, new_reason = Health.UNHEALTHY, admission.reason
    elif health == Health.HEALTHY and reason == REGISTERED:
        new, new_reason = Health.HEALTHY, f"readings within limits since {now:%H:%M:%S}"
    elif health == Health.UNHEALTHY:
        new, new_reason = (
            Health.PROBATION,
            f"readings within limits again since {now:%H:%M:%S}; waiting for a canary job",
        )
    else:
        new, new_reason = Health(health), reason
    if (new, new_reason) != (health, reason):
        updated = Device.objects.filter(pk=device.pk, health=health).update(
            health=new, health_reason=new_reason[:500], **({"health_changed_at": now} if new != health else {})
        )
        if updated and new != health:
            log.warning("%s is now %s: %s", device.label, new, new_reason)
    device.health, device.health_reason = new, new_reason
    return new


def device_probation_end(*, device: Device, passed: bool, detail: str) -> bool:
    """Close a probation after the canary job: healthy if it passed, unhealthy if not."""
    now = timezone.now()
    if passed:
        new, reason = Health.HEALTHY, f"canary job passed at {now:%H:%M:%S} ({detail})"
    else:
        new, reason = Health.UNHEALTHY, f"canary job failed: {detail}"
    updated = Device.objects.filter(pk=device.pk, health=Health.PROBATION).update(
        health=new, health_reason=reason[:500], health_changed_at=now
    )
    if updated:
        log.warning("%s is now %s: %s", device.label, new, reason)
        device.health, device.health_reason = new, reason
    return bool(updated)


def snapshots_record(*, backend: Backend, host: str, now: datetime | None = None) -> list[Snapshot]:
    """Read every device once, store a snapshot of each and apply the health verdicts."""
    now = now or timezone.now()
    devices = {d.uuid: d for d in devices_sync(backend=backend, host=host)}
    snapshots = []
    for reading in backend.read():
        device = devices.get(reading.uuid)
        if device is None:
            continue
        health = device_health_update(device=device, admission=reading_admission(reading), now=now)
        snapshots.append(
            Snapshot(
                device=device,
                taken_at=now,
                memory_used=reading.memory_used,
                memory_total=reading.memory_total,
                utilization=reading.utilization,
                temperature=reading.temperature,
                power_watts=reading.power_watts,
                throttle_reasons=",".join(reading.throttle_reasons)[:300],
                health=health,
                error=reading.error[:500],
            )
        )
    Snapshot.objects.bulk_create(snapshots)
    Device.objects.filter(pk__in=[s.device_id for s in snapshots]).update(last_seen=now)
    return snapshots


# --- workers ----------------------------------------------------------------------------------


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_attach(*, device: Device, name: str, pid: int, host: str) -> str | None:
    """Bind this worker to the device; return None, or why another live worker holds it."""
    now = timezone.now()
    lease = timedelta(seconds=float(gpu_config()["LEASE_SECONDS"]))
    current = Device.objects.filter(pk=device.pk).values("worker_name", "worker_pid", "worker_seen_at").get()
    holder_alive = (
        current["worker_name"]
        and current["worker_name"] != name
        and current["worker_seen_at"] is not None
        and current["worker_seen_at"] >= now - lease
        # A holder on this host whose process is gone was SIGKILLed: take over at once.
        and not (device.host == host and not _pid_alive(current["worker_pid"]))
    )
    if holder_alive:
        return f"worker {current['worker_name']} (pid {current['worker_pid']}) holds {device.label}"
    updated = Device.objects.filter(
        pk=device.pk, worker_name=current["worker_name"], worker_seen_at=current["worker_seen_at"]
    ).update(
        worker_name=name, worker_pid=pid, worker_seen_at=now, worker_state=WorkerState.STARTING, current_assignment=None
    )
    return None if updated else "another worker attached at the same moment"


def worker_beat(*, device: Device, name: str, state: str, assignment_id: int | None = None) -> bool:
    """Refresh this worker's presence; False if another worker has taken the device over."""
    return bool(
        Device.objects.filter(pk=device.pk, worker_name=name).update(
            worker_seen_at=timezone.now(), worker_state=state, current_assignment_id=assignment_id
        )
    )


def worker_detach(*, device: Device, name: str) -> None:
    Device.objects.filter(pk=device.pk, worker_name=name).update(
        worker_state=WorkerState.STOPPED, current_assignment=None, worker_seen_at=None
    )


# --- placement --------------------------------------------------------------------------------


def _unavailable_message(views: list) -> str:
    if not views:
        return "No device is registered yet: start `python manage.py gpuworkers` (or `gpumonitor`) first."
    devices = Device.objects.in_bulk([v.id for v in views])
    reasons = "; ".join(f"{d.label} is {d.health} ({d.health_reason})" for d in devices.values())
    return f"No healthy device can take work now: {reasons}."


def assignments_place(
    *,
    request_id: int,
    count: int,
    first_index: int = 0,
    attempt: int = 1,
    pinned_device: Device | None = None,
    avoid_device_id: int | None = None,
) -> list[Assignment]:
    """Split `count` images into chunks, place each on a device and store the assignments.

    Runs inside the caller's transaction; the caller enqueues after commit.
    """
    assert transaction.get_connection().in_atomic_block, "assignments_place must run in a transaction"
    config = samples_config()
    # Lock every device row in one order so concurrent placements see each other's work
    # (PostgreSQL); SQLite's IMMEDIATE transactions already serialize writers.
    devices = list(Device.objects.select_for_update().order_by("pk"))
    views = device_views(devices)
    max_batch = int(config["MAX_BATCH"])
    chunks: list[Chunk]
    if pinned_device is not None:
        view = next((v for v in views if v.id == pinned_device.pk), None)
        if view is None:
            raise NoDeviceAvailable(f"Device {pinned_device} is not registered.")
        state = "" if view.healthy else f" ({pinned_device.health}: the images wait for it to recover)"
        chunks = plan_pinned(count, view, max_batch=max_batch, reason=f"chosen explicitly: {view.describe()}{state}")
        policy_name = "explicit"
    else:
        policy_name = gpu_config()["POLICY"]
        ranked = get_policy(policy_name)(views, placement_sequence())
        if avoid_device_id is not None and len(ranked) > 1:
            ranked = [r for r in ranked if r.device.id != avoid_device_id]
        if not ranked:
            raise NoDeviceAvailable(_unavailable_message(views))
        chunks = plan_chunks(count, ranked, max_batch=max_batch)
    created = []
    for chunk in chunks:
        assignment = Assignment.objects.create(
            kind=AssignmentKind.SAMPLES,
            request_id=request_id,
            first_index=first_index + chunk.first_index,
            image_count=chunk.size,
            attempt=attempt,
            job_id=f"samples-{uuid.uuid4().hex}",
            queue_name=queues.device_queue_name(chunk.device_id, pinned=pinned_device is not None),
            planned_device_id=chunk.device_id,
            pinned=pinned_device is not None,
            avoid_device_id=avoid_device_id if pinned_device is None else None,
            policy=policy_name,
            reason=chunk.reason[:500],
        )
        log.info(
            "request %s images %d-%d (attempt %d) -> %s [%s]",
            request_id,
            assignment.first_index,
            assignment.last_index,
            attempt,
            assignment.queue_name,
            chunk.reason,
        )
        created.append(assignment)
    return created


def enqueue_on_commit(assignments: list[Assignment]) -> None:
    ids = [a.pk for a in assignments]
    transaction.on_commit(lambda: queues.enqueue_assignments(list(Assignment.objects.filter(pk__in=ids))))


# --- the life of one attempt ------------------------------------------------------------------


def assignment_claim(
    *, assignment_id: int, device: Device, worker_name: str, host: str, timeout: float
) -> Assignment | None:
    """Take a queued attempt for this worker; None if it was already taken, cancelled or replaced,
    or if it is a retry of an attempt that failed on this device and another device can take it."""
    now = timezone.now()
    row = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED).values(
        "avoid_device_id", "queued_at"
    )
    first = row.first()
    if first is None:
        return None
    if first["avoid_device_id"] == device.pk and first["queued_at"] > now - timedelta(seconds=AVOID_SECONDS):
        if assignment_move_away(assignment_id=assignment_id, device=device):
            return None
        lease = timedelta(seconds=float(gpu_config()["LEASE_SECONDS"]))
        if Device.objects.exclude(pk=device.pk).filter(worker_seen_at__gte=now - lease).exists():
            # Another device has a worker but cannot take work this instant (busy recovering,
            # in probation): leave the job; the reconciler puts it back on its queue in a few
            # seconds, and it moves as soon as that device is healthy.
            log.info("assignment %s failed on %s before: leaving it for another device", assignment_id, device.label)
            return None
    claimed = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED).update(
        state=AssignmentState.RUNNING,
        device=device,
        worker_name=worker_name,
        host=host,
        started_at=now,
        heartbeat_at=now,
        deadline_at=now + timedelta(seconds=timeout),
    )
    if not claimed:
        return None
    return Assignment.objects.select_related("planned_device", "device").get(pk=assignment_id)


# A retry avoids the device its previous attempt failed on for this long; after that (or when
# no other device can take it) that device may try again.
AVOID_SECONDS = 60.0


def assignment_move_away(*, assignment_id: int, device: Device) -> bool:
    """Hand a retry that failed on `device` to the best other device that can run it now.

    Any worker may steal any queued job, so placing a retry elsewhere is not enough: the worker
    of the device it failed on (out of memory at one image, a timeout) hands it on when it pops it.
    """
    with transaction.atomic():
        devices = list(Device.objects.select_for_update().order_by("pk"))
        views = [v for v in device_views(devices) if v.id != device.pk and v.healthy and v.worker_alive]
        ranked = get_policy(gpu_config()["POLICY"])(views, placement_sequence()) if views else []
        if not ranked:
            return False
        target = ranked[0]
        moved = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.QUEUED).update(
            planned_device_id=target.device.id,
            queue_name=queues.device_queue_name(target.device.id),
            reason=f"moved away from {device.label}, where it failed: {target.reason}"[:500],
        )
        if not moved:
            return False
        log.info("assignment %s moved from %s to %s", assignment_id, device.label, target.device.label)
        enqueue_on_commit(list(Assignment.objects.filter(pk=assignment_id)))
    return True


def assignment_heartbeat(*, assignment_id: int) -> bool:
    """Extend this attempt's lease; False means it was abandoned and its work will be dropped."""
    return bool(
        Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(heartbeat_at=timezone.now())
    )


def assignment_succeed(*, assignment_id: int, calls: int, peak_memory: int | None, note: str = "") -> bool:
    """Close a running attempt as succeeded; False if it lost its lease (its images must go)."""
    assert transaction.get_connection().in_atomic_block, "commit images and the attempt together"
    return bool(
        Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
            state=AssignmentState.SUCCEEDED,
            finished_at=timezone.now(),
            calls=calls,
            peak_memory=peak_memory,
            error=note[:10000],
        )
    )


def assignment_fail(*, assignment_id: int, error: str, retryable: bool = True) -> Assignment | None:
    """Close a running attempt as failed; place a retry if attempts remain. Returns the retry."""
    with transaction.atomic():
        old = Assignment.objects.filter(pk=assignment_id).first()
        if old is None:
            return None
        can_retry = retryable and old.kind == AssignmentKind.SAMPLES and old.attempt < samples_config()["MAX_ATTEMPTS"]
        ended = Assignment.objects.filter(pk=assignment_id, state=AssignmentState.RUNNING).update(
            state=AssignmentState.RETRIED if can_retry else AssignmentState.FAILED,
            finished_at=timezone.now(),
            error=error[:10000],
        )
        if not ended:
            return None
        retry = _retry(old, reason=error) if can_retry else None
    _request_refresh(old.request_id)
    return retry


def _retry(old: Assignment, *, reason: str) -> Assignment | None:
    """Place the next attempt of `old`'s chunk, away from the device it failed on if possible."""
    assert old.request_id is not None, "only sample attempts are retried"
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
            )
    except IntegrityError:
        # Another reconciler placed this chunk's next attempt a moment ago.
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
        reason,
        retry.job_id,
        retry.queue_name,
    )
    enqueue_on_commit([retry])
    return retry


def _request_refresh(request_id: int | None) -> None:
    if request_id is None:
        return
    from personas.services import sample_request_refresh  # personas owns request states

    sample_request_refresh(request_id=request_id)


# --- recovery ---------------------------------------------------------------------------------


@dataclass
class RecoveryReport:
    abandoned: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    repaired_requests: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.abandoned or self.requeued or self.repaired_requests)


def assignments_recover(*, now: datetime | None = None, requeue_grace: float = 5.0) -> RecoveryReport:
    """Find attempts whose worker died or hung, and jobs Redis lost; re-run them exactly once.

    - A RUNNING attempt whose heartbeat is older than the lease (the worker died, or hangs
      holding the GIL) or that ran past its deadline is ABANDONED and its chunk placed again.
      If the old attempt is still alive somewhere, its commit finds the row ABANDONED and drops
      its images.
    - A QUEUED attempt that is not on its Redis queue (Redis was down at enqueue, lost its data,
      or a worker died between popping it and claiming it) is enqueued again. A copy delivered
      twice is harmless: only one execution can claim the row.
    """
    now = now or timezone.now()
    report = RecoveryReport()
    lease = timedelta(seconds=float(gpu_config()["LEASE_SECONDS"]))
    stale = Assignment.objects.filter(state=AssignmentState.RUNNING).filter(
        Q(heartbeat_at__lt=now - lease) | Q(deadline_at__lt=now)
    )
    for old in stale.select_related("device")[:200]:
        timed_out = old.deadline_at is not None and old.deadline_at < now
        why = (
            f"ran past its deadline ({old.deadline_at:%H:%M:%S})"
            if timed_out
            else f"worker {old.worker_name or '?'} stopped sending heartbeats (last {old.heartbeat_at:%H:%M:%S})"
        )
        with transaction.atomic():
            # Only the reconciler whose UPDATE matches the stale row abandons it.
            won = Assignment.objects.filter(
                pk=old.pk, state=AssignmentState.RUNNING, heartbeat_at=old.heartbeat_at
            ).update(state=AssignmentState.ABANDONED, finished_at=now, error=why)
            if not won:
                continue
            Device.objects.filter(current_assignment=old).update(current_assignment=None)
            if old.kind == AssignmentKind.SAMPLES and old.attempt < samples_config()["MAX_ATTEMPTS"]:
                _retry(old, reason=why)
            else:
                Assignment.objects.filter(pk=old.pk).update(
                    state=AssignmentState.FAILED, error=f"{why}; no attempts left"
                )
        report.abandoned.append(old.job_id)
        _request_refresh(old.request_id)

    report.requeued = _requeue_missing(now=now, grace=timedelta(seconds=requeue_grace))
    report.repaired_requests = _repair_requests()
    if report:
        log.warning(
            "recovery: abandoned %s, re-enqueued %s, repaired requests %s",
            report.abandoned,
            report.requeued,
            report.repaired_requests,
        )
    return report


def _requeue_missing(*, now: datetime, grace: timedelta) -> list[str]:
    waiting = list(
        Assignment.objects.filter(state=AssignmentState.QUEUED, queued_at__lt=now - grace).order_by("id")[:1000]
    )
    if not waiting:
        return []
    try:
        connection = queues.redis_connection()
        present: dict[str, set[str]] = {}
        for name in {a.queue_name for a in waiting}:
            present[name] = queues.queue_job_ids(name, connection)
        # A job popped an instant ago may be between the pop and its claim: give it the grace.
        recently_popped = now - grace
        requeued = []
        for assignment in waiting:
            if assignment.job_id in present[assignment.queue_name]:
                continue
            fresh = Assignment.objects.filter(pk=assignment.pk, state=AssignmentState.QUEUED).first()
            if fresh is None or (fresh.enqueued_at is not None and fresh.enqueued_at > recently_popped):
                continue
            queues.enqueue_assignment(fresh, connection)
            Assignment.objects.filter(pk=fresh.pk).update(enqueued_at=timezone.now())
            requeued.append(fresh.job_id)
        return requeued
    except queues.REDIS_ERRORS as exc:
        log.info("reconciler: Redis unavailable (%s); will retry", exc)
        return []


def _repair_requests() -> list[int]:
    """Active requests with no live attempt left (a crash between two writes) get their final state."""
    from personas.models import ACTIVE_REQUEST_STATES, SampleRequest

    orphaned = (
        SampleRequest.objects.filter(state__in=ACTIVE_REQUEST_STATES, created__lt=timezone.now() - timedelta(seconds=5))
        .exclude(assignments__state__in=LIVE_STATES)
        .values_list("pk", flat=True)[:100]
    )
    repaired = []
    for request_id in orphaned:
        _request_refresh(request_id)
        repaired.append(request_id)
    return repaired


# --- snapshot history ---------------------------------------------------------------------------

HEALTH_RANK = {Health.HEALTHY: 0, Health.PROBATION: 1, Health.UNHEALTHY: 2}


def snapshots_compact(*, now: datetime | None = None, batch: int = 5000) -> tuple[int, int]:
    """Keep history bounded: raw snapshots for GPU_SNAPSHOT_RAW_HOURS, then one average per
    GPU_SNAPSHOT_BUCKET_SECONDS, and nothing past GPU_SNAPSHOT_RETENTION_DAYS.

    Returns (raw snapshots folded into averages, snapshots deleted for age).
    """
    config = gpu_config()
    now = now or timezone.now()
    bucket = int(config["SNAPSHOT_BUCKET_SECONDS"])
    retention_cutoff = now - timedelta(days=float(config["SNAPSHOT_RETENTION_DAYS"]))
    expired, _ = Snapshot.objects.filter(taken_at__lt=retention_cutoff).delete()
    # Fold only whole buckets: the cutoff sits on a bucket boundary.
    raw_edge = (now - timedelta(hours=float(config["SNAPSHOT_RAW_HOURS"]))).timestamp()
    cutoff = datetime.fromtimestamp(raw_edge - raw_edge % bucket, tz=now.tzinfo)
    folded = 0
    for device_id in (
        Snapshot.objects.filter(bucket_seconds=0, taken_at__lt=cutoff).values_list("device", flat=True).distinct()
    ):
        while True:
            rows = list(
                Snapshot.objects.filter(device_id=device_id, bucket_seconds=0, taken_at__lt=cutoff)
                .order_by("taken_at")
                .values_list(
                    "id",
                    "taken_at",
                    "memory_used",
                    "memory_total",
                    "utilization",
                    "temperature",
                    "power_watts",
                    "throttle_reasons",
                    "health",
                    "error",
                )[:batch]
            )
            if not rows:
                break
            if len(rows) == batch:
                # Do not split the last bucket of this batch across two batches.
                last_bucket = int(rows[-1][1].timestamp()) // bucket
                whole = [r for r in rows if int(r[1].timestamp()) // bucket < last_bucket]
                rows = whole or rows
            with transaction.atomic():
                Snapshot.objects.bulk_create(_averages(device_id, rows, bucket))
                Snapshot.objects.filter(pk__in=[r[0] for r in rows]).delete()
            folded += len(rows)
    return folded, expired


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _averages(device_id: int, rows: list[tuple], bucket: int) -> list[Snapshot]:
    groups: dict[int, list[tuple]] = {}
    for row in rows:
        groups.setdefault(int(row[1].timestamp()) // bucket, []).append(row)
    averages = []
    for key, group in sorted(groups.items()):
        memory_used = _mean([r[2] for r in group])
        totals = [r[3] for r in group if r[3] is not None]
        reasons = sorted({reason for r in group for reason in r[7].split(",") if reason})
        averages.append(
            Snapshot(
                device_id=device_id,
                taken_at=datetime.fromtimestamp(key * bucket, tz=group[0][1].tzinfo),
                bucket_seconds=bucket,
                memory_used=int(memory_used) if memory_used is not None else None,
                memory_total=max(totals) if totals else None,
                utilization=_mean([r[4] for r in group]),
                temperature=_mean([r[5] for r in group]),
                power_watts=_mean([r[6] for r in group]),
                throttle_reasons=",".join(reasons)[:300],
                health=max((r[8] for r in group), key=lambda h: HEALTH_RANK.get(h, 0)),
                error=next((r[9] for r in reversed(group) if r[9]), "")[:500],
            )
        )
    return averages
