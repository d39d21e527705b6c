"""What placement reads: each device with its reading, curve, liveness and model state, and the
work already on each (a fixed number of queries whatever the number of devices and snapshots),
and which devices' queues an idle worker should steal from. Other reads of the scheduler are in
gpuscheduler/selectors.py.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, NamedTuple

from django.db import connection
from django.db.models import (
    BooleanField,
    Case,
    ExpressionWrapper,
    F,
    FilteredRelation,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
)
from django.db.models.functions import Coalesce, Greatest

from gpuscheduler import workloads
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.compiled import compiled_rows
from gpuscheduler.conf import gpu_config, lease, samples_config, stale_after
from gpuscheduler.costs import curves_for
from gpuscheduler.curves import Curve
from gpuscheduler.models import Assignment, AssignmentState, Device, Health, MediaStore, ModelState
from gpuscheduler.policies import DeviceView, steal_pays
from gpuscheduler.selectors import EpochSeconds, blocked_reason, live_worker


def device_backlogs() -> dict[int, tuple[int, int]]:
    """(queued images planned on, running images on) per device id: one aggregate over the live
    attempts, which their partial index finds whatever the history."""
    return device_backlogs_for(None)[0]


# What each device has queued and running, by model: (the model of its newest work, every model
# of its live work). A call of another model starts only after that work, so the device's
# pipeline cache holds what that work loads (views_with).
Live = tuple[str | None, frozenset[str | None]]


def device_backlogs_for(model: str | None, *, after: str = "") -> tuple[dict[int, tuple[int, int]], dict[int, Live]]:
    """device_backlogs, and the models of each device's live work (Live). One query, sent after
    the statement `after` in the same round trip where one is given (compiled_rows)."""
    backlog: dict[int, tuple[int, int]] = {}
    newest: dict[int, tuple[Any, str | None]] = {}
    models: dict[int, set[str | None]] = {}
    queued_state = str(AssignmentState.QUEUED)  # once: placement reads these rows in its turn
    for device_id, state, of_model, images, newest_id in compiled_rows(("backlogs",), _backlog_rows, after=after):
        if device_id is None:
            continue
        is_queued = state == queued_state
        queued, running = backlog.get(device_id, (0, 0))
        if is_queued:
            queued += int(images or 0)
        else:
            running += int(images or 0)
        backlog[device_id] = (queued, running)
        models.setdefault(device_id, set()).add(of_model)
        # Queued work runs after the running call: the newest queued chunk's model is the last loaded.
        rank = (is_queued, newest_id)
        if device_id not in newest or rank > newest[device_id][0]:
            newest[device_id] = (rank, of_model)
    live = {device_id: (newest[device_id][1], frozenset(of)) for device_id, of in models.items()}
    return backlog, live


def will_have(model: str, *, warm_now: bool, live: Live | None, slots: int) -> bool:
    """Will a device have `model` loaded when a call of it, queued now, starts? Without live work:
    if it has it warm now. With some: if its newest work is of that model, or if that model (warm
    now or among its work) fits in its pipeline cache beside the models its work loads."""
    if live is None:
        return warm_now
    newest, models = live
    if newest == model:
        return True
    return (warm_now or model in models) and len(models | {model}) <= slots


def _backlog_rows() -> QuerySet[Any]:
    on = Case(When(state=AssignmentState.QUEUED, then=F("planned_device_id")), default=F("device_id"))
    return (
        Assignment.objects.filter(state__in=[AssignmentState.QUEUED, AssignmentState.RUNNING])
        .annotate(on=on)
        .order_by()
        .values_list("on", "state", "request__model")
        .annotate(total=Sum("image_count"), newest=Max("id"))  # ids grow with time; ints parse fast
    )


class PlacementRow(NamedTuple):
    """What placement reads of one device (placement_rows). A tuple, not a dataclass: placement
    makes 64 of these per press, and a 21-field frozen dataclass took 5 us each to build."""

    id: int
    host: str
    index: int | None  # type: ignore[assignment]  # Device.index; shadows tuple.index, which nothing calls
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
    model_state: str | None  # DeviceModel's for the model placed for, if its worker reported one
    model_load_seconds: float | None
    model_reason: str | None

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
        loaded = FilteredRelation("device_models", condition=Q(device_models__model=model))
        return rows.annotate(
            own=own,
            loaded=loaded,
            alive=ExpressionWrapper(live_worker(), output_field=BooleanField()),
            silent=EpochSeconds(DbNow()) - EpochSeconds(heard),
            store_problem=Subquery(problem),
        ).values_list(
            *PlacementRow._fields[:10],
            "alive",
            "silent",
            "store_problem",
            "own__fixed_seconds",
            "own__per_image_seconds",
            "own__knee",
            "own__calls",
            "own__sizes",
            "loaded__state",
            "loaded__load_seconds",
            "loaded__reason",
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
    if model is None:
        model, default_steps = workloads.default_key_and_steps()
        steps = steps or default_steps
    reads = device_reads(devices, readings=readings, model=model, steps=steps)
    return views_with(reads, *device_backlogs_for(model), model=model)


# A DeviceView's fields but its backlog, as keyword arguments (views_with adds the backlog).
DeviceRead = dict[str, Any]


def device_reads(
    devices: list[Device] | None = None, *, readings: bool = True, model: str | None = None, steps: int | None = None
) -> list[DeviceRead]:
    """device_views without the work on each device: what placement reads before its turn."""
    config = samples_config()
    if model is None:
        model, default_steps = workloads.default_key_and_steps()
        steps = steps or default_steps
    model, steps = model[:300], int(steps or config["STEPS"])
    rows = placement_rows(None if devices is None else [d.pk for d in devices], model=model, steps=steps)
    borrowed: dict[int, Curve] = {}
    if any(row.curve_fixed is None for row in rows):
        borrowed = curves_for([row.id for row in rows], model=model, steps=steps)  # peers' or the prior
    stale_limit = stale_after().total_seconds()
    limit = int(config["MAX_BATCH"])
    best: dict[Curve, int] = {}
    affinity = bool(gpu_config()["MODEL_AFFINITY"])
    measured = [float(r.model_load_seconds) for r in rows if r.model_load_seconds is not None]
    peers_load = statistics.median(measured) if measured else None
    # Once, not per device: an enum member's lookup costs more than the comparison.
    failed, warm_state, healthy = str(ModelState.FAILED), str(ModelState.WARM), str(Health.HEALTHY)
    reads = []
    for row in rows:
        if row.id in borrowed:
            curve = borrowed[row.id]
            if curve not in best:
                best[curve] = curve.best_size(limit)  # costs.best_call_size, once per distinct curve
            batch = best[curve]
        else:
            curve, batch = _learned(row, limit)
        blocked = ""
        if row.silent > stale_limit or row.store_problem is not None:
            blocked = blocked_reason(
                host=row.host,
                silent=row.silent if row.silent > stale_limit else None,  # as policies.stale_seconds
                store_problem=row.store_problem,
            )
        if not blocked and row.model_state == failed:
            blocked = f"{MODEL_FAILED} ({(row.model_reason or 'no reason given')[:300]})"
        warm = row.model_state == warm_state
        reads.append(
            {
                "id": row.id,
                "label": row.label,
                "kind": row.kind,
                "healthy": row.health == healthy and not blocked,
                "blocked": blocked,
                "worker_alive": bool(row.alive),
                "memory_used": row.memory_used if readings else None,
                "memory_total": row.memory_total or None,
                "utilization": row.utilization if readings else None,
                "temperature": row.temperature if readings else None,
                "curve": curve,
                "batch": batch,
                "warm": warm or not affinity,
                # What loading it costs here, counted where it will not be warm (views_with).
                "load_seconds": _load_guess(row.model_load_seconds, peers_load) if affinity else 0.0,
            }
        )
    return reads


# Every device as this process's last press read it, by what it was read for: (when, on
# time.monotonic(), taken before the read; the reads). recent_device_reads says why reusing it is safe.
_RECENT: dict[tuple[Any, ...], tuple[float, list[DeviceRead]]] = {}


def recent_device_reads(*, model: str, steps: int | None) -> list[DeviceRead]:
    """device_reads of every device for a press: this process's last read, while it is at most
    GPU_PLACEMENT_READ_SECONDS old (0.5 s; 0 reads on every press), else a new one.

    Reading the devices was a third of a press's placement (bench/bench_placement.py: a round trip
    and 0.5 ms of the database's time for 64 devices, then making 64 reads). Reusing a read half a
    second old loses nothing that placement guarantees:
    - the backlogs, which keep the per-device accounting exact, are still read in every turn;
    - a reading is already up to GPU_MONITOR_INTERVAL (2 s) old when it is read, a device goes
      stale only after GPU_LEASE_SECONDS, and the read was never taken in the turn anyway;
    - a device that turns unhealthy, loses its worker or fails to load the model within that half
      second may still be chosen, as it could be by a press whose read came just before the
      change: its worker admits no work while its device is not healthy (gpuscheduler/worker.py),
      and the other workers steal its queue.
    Retries and pinned presses read the devices anew (assignments_place).
    """
    max_age = float(gpu_config()["PLACEMENT_READ_SECONDS"])
    if max_age <= 0:
        return device_reads(model=model, steps=steps)
    # Whatever else device_reads' result depends on: the database, and the settings it reads.
    key = (
        connection.alias,
        str(connection.settings_dict["NAME"]),
        model,
        steps,
        lease(),
        stale_after(),
        samples_config()["MAX_BATCH"],
        gpu_config()["MODEL_AFFINITY"],
    )
    now = time.monotonic()
    found = _RECENT.get(key)
    if found is not None and now - found[0] < max_age:
        return found[1]
    reads = device_reads(model=model, steps=steps)
    if len(_RECENT) >= 64:
        _RECENT.clear()
    _RECENT[key] = (now, reads)
    return reads


def forget_device_reads() -> None:
    """The next press reads the devices anew (a test's or a benchmark's devices changed under it)."""
    _RECENT.clear()


# Each device's own curve as placement last read it, with its best call size: the same few curves
# come back on every press, and building a Curve and its best size for each of 64 devices took
# a fifth of a millisecond. Keyed by the row's values (a curve learned anew is a new key), cleared
# when it grows past what any cluster has.
_LEARNED: dict[tuple[Any, ...], tuple[Curve, int]] = {}


def _learned(row: PlacementRow, limit: int) -> tuple[Curve, int]:
    """The device's own curve (as costs.curve_from_row makes it) and its best call size."""
    key = (row.curve_fixed, row.curve_per_image, row.curve_knee, row.curve_calls, row.curve_sizes, limit)
    found = _LEARNED.get(key)
    if found is None:
        curve = Curve(
            fixed=float(row.curve_fixed or 0.0),
            per_image=float(row.curve_per_image or 0.0),
            knee=float(row.curve_knee or 1.0),
            calls=int(row.curve_calls or 0),
            sizes=int(row.curve_sizes or 0),
            source="learned",
        )
        if len(_LEARNED) >= 4096:
            _LEARNED.clear()
        found = _LEARNED[key] = (curve, curve.best_size(limit))  # costs.best_call_size
    return found


