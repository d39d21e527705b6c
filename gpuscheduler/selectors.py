"""Reads: the latest state of every device, as policies and pages need it."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from django.db.models import (
    FloatField,
    Func,
    OuterRef,
    Q,
    Subquery,
)

from config.numbers import is_ascii_int
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import gpu_config, lease, stale_after
from gpuscheduler.models import (
    Assignment,
    AssignmentState,
    Device,
    DeviceKind,
    Snapshot,
)
from gpuscheduler.policies import Limits, stale_reason, stale_seconds

# Not a stored health: a device nobody has heard of for stale_after() shows this instead.
STALE = "stale"


def latest_snapshots(device_ids: list[int] | None = None) -> dict[int, Snapshot]:
    """The newest snapshot of every device, in one query that walks the (device, taken_at) index
    (the status page: placement reads the copy of the latest reading on the device row)."""
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
    return blocked_reason(host=device.host, silent=device_stale(device, now), store_problem=stores.get(device.host))


def blocked_reason(*, host: str, silent: float | None, store_problem: str | None) -> str:
    """device_blocked's words: `silent` as device_stale gives it, `store_problem` why the media
    store of the device's host is unhealthy (None while it is healthy)."""
    if silent is not None:
        return f"{STALE} ({stale_reason(silent)}: are `gpumonitor` and `gpuworkers` running on {host}?)"
    if store_problem is not None:
        return f"paused (the media store of {host} is unhealthy: {store_problem})"
    return ""


def device_has_pending_work(device: Device) -> bool:
    """Is there queued work this device's worker may run (now, or once re-enqueued), or running
    work whose failure could bring a retry? (When a burst worker may stop.)"""
    waiting = Assignment.objects.filter(state=AssignmentState.QUEUED)
    mine = waiting.filter(planned_device=device) | waiting.filter(pinned=False)
    return mine.exists() or Assignment.objects.filter(state=AssignmentState.RUNNING).exists()


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
