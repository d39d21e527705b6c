"""Writes of the scheduler about devices: registration, health and admission, snapshots and
their bounded history, and which worker holds which device. Assignments (placement, attempts)
are in gpuscheduler/placement.py and gpuscheduler/assignments.py, recovery in gpuscheduler/recovery.py.

Every shared-state change is a conditional UPDATE whose row count says who won, so monitors and
workers on any number of hosts may run the same code at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction

from gpuscheduler.backends import Backend, DeviceInfo, Reading
from gpuscheduler.clock import DbNow, clock_text, db_now
from gpuscheduler.conf import gpu_config, lease
from gpuscheduler.models import Device, Health, Snapshot, WorkerState
from gpuscheduler.policies import Admission, admit
from gpuscheduler.selectors import limits, pid_alive

log = logging.getLogger(__name__)


REGISTERED = "registered, not read yet"

# pg_advisory_xact_lock(PLACEMENT_LOCK): "placing work, or locking several device rows"; held until
# the transaction ends (see placement.placement_locked).
PLACEMENT_LOCK = 0x706C6163


def placement_turn() -> None:
    """Wait for this transaction's turn to place work or lock several device rows, and keep it
    until the transaction ends (again in the same transaction: at once). Nothing on SQLite, whose
    IMMEDIATE transactions serialize writers."""
    statement = placement_turn_statement()
    if statement:
        with transaction.get_connection().cursor() as cursor:
            cursor.execute(statement)


def placement_turn_statement() -> str:
    """The statement placement_turn runs ("" on SQLite), for a caller that sends it in one round
    trip with the first read of its turn: PostgreSQL runs each statement of a query string on a
    snapshot of its own (READ COMMITTED), taken once the one before it ended, so that read sees
    every placement that held the turn before."""
    connection = transaction.get_connection()
    assert connection.in_atomic_block, "a turn lasts until its transaction ends"
    return f"SELECT pg_advisory_xact_lock({PLACEMENT_LOCK})" if connection.vendor == "postgresql" else ""


# --- devices and health ---------------------------------------------------------------------


def devices_sync(*, backend: Backend, host: str) -> list[Device]:
    """Create or refresh the Device row of every device the backend reports on this host (their
    rows are read in one query: the monitor does this every tick)."""
    infos = backend.devices()
    known = {device.uuid: device for device in Device.objects.filter(uuid__in=[info.uuid for info in infos])}
    return [device_upsert(info=info, host=host, existing=known.get(info.uuid)) for info in infos]


def device_upsert(*, info: DeviceInfo, host: str, existing: Device | None = None) -> Device:
    """The device's row, created if new; `existing` is its row already read, if the caller has it.

    Keyed by UUID alone: a GPU whose host was renamed (or whose container restarted with another
    host id) keeps its row, which now names this host; a retired device seen again is back.
    """
    fields = {
        "host": host,
        "name": info.name,
        "index": info.index,
        "pci_bus_id": info.pci_bus_id,
        "memory_total": info.memory_total,
        "kind": info.kind,
    }
    device, created = existing, False
    if device is None:
        device, created = Device.objects.get_or_create(
            uuid=info.uuid, defaults={**fields, "health": Health.HEALTHY, "health_reason": REGISTERED}
        )
    changed: dict[str, object] = {k: v for k, v in fields.items() if getattr(device, k) != v}
    if "host" in changed and not created:
        log.warning("%s (%s) is now reported by host %s, not %s", device.label, device.uuid, host, device.host)
    if device.retired_at is not None:
        changed["retired_at"] = None
        log.info("%s (%s) is seen again: no longer retired", device.label, device.uuid)
    if changed and not created:
        Device.objects.filter(pk=device.pk).update(**changed)
        for key, value in changed.items():
            setattr(device, key, value)
    return device


def reading_admission(reading: Reading, device: Device) -> Admission:
    """Judge one reading of `device`. Memory its own worker holds counts as free (the worker reuses
    it), and a device that is not healthy must cool down a few degrees below the limit."""
    used = reading.memory_used
    if used is not None and device.worker_pid and device.worker_host == gpu_config()["HOST"]:
        used = max(0, used - dict(reading.process_memory).get(device.worker_pid, 0))
    return admit(
        ok=reading.ok,
        error=reading.error,
        memory_used=used,
        memory_total=reading.memory_total,
        temperature=reading.temperature,
        limits=limits(),
        recovering=device.health != Health.HEALTHY,
    )


def device_observe(*, device: Device, reading: Reading, now: datetime | None = None, fresh: bool = False) -> str:
    """Judge one reading of `device` and apply the verdict: bad readings make it unhealthy at once;
    good readings move an unhealthy device to probation, which only a passing canary job ends.
    (`fresh`: the caller read the row this moment; a long-lived worker's copy is read again.)"""
    if fresh:
        return _health_apply(device=device, admission=reading_admission(reading, device), now=now or db_now())
    # The row read again, and the database's time with it (one query: a worker does this every second).
    fields = ["health", "health_reason", "worker_pid", "worker_host", "last_seen"]
    row = Device.objects.filter(pk=device.pk).annotate(db_now=DbNow()).values(*fields, "db_now").get()
    for name in fields:
        setattr(device, name, row[name])
    now = now or row["db_now"]
    health = _health_apply(device=device, admission=reading_admission(reading, device), now=now)
    # A worker's own reading counts as a reading (a host with workers and no monitor is not
    # stale), and placement reads it from the row; written at most once a heartbeat interval, less
    # while the monitor writes it too.
    every = timedelta(seconds=float(gpu_config()["HEARTBEAT_INTERVAL"]))
    if device.last_seen is None or now - device.last_seen >= every:
        Device.objects.filter(pk=device.pk).update(
            last_seen=now,
            reading_at=now,
            memory_used=reading.memory_used,
            utilization=reading.utilization,
            temperature=reading.temperature,
        )
        device.last_seen = now
    return health


def _health_apply(*, device: Device, admission: Admission, now: datetime) -> str:
    """Move `device` (as just read) to the health the verdict calls for at `now` (the database's
    time); the conditional UPDATE leaves a concurrent observer's transition alone."""
    health, reason = device.health, device.health_reason
    if not admission.ok:
        new, new_reason = Health.UNHEALTHY, admission.reason
    elif health == Health.HEALTHY and reason == REGISTERED:
        new, new_reason = Health.HEALTHY, f"readings within limits since {clock_text(now)}"
    elif health == Health.UNHEALTHY:
        new, new_reason = (
            Health.PROBATION,
            f"readings within limits again since {clock_text(now)}; waiting for a canary job",
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


def device_set_unhealthy(*, device: Device, reason: str) -> None:
    """Take a device out of service for a reason no reading shows (its model does not load)."""
    Device.objects.filter(pk=device.pk).update(
        health=Health.UNHEALTHY, health_reason=reason[:500], health_changed_at=DbNow()
    )
    log.warning("%s is now unhealthy: %s", device.label, reason)
    device.health, device.health_reason = Health.UNHEALTHY, reason


def device_probation_end(*, device: Device, passed: bool, detail: str) -> bool:
    """Close a probation after the canary job: healthy if it passed, unhealthy if not."""
    now = db_now()
    if passed:
        new, reason = Health.HEALTHY, f"canary job passed at {clock_text(now)} ({detail})"
    else:
        new, reason = Health.UNHEALTHY, f"canary job failed: {detail}"
    updated = Device.objects.filter(pk=device.pk, health=Health.PROBATION).update(
        health=new, health_reason=reason[:500], health_changed_at=now
    )
    if updated:
        log.warning("%s is now %s: %s", device.label, new, reason)
        device.health, device.health_reason = new, reason
    return bool(updated)


# The latest reading, copied onto the device row (see Device.reading_at).
READING_FIELDS = ("reading_at", "memory_used", "utilization", "temperature")


def reading_copy(device: Device, snapshot: Snapshot) -> None:
    """Put a reading on the device instance (the caller saves it): placement reads it there."""
    device.reading_at = snapshot.taken_at
    device.memory_used = snapshot.memory_used
    device.utilization = snapshot.utilization
    device.temperature = snapshot.temperature


def snapshots_record(*, backend: Backend, host: str, now: datetime | None = None) -> list[Snapshot]:
    """Read every device once, store a snapshot of each and apply the health verdicts (at the
    database's time, read once per tick)."""
    now = now or db_now()
    devices = {d.uuid: d for d in devices_sync(backend=backend, host=host)}
    snapshots = []
    for reading in backend.read():
        device = devices.get(reading.uuid)
        if device is None:
            continue
        health = device_observe(device=device, reading=reading, now=now, fresh=True)
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
    seen = sorted({s.device_id: s for s in snapshots}.values(), key=lambda s: s.device_id)
    for snapshot in seen:
        reading_copy(snapshot.device, snapshot)
        snapshot.device.last_seen, snapshot.device.retired_at = now, None
    with transaction.atomic():
        # Several device rows: after the placement turn, then locked in pk order (the lock order:
        # placement.placement_locked). An UPDATE of several rows locks them in the order it
        # scans the table, and deadlocked with a press.
        placement_turn()
        ids = [s.device_id for s in seen]
        list(Device.objects.select_for_update(no_key=True).filter(pk__in=ids).order_by("pk").values_list("pk"))
        # One UPDATE for every device: its latest reading, which placement reads from the row.
        Device.objects.bulk_update([s.device for s in seen], [*READING_FIELDS, "last_seen", "retired_at"])
    return snapshots


# --- workers ----------------------------------------------------------------------------------


def worker_attach(*, device: Device, name: str, pid: int, host: str) -> str | None:
    """Bind this worker to the device; return None, or why another live worker holds it."""
    now = db_now()
    current = (
        Device.objects.filter(pk=device.pk).values("worker_name", "worker_pid", "worker_host", "worker_seen_at").get()
    )
    holder_alive = (
        current["worker_name"]
        and current["worker_name"] != name
        and current["worker_seen_at"] is not None
        and current["worker_seen_at"] >= now - lease()
        # A holder on this host whose process is gone was SIGKILLed: take over at once. Its PID is
        # looked for only where it ran (by host id: another machine may share this one's name).
        and not (current["worker_host"] == host and not pid_alive(current["worker_pid"]))
    )
    if holder_alive:
        return f"worker {current['worker_name']} (pid {current['worker_pid']}) holds {device.label}"
    updated = Device.objects.filter(
        pk=device.pk, worker_name=current["worker_name"], worker_seen_at=current["worker_seen_at"]
    ).update(
        worker_name=name,
        worker_pid=pid,
        worker_host=host,
        worker_seen_at=now,
        worker_state=WorkerState.STARTING,
        current_assignment=None,
        retired_at=None,
    )
    return None if updated else "another worker attached at the same moment"


def worker_beat(*, device: Device, name: str, state: str, assignment_id: int | None = None) -> bool:
    """Refresh this worker's presence; False if another worker has taken the device over."""
    return bool(
        Device.objects.filter(pk=device.pk, worker_name=name).update(
            worker_seen_at=DbNow(), worker_state=state, current_assignment_id=assignment_id
        )
    )


def worker_detach(*, device: Device, name: str) -> None:
    Device.objects.filter(pk=device.pk, worker_name=name).update(
        worker_state=WorkerState.STOPPED, current_assignment=None, worker_seen_at=None
    )


# --- snapshot history ---------------------------------------------------------------------------

HEALTH_RANK = {Health.HEALTHY: 0, Health.PROBATION: 1, Health.UNHEALTHY: 2}


def snapshots_compact(*, now: datetime | None = None, batch: int = 5000, max_batches: int = 20) -> tuple[int, int]:
    """Keep history bounded: raw snapshots for GPU_SNAPSHOT_RAW_HOURS, then one average per
    GPU_SNAPSHOT_BUCKET_SECONDS, and nothing past GPU_SNAPSHOT_RETENTION_DAYS.

    Folds at most `max_batches` batches a call, so a backlog (the monitor was down for a day)
    is worked off over several monitor ticks instead of stalling one. Returns (raw snapshots
    folded into averages, snapshots deleted for age).
    """
    config = gpu_config()
    now = now or db_now()
    bucket = int(config["SNAPSHOT_BUCKET_SECONDS"])
    retention_cutoff = now - timedelta(days=float(config["SNAPSHOT_RETENTION_DAYS"]))
    expired, _ = Snapshot.objects.filter(taken_at__lt=retention_cutoff).delete()
    # Fold only whole buckets: the cutoff sits on a bucket boundary.
    raw_edge = (now - timedelta(hours=float(config["SNAPSHOT_RAW_HOURS"]))).timestamp()
    cutoff = datetime.fromtimestamp(raw_edge - raw_edge % bucket, tz=now.tzinfo)
    folded = 0
    batches = 0
    # order_by(): the model's default ordering would make DISTINCT run over (device, taken_at).
    device_ids = list(
        Snapshot.objects.filter(bucket_seconds=0, taken_at__lt=cutoff)
        .order_by()
        .values_list("device", flat=True)
        .distinct()
    )
    for device_id in device_ids:
        while batches < max_batches:
            batches += 1
            # Several monitors may fold at once (while Redis is down every one takes the turn):
            # the rows are read inside the transaction, under a per-device lock on PostgreSQL
            # (SQLite's IMMEDIATE transactions serialize writers), and a fold whose rows someone
            # else deleted meanwhile is rolled back, or the averages would be counted twice.
            with transaction.atomic():
                if not _fold_lock(device_id):
                    break  # another monitor is folding this device's history now
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
                averages = _averages(device_id, rows, bucket)
                deleted, _ = Snapshot.objects.filter(pk__in=[r[0] for r in rows]).delete()
                if deleted != len(rows):
                    transaction.set_rollback(True)
                    break
                Snapshot.objects.bulk_create(averages)
            folded += len(rows)
    return folded, expired


# pg_try_advisory_xact_lock(FOLD_LOCK, device id): "this device's history is being folded".
FOLD_LOCK = 0x6670


def _fold_lock(device_id: int) -> bool:
    """Take this transaction's lock on folding the device's snapshots; False if another holds it."""
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [FOLD_LOCK, device_id % 2**31])
        return bool(cursor.fetchone()[0])


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
