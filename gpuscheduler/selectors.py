"""Reads: the latest state of every device, as policies and pages need it."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Avg, F, FloatField, Func, Max, Min, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Floor

from config.numbers import is_ascii_int
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import gpu_config, lease, samples_config, stale_after
from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceKind, Health, Snapshot
from gpuscheduler.policies import DeviceView, Limits, age_text, stale_reason, stale_seconds, steal_pays
from gpuscheduler.storage import stores_unhealthy

# Not a stored health: a device nobody has heard of for stale_after() shows this instead.
STALE = "stale"


def latest_snapshots(device_ids: list[int] | None = None) -> dict[int, Snapshot]:
    """The newest snapshot of every device, in one query that walks the (device, taken_at) index."""
    newest = Snapshot.objects.filter(device=OuterRef("pk")).order_by("-taken_at", "-id").values("id")[:1]
    devices = Device.objects.all() if device_ids is None else Device.objects.filter(pk__in=device_ids)
    ids = devices.annotate(snapshot_id=Subquery(newest)).values("snapshot_id")
    return {s.device_id: s for s in Snapshot.objects.filter(id__in=ids)}


def limits() -> Limits:
    config = gpu_config()
    return Limits(
        max_temperature=float(config["MAX_TEMPERATURE"]),
        min_free_memory=int(config["MIN_FREE_MEMORY_MB"]) * 1024 * 1024,
    )


def worker_alive(device: Device, now: datetime | None = None) -> bool:
    """Did the device's worker beat within the lease? `now` is the database's time (clock.db_now),
    read once by a caller that judges many devices."""
    if not device.worker_name or device.worker_seen_at is None:
        return False
    return device.worker_seen_at >= (now or db_now()) - lease()


def pid_alive(pid: int | None) -> bool:
    """Whether a process of this host is running (a zombie counts, until its parent reaps it)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_worker(now: datetime | None = None) -> Q:
    """worker_alive as a filter: the devices whose worker beat within the lease (by the database's clock)."""
    return Q(worker_seen_at__gte=(DbNow() if now is None else now) - lease()) & ~Q(worker_name="")


def device_stale(device: Device, now: datetime | None = None) -> float | None:
    """Seconds since anyone heard of the device (a reading or its worker's heartbeat), when that
    makes it stale (conf.stale_after); None while it is live."""
    return stale_seconds(
        last_seen=device.last_seen,
        worker_seen_at=device.worker_seen_at,
        created=device.created,
        now=now or db_now(),
        after=stale_after(),
    )


def device_blocked(device: Device, now: datetime, stores: dict[str, str]) -> str:
    """Why a device may not take work whatever its recorded health ('' when nothing stops it)."""
    silent = device_stale(device, now)
    if silent is not None:
        return f"{STALE} ({stale_reason(silent)}: are `gpumonitor` and `gpuworkers` running on {device.host}?)"
    if device.host in stores:
        return f"paused (the media store of {device.host} is unhealthy: {stores[device.host]})"
    return ""


def device_has_pending_work(device: Device) -> bool:
    """Is there queued work this device's worker may run (now, or once re-enqueued), or running
    work whose failure could bring a retry? (When a burst worker may stop.)"""
    waiting = Assignment.objects.filter(state=AssignmentState.QUEUED)
    mine = waiting.filter(planned_device=device) | waiting.filter(pinned=False)
    return mine.exists() or Assignment.objects.filter(state=AssignmentState.RUNNING).exists()


def saturation(kind: str) -> int:
    return int(samples_config()["GPU_SATURATION"]) if kind == DeviceKind.CUDA else 1


def device_backlogs() -> dict[int, tuple[int, int]]:
    """(queued images planned on, running images on) per device id."""
    queued = (
        Assignment.objects.filter(state=AssignmentState.QUEUED)
        .values("planned_device")
        .annotate(total_images=Sum("image_count"))
    )
    running = (
        Assignment.objects.filter(state=AssignmentState.RUNNING)
        .values("device")
        .annotate(total_images=Sum("image_count"))
    )
    backlog: dict[int, tuple[int, int]] = {}
    for row in queued:
        backlog[row["planned_device"]] = (int(row["total_images"] or 0), 0)
    for row in running:
        if row["device"] is not None:
            q, _ = backlog.get(row["device"], (0, 0))
            backlog[row["device"]] = (q, int(row["total_images"] or 0))
    return backlog


def device_views(devices: list[Device] | None = None, *, readings: bool = True) -> list[DeviceView]:
    """What placement knows of each device; `readings=False` leaves out the latest snapshot
    (memory, utilization, temperature) where only health, worker, speed and backlog count."""
    devices = [d for d in (Device.objects.all() if devices is None else devices) if d.retired_at is None]
    snapshots = latest_snapshots([d.pk for d in devices]) if readings else {}
    backlogs = device_backlogs()
    stores = stores_unhealthy()
    now = db_now()
    views = []
    for device in devices:
        snap = snapshots.get(device.pk)
        queued, running = backlogs.get(device.pk, (0, 0))
        blocked = device_blocked(device, now, stores)
        views.append(
            DeviceView(
                id=device.pk,
                label=device.label,
                kind=device.kind,
                healthy=device.health == Health.HEALTHY and not blocked,
                blocked=blocked,
                worker_alive=worker_alive(device, now),
                memory_used=snap.memory_used if snap else None,
                memory_total=(snap.memory_total if snap else None) or device.memory_total or None,
                utilization=snap.utilization if snap else None,
                temperature=snap.temperature if snap else None,
                speed=device.speed,
                saturation=saturation(device.kind),
                queued_images=queued,
                running_images=running,
            )
        )
    return views


