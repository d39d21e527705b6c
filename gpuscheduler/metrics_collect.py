"""The scheduler's Prometheus metrics: each device's readings under the DCGM exporter's names, its
health and worker, queue depths in the database and in Redis, attempts, pipeline call durations,
the learned cost curves, the models on each device, and RQ's own metrics.

A fixed number of queries whatever the number of devices: every read is one query over all devices
(gpuscheduler/metrics.py says why everything is read from the database at scrape time).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from django.db.models import BigIntegerField, Count, Subquery, Value
from django.db.models.functions import Coalesce
from django_rq.contrib.prometheus import RQCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpuscheduler.conf import gpu_config
from gpuscheduler.costs import best_call_size, curve_from_row
from gpuscheduler.metrics import gauge_histogram, histogram_counts
from gpuscheduler.models import (
    LIVE_STATES,
    Assignment,
    CostCurve,
    Device,
    DeviceModel,
    Health,
    Host,
    ModelState,
    PipelineCall,
    WorkerState,
)
from gpuscheduler.placement_reads import device_backlogs
from gpuscheduler.queues import REDIS_ERRORS, device_queue_name, queue_depths, redis_connection
from gpuscheduler.selectors import STALE, device_stale, latest_snapshots, pid_alive, worker_alive

log = logging.getLogger(__name__)

# The DCGM exporter's labels (gpu is the NVML index, empty for the CPU), then ours: the host id
# (GPU_HOST, which keys the cluster) and the device's label as the status page shows it.
DEVICE_LABELS = ("gpu", "UUID", "modelName", "Hostname", "host", "name")
HEALTH_STATES = (*Health.values, STALE)
MISSING = "missing"
WORKER_STATES = (*WorkerState.values, MISSING)
MIB = 1024**2
# Pipeline calls: the last 24 hours, and at most the latest 10,000 calls, so a scrape reads a
# bounded slice of a table that grows with every call.
CALL_WINDOW = timedelta(hours=24)
CALL_WINDOW_ROWS = 10_000
# Attempts that ended: those queued in the last 24 hours, at most the latest 50,000 (the live ones all).
ASSIGNMENT_WINDOW = timedelta(hours=24)
ASSIGNMENT_WINDOW_ROWS = 50_000
CALL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)

Labels = dict[int, list[str]]


def scheduler_metrics(now: datetime) -> Iterator[Metric]:
    """Every metric of the scheduler, `now` being the database's time."""
    # Every device, retired ones too: attempts and calls of a retired device keep their labels.
    devices = list(Device.objects.all())
    hostnames = dict(Host.objects.exclude(hostname="").values_list("host", "hostname"))
    labels = {d.pk: device_labels(d, hostnames) for d in devices}
    live = [d for d in devices if d.retired_at is None]
    yield from _readings(live, labels, now)
    yield from _states(live, labels, now)
    yield from _queues(live, labels)
    yield _assignments(labels, now)
    yield _calls(labels, now)
    ids = [d.pk for d in live]
    yield from _curves(ids, labels)
    yield from _models(ids, labels)


def device_labels(device: Device, hostnames: dict[str, str]) -> list[str]:
    return [
        "" if device.index is None else str(device.index),
        device.uuid,
        device.name,
        hostnames.get(device.host, device.host),
        device.host,
        device.label,
    ]


def _readings(devices: list[Device], labels: Labels, now: datetime) -> Iterator[Metric]:
    """The latest reading, from the device row; power from its latest snapshot (one query for all)."""
    snapshots = latest_snapshots([d.pk for d in devices])
    absent = " Absent while the device is stale (no reading or heartbeat for a while)."
    util = GaugeMetricFamily(
        "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %), the latest reading." + absent, labels=DEVICE_LABELS
    )
    used = GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)." + absent, labels=DEVICE_LABELS)
    free = GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)." + absent, labels=DEVICE_LABELS)
    total = GaugeMetricFamily("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", labels=DEVICE_LABELS)
    temp = GaugeMetricFamily("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)." + absent, labels=DEVICE_LABELS)
    power = GaugeMetricFamily(
        "DCGM_FI_DEV_POWER_USAGE", "Power draw (in W), the latest snapshot." + absent, labels=DEVICE_LABELS
    )
    taken = GaugeMetricFamily(
        "gpuscheduler_device_reading_timestamp_seconds",
        "When the device's latest reading was taken (Unix time, the database's clock).",
        labels=DEVICE_LABELS,
    )
    for device in devices:
        values = labels[device.pk]
        snap = snapshots.get(device.pk)
        memory_total = device.memory_total or (snap.memory_total if snap else None) or 0
        if memory_total:
            total.add_metric(values, memory_total / MIB)
        if device.reading_at is not None:
            taken.add_metric(values, device.reading_at.timestamp())
        if device.reading_at is None or device_stale(device, now) is not None:
            continue  # an old reading is not a current value: leave the series absent
        if device.utilization is not None:
            util.add_metric(values, device.utilization)
        if device.memory_used is not None:
            used.add_metric(values, device.memory_used / MIB)
            if memory_total:
                free.add_metric(values, max(memory_total - device.memory_used, 0) / MIB)
        if device.temperature is not None:
            temp.add_metric(values, device.temperature)
        if snap is not None and snap.power_watts is not None:
            power.add_metric(values, snap.power_watts)
    yield from (util, used, free, total, temp, power, taken)