# Why a device may not take work of a model that failed to load on it (its other models go on).
MODEL_FAILED = "unable to load this model"
# What loading a model is guessed to cost on a device where nobody has loaded it yet: enough to
# prefer a device that has it warm when queues are even, not enough to wait long for one.
LOAD_GUESS_SECONDS = 5.0


def _load_guess(own: float | None, peers: float | None) -> float:
    """Its own measured load time for the model, else the median of its peers', else the guess."""
    if own is not None:
        return float(own)
    return float(peers) if peers is not None else LOAD_GUESS_SECONDS


def views_with(
    reads: list[DeviceRead],
    backlogs: dict[int, tuple[int, int]],
    live: dict[int, Live] | None = None,
    model: str | None = None,
) -> list[DeviceView]:
    """The devices as device_reads read them, with these backlogs; with model affinity, each device
    counts as warm for `model` where it will have it loaded when a new call of it starts
    (will_have: its live work may load it, or evict it, first)."""
    config = gpu_config()
    slots = int(config["MODEL_CACHE"])  # the cluster's GPU_MODEL_CACHE, as this process has it
    affinity = bool(config["MODEL_AFFINITY"]) and model is not None and live is not None
    views = []
    for read in reads:
        queued, running = backlogs.get(read["id"], (0, 0))
        if affinity and model is not None and live is not None:
            warm = will_have(model, warm_now=read["warm"], live=live.get(read["id"]), slots=slots)
            if warm != read["warm"]:
                read = {**read, "warm": warm}
        key = (*read.values(), queued, running)  # every read has device_reads' keys, in its order
        view = _VIEWS.get(key)
        if view is None:
            if len(_VIEWS) >= 4096:
                _VIEWS.clear()
            view = _VIEWS[key] = DeviceView(**read, queued_images=queued, running_images=running)
        views.append(view)
    return views


