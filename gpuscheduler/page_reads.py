"""Reads for the GPU status page and `gpustatus`: every device as plain data, the snapshot
history averaged per slot, and the attempts that ran in a window (selectors.py has the reads
placement needs)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Avg, F, Max, Min, Value
from django.db.models.functions import Floor

from gpuscheduler import workloads
from gpuscheduler.clock import db_now
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.costs import curves_for
from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceModel, ModelState, Snapshot
from gpuscheduler.placement_reads import device_backlogs
from gpuscheduler.policies import age_text, stale_reason
from gpuscheduler.selectors import STALE, EpochSeconds, device_stale, latest_snapshots, pid_alive, worker_alive


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


def history_start(*, device_ids: list[int], since: datetime) -> datetime | None:
    """The oldest reading of these devices at or after `since` (one aggregate on the
    (device, taken_at) index): where the status page's charts have something to draw from."""
    if not device_ids:
        return None
    first: datetime | None = Snapshot.objects.filter(device_id__in=device_ids, taken_at__gte=since).aggregate(
        first=Min("taken_at")
    )["first"]
    return first


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


def cost_texts(device_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each device's learned cost curve for the default model and steps, as the page shows it:
    "1.24 s a call up to 6.5 images, + 0.169 s per image above; best at 7 (rests on 40 calls)"."""
    limit = int(samples_config()["MAX_BATCH"])
    model, steps = workloads.default_key_and_steps()
    shown = {}
    for device_id, curve in curves_for(device_ids, model=model, steps=steps).items():
        shown[device_id] = {
            "model": model,
            "steps": steps,
            "text": curve.describe(limit),
            "fixed_seconds": round(curve.fixed, 4),
            "per_image_seconds": round(curve.per_image, 4),
            "knee": curve.knee,
            "best_size": curve.best_size(limit),
            "calls": curve.calls,
            "source": curve.source,
        }
    return shown


def model_texts(device_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The models each device's worker reported (one query): warm ones first, then the models
    it evicted and the ones it could not load, with their load times and reasons."""
    order = {ModelState.WARM: 0, ModelState.EVICTED: 1, ModelState.FAILED: 2}
    shown: dict[int, list[dict[str, Any]]] = {device_id: [] for device_id in device_ids}
    for row in DeviceModel.objects.filter(device_id__in=device_ids).order_by("model"):
        load = f"loaded in {row.load_seconds:.1f} s" if row.load_seconds is not None else ""
        shown[row.device_id].append(
            {
                "name": row.model.split("@", 1)[0],
                "key": row.model,
                "state": row.state,
                "state_label": row.get_state_display(),
                "load_seconds": row.load_seconds,
                "loads": row.loads,
                "memory_bytes": row.memory_bytes,
                "reason": row.reason,
                "text": ", ".join(part for part in (load, f"{row.loads} load{'s' if row.loads != 1 else ''}") if part),
            }
        )
    for models in shown.values():
        models.sort(key=lambda m: (order.get(m["state"], 3), m["name"]))
    return shown