def _states(devices: list[Device], labels: Labels, now: datetime) -> Iterator[Metric]:
    health = GaugeMetricFamily(
        "gpuscheduler_device_health",
        "1 for the device's health state (stale: nothing heard of it for a while), 0 for the others.",
        labels=[*DEVICE_LABELS, "state"],
    )
    worker = GaugeMetricFamily(
        "gpuscheduler_worker_state",
        "1 for the state of the device's worker (missing: its heartbeats stopped), 0 for the others.",
        labels=[*DEVICE_LABELS, "state"],
    )
    here = gpu_config()["HOST"]
    for device in devices:
        values = labels[device.pk]
        current = STALE if device_stale(device, now) is not None else device.health
        for state in HEALTH_STATES:
            health.add_metric([*values, state], 1.0 if state == current else 0.0)
        alive = worker_alive(device, now)
        # As the status page judges it: a worker's PID means something only on its own host.
        if alive and device.worker_host == here and device.worker_pid and not pid_alive(device.worker_pid):
            alive = False
        if alive:
            state_now = device.worker_state
        else:
            state_now = MISSING if device.worker_name and device.worker_seen_at else WorkerState.STOPPED
        for state in WORKER_STATES:
            worker.add_metric([*values, state], 1.0 if state == state_now else 0.0)
    yield from (health, worker)


def _queues(devices: list[Device], labels: Labels) -> Iterator[Metric]:
    backlogs = device_backlogs()
    queued = GaugeMetricFamily(
        "gpuscheduler_queued_images", "Images queued in the database, planned on the device.", labels=DEVICE_LABELS
    )
    running = GaugeMetricFamily(
        "gpuscheduler_running_images", "Images being made on the device, in the database.", labels=DEVICE_LABELS
    )
    for device in devices:
        waiting, busy = backlogs.get(device.pk, (0, 0))
        queued.add_metric(labels[device.pk], waiting)
        running.add_metric(labels[device.pk], busy)
    yield from (queued, running)

    up = _redis_answers()
    yield GaugeMetricFamily(
        "gpuscheduler_redis_up",
        "1 when Redis answered this scrape, 0 when not (the Redis queue depths and RQ's metrics are then absent).",
        value=1.0 if up else 0.0,
    )
    jobs = GaugeMetricFamily(
        "gpuscheduler_redis_queue_jobs",
        "Jobs waiting in the device's Redis queue (gpu.<id>) and its pinned queue (gpu.<id>.pinned).",
        labels=[*DEVICE_LABELS, "queue", "pinned"],
    )
    if up:
        names = [(d, device_queue_name(d.pk, pinned=p), p) for d in devices for p in (False, True)]
        depths = queue_depths([name for _, name, _ in names])  # None for each if Redis went away since
        for device, name, pinned in names:
            depth = depths.get(name)
            if depth is not None:
                jobs.add_metric([*labels[device.pk], name, "true" if pinned else "false"], depth)
    yield jobs
    if up:
        yield from _rq_metrics()


def _redis_answers() -> bool:
    try:
        return bool(redis_connection().ping())
    except REDIS_ERRORS:
        return False


def _rq_metrics() -> Iterable[Metric]:
    """django-rq's collector (workers, and the jobs of RQ_QUEUES by status); nothing if Redis fails."""
    if RQCollector is None:  # prometheus_client missing: django-rq's module defines it as None
        return []
    try:
        return list(RQCollector().collect())
    except REDIS_ERRORS as exc:
        log.warning("RQ's metrics are left out of this scrape: Redis failed (%s)", exc)
        return []


def _assignments(labels: Labels, now: datetime) -> Metric:
    family = GaugeMetricFamily(
        "gpuscheduler_assignments",
        f"Attempts by state, kind and placement policy, on the device that ran them (the one they were "
        f"placed on until one starts them): every queued and running attempt, and for the other states "
        f"those queued in the last {ASSIGNMENT_WINDOW.total_seconds() / 3600:.0f} h "
        f"(at most the latest {ASSIGNMENT_WINDOW_ROWS:,}).",
        labels=[*DEVICE_LABELS, "state", "kind", "policy"],
    )
    live = Assignment.objects.filter(state__in=LIVE_STATES)  # their partial index finds them
    # The history grows with every attempt: a bounded slice of it, by primary key, on each scrape.
    ended = Assignment.objects.exclude(state__in=LIVE_STATES).filter(
        id__gte=_id_floor(Assignment, ASSIGNMENT_WINDOW_ROWS), queued_at__gte=now - ASSIGNMENT_WINDOW
    )
    on = Coalesce("device_id", "planned_device_id")
    for rows in (live, ended):
        counts = rows.order_by().values("state", "kind", "policy", on=on).annotate(n=Count("pk"))
        for row in counts.order_by("on", "state", "kind", "policy"):
            family.add_metric([*labels[row["on"]], row["state"], row["kind"], row["policy"]], row["n"])
    return family