# The views made lately, by every field they were made of: a view is frozen, so two placements that
# see a device alike share one, and its backlog in seconds is worked out once (backlog_seconds).
# From one press to the next most devices are seen alike (a reading changes every few seconds,
# a backlog where work was placed or finished): making 64 views and their backlogs took a quarter
# of a millisecond of every turn.
_VIEWS: dict[tuple[Any, ...], DeviceView] = {}


def steal_sources(thief_id: int) -> set[int]:
    """The devices whose queue the idle worker of `thief_id` should take work from now.

    The size of a device's next call is not known before the pop; its largest queued chunk of
    each model stands for it, so a slow thief errs towards leaving work to a fast owner. Each
    model is judged on the views for it (policies.steal_pays): a thief without the model warm
    counts loading it, and one where the model failed to load takes none of it. The owner's
    running call counts only what is left of it, by its curve and when it started.
    """
    largest = list(
        Assignment.objects.filter(state=AssignmentState.QUEUED, pinned=False)
        .exclude(planned_device=thief_id)
        .values_list("planned_device", "request__model", "request__steps")
        .annotate(size=Max("image_count"))
        .order_by()
    )
    if not largest:
        return set()
    now = db_now()
    started = dict(
        Assignment.objects.filter(state=AssignmentState.RUNNING, device__isnull=False)
        .order_by()
        .values_list("device")
        .annotate(first=Min("started_at"))
    )

    def running_left(view: DeviceView) -> float | None:
        first = started.get(view.id)
        if first is None or not view.running_images:
            return None
        return view.curve.cost(view.running_images) - (now - first).total_seconds()

    by_model: dict[tuple[str | None, int | None], dict[int, DeviceView]] = {}
    sources = set()
    for owner_id, model, steps, size in largest:
        if (model, steps) not in by_model:
            by_model[model, steps] = {v.id: v for v in device_views(readings=False, model=model, steps=steps)}
        views = by_model[model, steps]
        thief, owner = views.get(thief_id), views.get(owner_id)
        if thief is None or owner is None or thief.blocked.startswith(MODEL_FAILED):
            continue
        if steal_pays(thief, owner, int(size), running_left=running_left(owner)):
            sources.add(owner_id)
    return sources


def placement_sequence() -> int:
    """A number that grows with every placement, for round-robin turns."""
    last = Assignment.objects.order_by("-id").values_list("id", flat=True).first()
    return int(last or 0)
