"""The GPU status page's data: each host's media store, device cards, an hour of history drawn as
SVG geometry, the jobs on the same time axis, queue depths and recent attempts, as one JSON-ready dict.

The page template and the JSON endpoint read the same dict, so the page's script can swap in
fragments rendered from exactly what the endpoint returns. The geometry helpers are pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count
from django.urls import reverse
from django.utils import timezone

from gpuscheduler.clock import clock_text, db_now
from gpuscheduler.cluster import host_status
from gpuscheduler.conf import gpu_config
from gpuscheduler.models import Assignment, AssignmentState, images_label
from gpuscheduler.page_reads import (
    assignments_between,
    assignments_recent,
    cost_texts,
    device_status,
    history_start,
    model_texts,
    snapshot_history,
)
from gpuscheduler.queues import device_queue_name, queue_depths
from gpuscheduler.storage import store_status

HISTORY_SECONDS = 3600
# The charts' windows (seconds), shortest first, each with its time axis step: whole minutes.
CHART_WINDOWS = {300: 60, 600: 120, 900: 300, 1800: 600, HISTORY_SECONDS: 900}
RECENT_LIMIT = 50

# Chart geometry in SVG user units; the SVG scales to its card's width through its viewBox.
CHART_WIDTH = 600
PLOT_TOP = 6
PLOT_HEIGHT = 100
LANE_TOP = PLOT_TOP + PLOT_HEIGHT + 6
LANE_HEIGHT = 16
AXIS_Y = LANE_TOP + LANE_HEIGHT + 12
CHART_HEIGHT = AXIS_Y + 4
# 240 slots of 15 s: one point every 2.5 user units, finer than a card is wide in pixels,
# and 240 points a line instead of 1,800 at a 2 s monitor interval.
SLOTS = 240
METRICS = ("utilization", "memory", "temperature")
Y_TICKS = ((PLOT_TOP + 9, "100"), (PLOT_TOP + PLOT_HEIGHT / 2 + 3, "50"), (PLOT_TOP + PLOT_HEIGHT - 2, "0"))
GIB = 1024**3


@dataclass(frozen=True)
class Point:
    """One point of a device's history: seconds since the window's start, and the span it averages."""

    t: float
    span: float
    utilization: float | None
    memory: float | None  # percent of the device's memory
    temperature: float | None


def _memory_percent(used: int | None, total: int | None) -> float | None:
    return 100.0 * used / total if used is not None and total else None


def history_points(
    rows: Sequence[tuple[Any, ...]],
    *,
    slot_seconds: float,
    memory_total: int | None = None,
    min_span: float = 0.0,
) -> list[Point]:
    """Turn one device's slot averages (selectors.snapshot_history rows) into chart points, raw
    readings winning wherever a downsampled average overlaps them."""
    raw_starts = [r[3] for r in rows if r[1] == 0]
    first_raw = min(raw_starts) if raw_starts else None
    span = max(slot_seconds, min_span)
    points = []
    for _, bucket, slot, _first, last, mean, used, total, utilization, temperature in rows:
        memory = _memory_percent(None if used is None else round(used), total or memory_total)
        if bucket == 0:
            points.append(Point((slot + 0.5) * slot_seconds, span, utilization, memory, temperature))
        elif first_raw is None or last + bucket <= first_raw + 0.5:  # compaction makes them meet exactly
            # An average stands for the bucket that starts at its taken_at: draw it mid-bucket.
            points.append(Point(mean + bucket / 2, max(float(bucket), span), utilization, memory, temperature))
    points.sort(key=lambda p: p.t)
    return points


def line_paths(points: Sequence[Point], *, window: float, width: float = CHART_WIDTH) -> dict[str, str]:
    """One SVG path per metric on a 0-100 scale, each broken where its readings are missing."""
    segments: dict[str, list[list[str]]] = {m: [] for m in METRICS}
    previous: dict[str, Point | None] = dict.fromkeys(METRICS)
    scale = width / window
    for point in points:
        x = f"{point.t * scale:.1f},"
        for metric, value in zip(METRICS, (point.utilization, point.memory, point.temperature), strict=True):
            if value is None:
                previous[metric] = None
                continue
            before = previous[metric]
            # Two readings further apart than their spans allow mean the monitor was not writing.
            if before is None or point.t - before.t > 2.5 * max(point.span, before.span):
                segments[metric].append([])
            y = PLOT_TOP + PLOT_HEIGHT * (1 - min(max(value, 0.0), 100.0) / 100)
            segments[metric][-1].append(f"{x}{y:.1f}")
            previous[metric] = point
    # A lone reading still shows: a zero-length segment drawn with round caps is a dot.
    return {
        metric: " ".join("M" + " L".join(s) + (" h0" if len(s) == 1 else "") for s in parts)
        for metric, parts in segments.items()
    }


PERSONA_PLACEHOLDER = "0000000"


def persona_url_pattern() -> str:
    """The persona change page's URL with a placeholder id: one reverse() for the hundreds of links of a page."""
    return reverse("admin:personas_persona_change", args=[PERSONA_PLACEHOLDER])