def steal_sources(thief_id: int) -> set[int]:
    """The devices whose queue the idle worker of `thief_id` should take work from now.

    The size of a device's next call is not known before the pop; its largest queued chunk
    stands for it, so a slow thief errs towards leaving work to a fast owner.
    """
    views = {view.id: view for view in device_views(readings=False)}
    thief = views.get(thief_id)
    if thief is None:
        return set()
    largest = (
        Assignment.objects.filter(state=AssignmentState.QUEUED, pinned=False)
        .exclude(planned_device=thief_id)
        .values("planned_device")
        .annotate(size=Max("image_count"))
    )
    return {
        row["planned_device"]
        for row in largest
        if row["planned_device"] in views and steal_pays(thief, views[row["planned_device"]], int(row["size"]))
    }


def placement_sequence() -> int:
    """A number that grows with every placement, for round-robin turns."""
    last = Assignment.objects.order_by("-id").values_list("id", flat=True).first()
    return int(last or 0)


def device_resolve(text: str, *, host: str | None = None) -> Device | None:
    """Find a device by database id, UUID (or its prefix), NVML index on this host, or 'cpu'."""
    text = text.strip()
    if not text or not text.isprintable() or len(text) > 96:
        return None  # no device has such a name (and PostgreSQL refuses NUL in a query)
    host = host or gpu_config()["HOST"]
    here = Device.objects.filter(host=host)
    if text.lower() == "cpu":
        return here.filter(kind=DeviceKind.CPU).first()
    if is_ascii_int(text) and len(text) < 10:
        return here.filter(index=int(text)).exclude(kind=DeviceKind.CPU).first()
    exact = here.filter(uuid=text).first() or Device.objects.filter(uuid=text).first()
    if exact:
        return exact
    if len(text) >= 6:
        matches = list(Device.objects.filter(uuid__istartswith=text)[:2])
        if len(matches) == 1:
            return matches[0]
    return None


def device_status(now: datetime | None = None) -> list[dict[str, Any]]:
    """Every device with its latest snapshot, health, worker and current job, as plain data
    (ages by the database's clock: `now` is clock.db_now(), read once per page)."""
    now = now or db_now()
    here = gpu_config()["HOST"]
    devices = list(
        Device.objects.filter(retired_at__isnull=True).select_related("current_assignment__request__persona")
    )
    snapshots = latest_snapshots([d.pk for d in devices])
    backlogs = device_backlogs()
    rows = []
    for device in devices:
        snap = snapshots.get(device.pk)
        silent = device_stale(device, now)
        alive = worker_alive(device, now)
        missing = ""
        if not alive and device.worker_name and device.worker_seen_at is not None:
            missing = f"no heartbeat for {age_text((now - device.worker_seen_at).total_seconds())}"
        # A worker's process can be looked for only on its own host (by host id, never by name):
        # there, a SIGKILLed worker shows as missing at once instead of `busy` until its lease runs out.
        if alive and device.worker_host == here and device.worker_pid and not pid_alive(device.worker_pid):
            alive, missing = False, f"process {device.worker_pid} is gone"
        current = device.current_assignment if alive else None
        queued, running = backlogs.get(device.pk, (0, 0))
        rows.append(
            {
                "id": device.pk,
                "label": device.label,
                "name": device.name,
                "uuid": device.uuid,
                "short_uuid": device.short_uuid,
                "host": device.host,
                "index": device.index,
                "kind": device.kind,
                # A stale device shows as such, whatever health it last recorded (kept beside it).
                "health": STALE if silent is not None else device.health,
                "health_reason": stale_reason(silent) if silent is not None else device.health_reason,
                "health_changed_at": _iso(device.health_changed_at),
                "recorded_health": device.health,
                "recorded_health_reason": device.health_reason,
                "stale_seconds": None if silent is None else round(silent, 1),
                "last_seen": _iso(device.last_seen),
                "last_seen_age_seconds": round((now - device.last_seen).total_seconds(), 1)
                if device.last_seen
                else None,
                "snapshot": None
                if snap is None
                else {
                    "taken_at": _iso(snap.taken_at),
                    "age_seconds": round((now - snap.taken_at).total_seconds(), 1),
                    "memory_used": snap.memory_used,
                    "memory_total": snap.memory_total or device.memory_total or None,
                    "utilization": snap.utilization,
                    "temperature": snap.temperature,
                    "power_watts": snap.power_watts,
                    "throttle_reasons": [r for r in snap.throttle_reasons.split(",") if r],
                    "error": snap.error,
                },
                "worker": {
                    "state": device.worker_state if alive else "missing",
                    "name": device.worker_name if alive else "",
                    "pid": device.worker_pid if alive else None,
                    "missing_reason": missing,
                    "heartbeat_age_seconds": round((now - device.worker_seen_at).total_seconds(), 1)
                    if device.worker_seen_at
                    else None,
                },
                "current_job": None
                if current is None
                else {
                    "job_id": current.job_id,
                    "assignment": current.pk,
                    "persona": current.request.persona.name if current.request else "(canary)",
                    "persona_id": current.request.persona_id if current.request else None,
                    "images": current.image_count,
                    "running_since": _iso(current.started_at),
                    "running_seconds": round((now - current.started_at).total_seconds(), 1)
                    if current.started_at
                    else None,
                },
                "queued_images": queued,
                "running_images": running,
            }
        )
    return rows


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- the GPU status page ------------------------------------------------------------------------


