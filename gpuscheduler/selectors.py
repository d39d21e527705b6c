"""Reads: the latest state of every device, as policies and pages need it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import (
    BooleanField,
    Case,
    ExpressionWrapper,
    F,
    FilteredRelation,
    FloatField,
    Func,
    Max,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
)
from django.db.models.functions import Coalesce, Greatest

from config.numbers import is_ascii_int
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import gpu_config, lease, samples_config, stale_after
from gpuscheduler.costs import curves_for
from gpuscheduler.curves import Curve
from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceKind, Health, MediaStore, Snapshot
from gpuscheduler.policies import DeviceView, Limits, stale_reason, stale_seconds, steal_pays

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


def device_backlogs() -> dict[int, tuple[int, int]]:
    """(queued images planned on, running images on) per device id: one aggregate over the live
    attempts, which their partial index finds whatever the history."""
    backlog: dict[int, tuple[int, int]] = {}
    for device_id, state, images in compiled_rows(("backlogs",), _backlog_rows):
        if device_id is None:
            continue
        queued, running = backlog.get(device_id, (0, 0))
        if state == AssignmentState.QUEUED:
            queued = int(images or 0)
        else:
            running = int(images or 0)
        backlog[device_id] = (queued, running)
    return backlog


def _backlog_rows() -> QuerySet[Any]:
    on = Case(When(state=AssignmentState.QUEUED, then=F("planned_device_id")), default=F("device_id"))
    return (
        Assignment.objects.filter(state__in=[AssignmentState.QUEUED, AssignmentState.RUNNING])
        .annotate(on=on)
        .order_by()
        .values_list("on", "state")
        .annotate(total=Sum("image_count"))
    )


# Placement runs the same two reads for every press, and Django compiles a queryset anew each time
# it is evaluated: on a 2-core machine, building and compiling the device read took 4 ms and
# running it 1.4 ms (bench/bench_placement.py). So these are compiled once per process (for each
# database vendor and whatever else their SQL holds: model, step count, lease) and run as plain
# SQL, rows as tuples.
_COMPILED: dict[tuple[Any, ...], tuple[str, tuple[Any, ...]]] = {}


def compiled_rows(key: tuple[Any, ...], build: Callable[[], QuerySet[Any]]) -> list[tuple[Any, ...]]:
    """The rows of `build()` (a values_list queryset), its SQL compiled once per `key` and vendor."""
    full_key = (connection.vendor, *key)
    if full_key not in _COMPILED:
        sql, params = build().query.sql_with_params()
        _COMPILED[full_key] = (sql, tuple(params))
    sql, params = _COMPILED[full_key]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


@dataclass(frozen=True, slots=True)
class PlacementRow:
    """What placement reads of one device (placement_rows)."""

    id: int
    host: str
    index: int | None
    name: str
    kind: str
    health: str
    memory_total: int
    memory_used: int | None
    utilization: float | None
    temperature: float | None
    alive: bool  # as live_worker
    silent: float  # seconds since anyone heard of it, as device_stale counts them
    store_problem: str | None  # why its host's media store is unhealthy
    curve_fixed: float | None  # its own curve for the model and step count, if it has one
    curve_per_image: float | None
    curve_knee: float | None
    curve_calls: int | None
    curve_sizes: int | None

    @property
    def label(self) -> str:
        # Device.label of these fields (kind, host, index, name), with no model instance to make.
        return str(Device.label.fget(self))  # type: ignore[attr-defined]


def placement_rows(device_ids: list[int] | None = None, *, model: str, steps: int) -> list[PlacementRow]:
    """Every device that is not retired (of `device_ids` only, when given) as placement reads it:
    one query whatever the number of devices and snapshots, and no datetime to parse; every time
    is judged by the database, whose clock is the cluster's (gpuscheduler/clock.py). The latest
    reading is its copy on the device row (services.snapshots_record and device_observe write it).
    """

    def build() -> QuerySet[Any]:
        heard = Greatest(Coalesce("last_seen", "created"), Coalesce("worker_seen_at", "created"), "created")
        problem = MediaStore.objects.filter(host=OuterRef("host"), healthy=False).values("reason")[:1]
        rows = Device.objects.filter(retired_at__isnull=True)
        if device_ids is not None:
            rows = rows.filter(pk__in=device_ids)
        own = FilteredRelation("cost_curves", condition=Q(cost_curves__model=model, cost_curves__steps=steps))
        return rows.annotate(
            own=own,
            alive=ExpressionWrapper(live_worker(), output_field=BooleanField()),
            silent=EpochSeconds(DbNow()) - EpochSeconds(heard),
            store_problem=Subquery(problem),
        ).values_list(
            *(field.name for field in fields(PlacementRow)[:10]),
            "alive",
            "silent",
            "store_problem",
            "own__fixed_seconds",
            "own__per_image_seconds",
            "own__knee",
            "own__calls",
            "own__sizes",
        )

    if device_ids is not None:
        return [PlacementRow(*row) for row in build()]
    key = ("placement", model, steps, lease().total_seconds())
    return [PlacementRow(*row) for row in compiled_rows(key, build)]


def device_views(
    devices: list[Device] | None = None, *, readings: bool = True, model: str | None = None, steps: int | None = None
) -> list[DeviceView]:
    """What placement knows of each device (of `devices` only, read again, when given), with its
    learned cost curve for this model and step count (the default ones when not given);
    `readings=False` leaves out the latest reading (memory, utilization, temperature) where only
    health, worker, curve and backlog count. Two queries whatever the number of devices and
    snapshots; one more while a device has no curve of its own.
    """
    return views_with(device_reads(devices, readings=readings, model=model, steps=steps), device_backlogs())


# A DeviceView's fields but its backlog, as keyword arguments (views_with adds the backlog).
DeviceRead = dict[str, Any]


def device_reads(
    devices: list[Device] | None = None, *, readings: bool = True, model: str | None = None, steps: int | None = None
) -> list[DeviceRead]:
    """device_views without the work on each device: what placement reads before its turn."""
    config = samples_config()
    model, steps = (model or config["MODEL"])[:300], int(steps or config["STEPS"])
    rows = placement_rows(None if devices is None else [d.pk for d in devices], model=model, steps=steps)
    borrowed: dict[int, Curve] = {}
    if any(row.curve_fixed is None for row in rows):
        borrowed = curves_for([row.id for row in rows], model=model, steps=steps)  # peers' or the prior
    stale_limit = stale_after().total_seconds()
    limit = int(config["MAX_BATCH"])
    best: dict[Curve, int] = {}
    reads = []
    for row in rows:
        curve = borrowed.get(row.id) or Curve(  # as costs.curve_from_row
            fixed=float(row.curve_fixed or 0.0),
            per_image=float(row.curve_per_image or 0.0),
            knee=float(row.curve_knee or 1.0),
            calls=int(row.curve_calls or 0),
            sizes=int(row.curve_sizes or 0),
            source="learned",
        )
        if curve not in best:
            best[curve] = curve.best_size(limit)  # costs.best_call_size, once per distinct curve
        blocked = blocked_reason(
            host=row.host,
            silent=row.silent if row.silent > stale_limit else None,  # as policies.stale_seconds
            store_problem=row.store_problem,
        )
        reads.append(
            {
                "id": row.id,
                "label": row.label,
                "kind": row.kind,
                "healthy": row.health == Health.HEALTHY and not blocked,
                "blocked": blocked,
                "worker_alive": bool(row.alive),
                "memory_used": row.memory_used if readings else None,
                "memory_total": row.memory_total or None,
                "utilization": row.utilization if readings else None,
                "temperature": row.temperature if readings else None,
                "curve": curve,
                "batch": best[curve],
            }
        )
    return reads


def views_with(reads: list[DeviceRead], backlogs: dict[int, tuple[int, int]]) -> list[DeviceView]:
    """The devices as device_reads read them, with these backlogs (device_backlogs)."""
    views = []
    for read in reads:
        queued, running = backlogs.get(read["id"], (0, 0))
        views.append(DeviceView(**read, queued_images=queued, running_images=running))
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