def persona_url(persona_id: int | None, pattern: str) -> str | None:
    return None if persona_id is None else pattern.replace(PERSONA_PLACEHOLDER, str(persona_id), 1)


def job_spans(
    rows: Iterable[dict[str, Any]], *, since: datetime, until: datetime, pattern: str, width: float = CHART_WIDTH
) -> list[dict[str, Any]]:
    """Where each attempt (selectors.assignments_between rows) ran on the time axis, with what to call it."""
    window = (until - since).total_seconds()
    spans = []
    for a in rows:
        started, finished = a["started_at"], a["finished_at"]
        if started is None:
            continue
        if finished is not None:
            end = finished
        elif a["state"] == AssignmentState.RUNNING:
            end = until
        else:
            end = a["heartbeat_at"] or started
        start, end = max(started, since), min(end, until)
        if end < since or start > until:
            continue
        x = (start - since).total_seconds() / window * width
        span_width = min(max((end - start).total_seconds() / window * width, 1.5), width)
        persona_id = a["request__persona_id"]
        name = a["request__persona__name"] if persona_id is not None else "(canary)"
        images = images_label(a["first_index"], a["image_count"])
        label = f"{name} x{a['image_count']}"
        spans.append(
            {
                "assignment": a["id"],
                "job_id": a["job_id"],
                "persona": name,
                "persona_id": persona_id,
                "url": persona_url(persona_id, pattern),
                "images": images,
                "image_count": a["image_count"],
                "state": a["state"],
                "started_at": started.isoformat(),
                "finished_at": finished.isoformat() if finished else None,
                "x": round(min(x, width - span_width), 1),
                "width": round(span_width, 1),
                "label": label,
                # Roughly 6 user units a character at the chart's font size.
                "show_label": span_width >= 6 * min(len(label), 12) + 6,
                "title": f"{name}, {images}, {AssignmentState(a['state']).label.lower()}: "
                f"{_clock(started)} to {_clock(finished) if finished else 'now'}",
            }
        )
    return spans