class EpochSeconds(Func):
    """Seconds since the Unix epoch of a datetime column, as a float, on SQLite and PostgreSQL."""

    arity = 1
    output_field = FloatField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django keeps SQLite datetimes as naive UTC text, which julianday() reads, fractions and all.
        template = "((julianday(%(expressions)s) - 2440587.5) * 86400.0)"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "EXTRACT(EPOCH FROM %(expressions)s)::double precision"
        return self.as_sql(compiler, connection, template=template, **extra)


# (device id, bucket_seconds, slot, first/last/mean seconds since the window's start,
#  mean memory_used, largest memory_total, mean utilization, mean temperature)
HistoryRow = tuple[Any, ...]
HISTORY_COLUMNS = (
    "device_id",
    "bucket_seconds",
    "slot",
    "first",
    "last",
    "mean",
    "used",
    "total",
    "utilization",
    "temperature",
)


def snapshot_history(
    *, device_ids: list[int], since: datetime, until: datetime, slot_seconds: float
) -> list[HistoryRow]:
    """Readings of these devices in [since, until], averaged per slot of `slot_seconds`; raw
    readings (bucket_seconds=0) and downsampled averages come in separate rows.

    The (device, taken_at) index finds the rows and the database averages them: an hour at a 2 s
    interval is 1,800 readings a device, which cost more to turn into Python datetimes than the
    query itself takes.
    """
    offset = EpochSeconds("taken_at") - Value(since.timestamp())
    rows = (
        Snapshot.objects.filter(device_id__in=device_ids, taken_at__gte=since, taken_at__lte=until)
        .annotate(offset=offset, slot=Floor(F("offset") / Value(float(slot_seconds))))
        .values("device_id", "bucket_seconds", "slot")
        .annotate(
            first=Min("offset"),
            last=Max("offset"),
            mean=Avg("offset"),
            used=Avg("memory_used"),
            total=Max("memory_total"),
            utilization=Avg("utilization"),
            temperature=Avg("temperature"),
        )
        .order_by("device_id", "slot", "bucket_seconds")
        .values_list(*HISTORY_COLUMNS)
    )
    return [(row[0], row[1], int(row[2]), *row[3:]) for row in rows]


SPAN_FIELDS = (
    "id",
    "job_id",
    "state",
    "first_index",
    "image_count",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "device_id",
    "request__persona_id",
    "request__persona__name",
)


def assignments_between(*, device_ids: list[int], since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Attempts that ran on these devices at some time in [since, until], oldest first, as SPAN_FIELDS dicts."""
    config = gpu_config()
    # An attempt cannot run longer than its job timeout plus the watchdog's grace (then the
    # watchdog kills it and the reaper closes the row), so attempts that overlap the window
    # started at most that long before it: the bound lets the (device, started_at) index do the
    # work instead of walking every attempt a device ever ran. Running rows are taken whatever
    # their age so a stuck one still shows. At least an hour, in case the timeout was shortened.
    longest = max(
        float(samples_config()["JOB_TIMEOUT"]) + float(config["WATCHDOG_GRACE"]) + float(config["LEASE_SECONDS"]),
        3600.0,
    )
    ran = Assignment.objects.filter(device_id__in=device_ids, started_at__lte=until)
    recent = ran.filter(started_at__gte=since - timedelta(seconds=longest))
    overlapping = (
        recent.filter(finished_at__gte=since)
        | recent.filter(finished_at__isnull=True)
        | ran.filter(state=AssignmentState.RUNNING)
    )
    return list(overlapping.order_by("started_at", "id").values(*SPAN_FIELDS))


def assignments_recent(*, device_id: int | None = None, state: str | None = None, limit: int = 50) -> list[Assignment]:
    """The newest attempts, optionally only those on one device (ran there, or queued for it) or in one state."""
    rows = Assignment.objects.select_related("request__persona", "device", "planned_device")
    if device_id is not None:
        rows = rows.filter(device_id=device_id) | rows.filter(device__isnull=True, planned_device_id=device_id)
    if state:
        rows = rows.filter(state=state)
    # Newest by id, not queued_at: ids grow with queued_at and the primary key needs no extra index.
    return list(rows.order_by("-id")[:limit])