def _id_floor(model: type[Assignment] | type[PipelineCall], rows: int) -> Coalesce:
    """The id of the `rows`-th newest row (0 when there are fewer), as a subquery: `id >= it` reads
    the latest rows by the primary key, however long the table."""
    newest = model.objects.order_by("-id").values("id")[rows - 1 : rows]
    return Coalesce(Subquery(newest), Value(0), output_field=BigIntegerField())


def _calls(labels: Labels, now: datetime) -> Metric:
    rows = PipelineCall.objects.filter(
        calibration=False, at__gte=now - CALL_WINDOW, id__gte=_id_floor(PipelineCall, CALL_WINDOW_ROWS)
    )
    groups = histogram_counts(rows, value="seconds", bounds=CALL_BUCKETS, by=("device_id", "images"))
    return gauge_histogram(
        "gpuscheduler_pipeline_call_seconds",
        f"Pipeline call durations by device and call size (images), the call alone: calls of the last "
        f"{CALL_WINDOW.total_seconds() / 3600:.0f} h, at most the latest {CALL_WINDOW_ROWS:,}, calibration left out.",
        [*DEVICE_LABELS, "images"],
        CALL_BUCKETS,
        (([*labels[device_id], str(images)], counts, total) for (device_id, images), counts, total in groups),
    )


def _curves(device_ids: list[int], labels: Labels) -> Iterator[Metric]:
    names = [*DEVICE_LABELS, "model", "model_key", "steps"]
    fixed = GaugeMetricFamily(
        "gpuscheduler_cost_fixed_seconds",
        "Learned cost of a call: fixed + per_image x max(n, knee) seconds. The fixed part.",
        labels=names,
    )
    per_image = GaugeMetricFamily(
        "gpuscheduler_cost_per_image_seconds", "Learned cost of a call: seconds per image above the knee.", labels=names
    )
    knee = GaugeMetricFamily(
        "gpuscheduler_cost_knee_images", "Learned cost of a call: images a call makes for its fixed cost.", labels=names
    )
    best = GaugeMetricFamily(
        "gpuscheduler_cost_best_images",
        "The call size the device fills towards (best by its curve, within SAMPLES_MAX_BATCH).",
        labels=names,
    )
    calls = GaugeMetricFamily(
        "gpuscheduler_cost_fit_calls", "How many timed calls the learned curve rests on.", labels=names
    )
    for row in CostCurve.objects.filter(device_id__in=device_ids):
        values = [*labels[row.device_id], row.model.split("@", 1)[0], row.model, str(row.steps)]
        fixed.add_metric(values, row.fixed_seconds)
        per_image.add_metric(values, row.per_image_seconds)
        knee.add_metric(values, row.knee)
        best.add_metric(values, best_call_size(curve_from_row(row)))
        calls.add_metric(values, row.calls)
    yield from (fixed, per_image, knee, best, calls)


def _models(device_ids: list[int], labels: Labels) -> Iterator[Metric]:
    names = [*DEVICE_LABELS, "model", "model_key"]
    warm = GaugeMetricFamily(
        "gpuscheduler_model_warm", "1 while the model is loaded on the device (warm), else 0.", labels=names
    )
    state = GaugeMetricFamily(
        "gpuscheduler_model_state",
        "1 for the model's state on the device (warm, evicted, failed to load), 0 for the others.",
        labels=[*names, "state"],
    )
    load = GaugeMetricFamily(
        "gpuscheduler_model_load_seconds", "How long the model's latest load on the device took.", labels=names
    )
    loads = CounterMetricFamily("gpuscheduler_model_loads", "How many times the device loaded the model.", labels=names)
    memory = GaugeMetricFamily(
        "gpuscheduler_model_memory_bytes", "Device memory the model held when loaded, as measured.", labels=names
    )
    for row in DeviceModel.objects.filter(device_id__in=device_ids):
        values = [*labels[row.device_id], row.model.split("@", 1)[0], row.model]
        warm.add_metric(values, 1.0 if row.state == ModelState.WARM else 0.0)
        for choice in ModelState.values:
            state.add_metric([*values, choice], 1.0 if choice == row.state else 0.0)
        if row.load_seconds is not None:
            load.add_metric(values, row.load_seconds)
        loads.add_metric(values, row.loads)
        if row.memory_bytes is not None:
            memory.add_metric(values, row.memory_bytes)
    yield from (warm, state, load, loads, memory)