def time_ticks(
    *, window: float = HISTORY_SECONDS, width: float = CHART_WIDTH, step: float = 900
) -> list[dict[str, Any]]:
    count = int(window // step) + 1
    ticks = []
    for i in range(count):
        before = window - i * step
        anchor = "start" if i == 0 else "end" if i == count - 1 else "middle"
        label = "now" if before == 0 else f"-{before / 60:.0f} min"
        ticks.append({"x": round(i * step / window * width, 1), "label": label, "anchor": anchor})
    return ticks


def chart_window(first: datetime | None, now: datetime) -> int:
    """The charts' window in seconds: the shortest of CHART_WINDOWS that holds everything since the
    oldest reading or job of the last hour (`first`), so a cluster started 3 minutes ago fills its
    charts instead of drawing them in the last 5 % of an hour."""
    age = (now - first).total_seconds() if first is not None else HISTORY_SECONDS
    return next((w for w in CHART_WINDOWS if age <= w), HISTORY_SECONDS)


def _clock(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    local = timezone.localtime(value)
    if now is not None and abs((now - value).total_seconds()) > 20 * 3600:
        return local.strftime("%b %d %H:%M")
    return local.strftime("%H:%M:%S")


def duration_text(seconds: float | None) -> str:
    """12 s, 4 min, 3.5 h: how long ago or for how long, at a glance ('' when unknown)."""
    if seconds is None:
        return ""
    seconds = seconds if seconds > 0 else 0.0  # max() would keep -0.0, shown as "-0 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _card(
    row: dict[str, Any], points: list[Point], spans: list[dict[str, Any]], window: float, pattern: str
) -> dict[str, Any]:
    snap = row["snapshot"]
    if snap is not None:
        used, total = snap["memory_used"], snap["memory_total"]
        snap["memory_percent"] = round(_memory_percent(used, total) or 0.0, 1) if used is not None and total else None
        snap["memory_text"] = f"{used / GIB:.1f} / {total / GIB:.1f} GiB" if used is not None and total else ""
        snap["age_text"] = duration_text(snap["age_seconds"])
    row["worker"]["heartbeat_age_text"] = duration_text(row["worker"]["heartbeat_age_seconds"])
    job = row["current_job"]
    if job is not None:
        job["persona_url"] = persona_url(job["persona_id"], pattern)
        job["running_text"] = duration_text(job["running_seconds"])
        started = job["running_since"]
        job["running_since_text"] = _clock(datetime.fromisoformat(started)) if started else ""
    row["history"] = {
        "points": [
            [round(p.t, 1), *(None if getattr(p, m) is None else round(getattr(p, m), 1) for m in METRICS)]
            for p in points
        ],
        "columns": ["seconds", *METRICS],
    }
    row["chart"] = {
        "lines": line_paths(points, window=window),
        "jobs": spans,
        "has_data": bool(points),
    }
    return row


def shared_calls(assignments: list[Assignment]) -> dict[int, int]:
    """How many attempts each pipeline call of these attempts made images for (one query)."""
    ids = {a.pipeline_call_id for a in assignments if a.pipeline_call_id is not None}
    if not ids:
        return {}
    rows = Assignment.objects.filter(pipeline_call_id__in=ids).values("pipeline_call").annotate(n=Count("id"))
    return {row["pipeline_call"]: row["n"] for row in rows}


def _assignment_row(a: Assignment, now: datetime, pattern: str, shared: dict[int, int]) -> dict[str, Any]:
    persona_id = a.request.persona_id if a.request else None
    name = a.request.persona.name if a.request else "(canary)"
    url = persona_url(persona_id, pattern)
    end = a.finished_at or (now if a.state == AssignmentState.RUNNING else None)
    duration = (end - a.started_at).total_seconds() if a.started_at and end else None
    return {
        "id": a.pk,
        "job_id": a.job_id,
        "kind": a.kind,
        "persona": name,
        "persona_id": persona_id,
        "persona_url": url,
        "request": a.request_id,
        "images": a.images_label,
        "image_count": a.image_count,
        "attempt": a.attempt,
        "state": a.state,
        "state_label": a.get_state_display(),
        "planned_device": a.planned_device.label,
        "planned_device_id": a.planned_device_id,
        "device": a.device.label if a.device else None,
        "device_id": a.device_id,
        "pinned": a.pinned,
        "worker_name": a.worker_name,
        "reason": a.reason,
        "error": a.error[:300],
        "queued_at": a.queued_at.isoformat(),
        "started_at": a.started_at.isoformat() if a.started_at else None,
        "finished_at": a.finished_at.isoformat() if a.finished_at else None,
        "queued_text": _clock(a.queued_at, now),
        "started_text": _clock(a.started_at, now),
        "duration_seconds": round(duration, 1) if duration is not None else None,
        "duration_text": duration_text(duration),
        # The pipeline call that made its images, and how many attempts (requests' chunks) shared it.
        "pipeline_call": a.pipeline_call_id,
        "call_shared_by": shared.get(a.pipeline_call_id, 1) if a.pipeline_call_id is not None else None,
    }


def _host_texts(host: dict[str, Any]) -> dict[str, Any]:
    """What a host's section says in words: "monitor: seen 2 s ago", "monitor: silent for 3 min"."""
    monitor = host["monitor"]
    age = duration_text(monitor["age_seconds"])
    monitor["text"] = {
        "running": f"seen {age} ago",
        "silent": f"silent for {age}",
        "none": "none has run on this host",
    }[monitor["state"]]
    for worker in host["workers"]:
        worker["heartbeat_age_text"] = duration_text(worker["heartbeat_age_seconds"])
    silent = host["silent_seconds"]
    host["stale_text"] = (
        ("nothing heard from it" if silent is None else f"nothing heard from it for {duration_text(silent)}")
        + ": no monitor, worker or reading. Is the machine up?"
        if host["stale"]
        else ""
    )
    return host


def status_page(
    *, device_id: int | None = None, state: str | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """Everything the GPU status page shows, JSON-ready, in a number of queries that does not grow with devices.

    Ages and the history window are measured on the database's clock (clock.db_now, read once):
    the web host's own clock may be off from the hosts that wrote the times.
    """
    now = now or db_now()
    rows = device_status(now)
    ids = [row["id"] for row in rows]
    hour_ago = now - timedelta(seconds=HISTORY_SECONDS)
    jobs = assignments_between(device_ids=ids, since=hour_ago, until=now)
    starts = [j["started_at"] for j in jobs if j["started_at"] is not None]
    first = min([t for t in (history_start(device_ids=ids, since=hour_ago), *starts) if t is not None], default=None)
    window = float(chart_window(first, now))
    since = now - timedelta(seconds=window)
    slot_seconds = window / SLOTS
    pattern = persona_url_pattern()
    history: dict[int, list[tuple[Any, ...]]] = {}
    for slot in snapshot_history(device_ids=ids, since=since, until=now, slot_seconds=slot_seconds):
        history.setdefault(slot[0], []).append(slot)
    ran: dict[int, list[dict[str, Any]]] = {}
    for span in jobs:
        ran.setdefault(span["device_id"], []).append(span)
    min_span = float(gpu_config()["MONITOR_INTERVAL"])
    costs = cost_texts(ids)
    models = model_texts(ids)
    devices = []
    for row in rows:
        row["cost"] = costs[row["id"]]
        row["models"] = models[row["id"]]
        total = (row["snapshot"] or {}).get("memory_total")
        points = history_points(
            history.get(row["id"], []), slot_seconds=slot_seconds, memory_total=total, min_span=min_span
        )
        spans = job_spans(ran.get(row["id"], []), since=since, until=now, pattern=pattern)
        devices.append(_card(row, points, spans, window, pattern))

    names = [device_queue_name(i, pinned=p) for i in ids for p in (False, True)]
    depths = queue_depths(names)
    redis_available = not names or any(v is not None for v in depths.values())
    queues = [
        {
            "device_id": row["id"],
            "label": row["label"],
            "short_uuid": row["short_uuid"],
            "queued_images": row["queued_images"],
            "running_images": row["running_images"],
            "queue": device_queue_name(row["id"]),
            "redis_jobs": depths.get(device_queue_name(row["id"])),
            "pinned_queue": device_queue_name(row["id"], pinned=True),
            "redis_pinned_jobs": depths.get(device_queue_name(row["id"], pinned=True)),
        }
        for row in rows
    ]
    recent = assignments_recent(device_id=device_id, state=state, limit=RECENT_LIMIT)
    shared = shared_calls(recent)
    storage = store_status(now)
    for store in storage:
        free = store["free_bytes"]
        store["free_text"] = "" if free is None else f"{free / GIB:.1f} GiB"
        store["age_text"] = duration_text(store["age_seconds"])
        changed = store["changed_at"]
        store["changed_text"] = (
            clock_text(datetime.fromisoformat(changed), now) if changed and not store["healthy"] else ""
        )
    hosts = [_host_texts(host) for host in host_status(rows, storage, now)]
    shown = {host["host"] for host in hosts}
    storage = [store for store in storage if store["host"] in shown]  # not the stores of hosts gone for good
    return {
        "generated_at": now.isoformat(),
        "generated_text": clock_text(now),
        "window_seconds": int(window),
        "chart": {
            "width": CHART_WIDTH,
            "height": CHART_HEIGHT,
            "center_x": CHART_WIDTH / 2,
            "plot_top": PLOT_TOP,
            "plot_height": PLOT_HEIGHT,
            "plot_bottom": PLOT_TOP + PLOT_HEIGHT,
            "plot_middle": PLOT_TOP + PLOT_HEIGHT / 2,
            "lane_top": LANE_TOP,
            "lane_height": LANE_HEIGHT,
            "lane_text_y": LANE_TOP + LANE_HEIGHT - 4,
            "axis_y": AXIS_Y,
            "ticks": time_ticks(window=window, step=CHART_WINDOWS[int(window)]),
            # One scale for the three lines: percent of time busy, percent of memory used, degrees C.
            "y_ticks": [{"y": y, "label": label} for y, label in Y_TICKS],
            "y_label": "% busy · % memory · °C",
            "window_text": duration_text(window),
        },
        "devices": devices,
        "storage": storage,
        "hosts": hosts,
        "queues": queues,
        "redis_available": redis_available,
        "assignments": [_assignment_row(a, now, pattern, shared) for a in recent],
        "filters": {
            "device": device_id,
            "state": state,
            "states": [{"value": value, "label": label} for value, label in AssignmentState.choices],
            "devices": [{"value": row["id"], "label": f"{row['label']} · {row['short_uuid']}"} for row in rows],
        },
    }
