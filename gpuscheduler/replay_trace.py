"""What replay_schedule replays: a JSON trace file, or the assignment history in the database.

A trace names the devices by their curves and lists the requests:

    {"devices": [{"name": "H100", "fixed": 0.11, "per_image": 0.17, "knee": 6.5, "count": 2},
                 {"name": "T4", "per_image": 1.2}],
     "requests": [{"at": 0.0, "images": 4}, {"at": 0.5, "images": 1, "model": "tiny", "steps": 25}]}

`at` is seconds from any origin (the requests need not be sorted); `fixed` (0), `knee` (1) and
`count` (1) may be left out; `model` and `steps` only decide which requests may share a call.
Every problem is reported with the field it is in and how to fix it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from gpuscheduler.curves import Curve
from gpuscheduler.replay import SimDevice, SimRequest, Workload

DEVICE_FIELDS = ("name", "fixed", "per_image", "knee", "count")
REQUEST_FIELDS = ("at", "images", "model", "steps")
# Far above any real request (SAMPLES_MAX_PER_REQUEST is 16 by default); a typo beyond it would
# only make the replay slow.
MAX_IMAGES = 100_000
MAX_COUNT = 1_000


class ReplayInputError(ValueError):
    """The trace or the history cannot be replayed; the message says why and what to do."""


def trace_load(path: str | Path) -> Workload:
    """Read and check a JSON trace file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReplayInputError(f"Trace file {path} does not exist: give the path of a JSON trace.") from None
    except IsADirectoryError:
        raise ReplayInputError(f"Trace {path} is a directory: give the path of a JSON trace file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayInputError(f"Trace file {path} cannot be read ({exc}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplayInputError(
            f"Trace file {path} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    return trace_parse(data, source=f"trace {path}")


def trace_parse(data: Any, *, source: str = "trace") -> Workload:
    """Check a decoded trace and build its workload."""
    if not isinstance(data, dict):
        raise ReplayInputError(f'The trace must be a JSON object with "devices" and "requests", not a {_kind(data)}.')
    unknown = sorted(set(data) - {"devices", "requests"})
    if unknown:
        raise ReplayInputError(f'The trace has unknown field(s) {", ".join(unknown)}: use "devices" and "requests".')
    devices = _devices(data.get("devices"))
    raw = data.get("requests")
    if not isinstance(raw, list) or not raw:
        raise ReplayInputError(
            '"requests" must be a non-empty list of {"at": seconds, "images": count}, '
            f"not {_shown(raw) if raw is not None else 'missing'}."
        )
    parsed = [_request(item, f"requests[{i}]") for i, item in enumerate(raw)]
    keys = sorted({(model, steps) for _, _, model, steps in parsed})
    index = {key: i for i, key in enumerate(keys)}
    requests = sorted(
        (SimRequest(at=at, images=images, key=index[(model, steps)]) for at, images, model, steps in parsed),
        key=lambda r: r.at,
    )
    # A trace gives one curve per device: every model and step count costs the same there.
    sims = tuple(SimDevice(name, (curve,) * len(keys), detail) for name, curve, detail in devices)
    return Workload(devices=sims, requests=tuple(requests), keys=tuple(keys), source=source)


def _devices(raw: Any) -> list[tuple[str, Curve, str]]:
    if not isinstance(raw, list) or not raw:
        raise ReplayInputError(
            '"devices" must be a non-empty list of {"name": ..., "per_image": seconds, "fixed": seconds, '
            f'"knee": images, "count": n}}, not {_shown(raw) if raw is not None else "missing"}.'
        )
    devices: list[tuple[str, Curve, str]] = []
    for i, item in enumerate(raw):
        where = f"devices[{i}]"
        if not isinstance(item, dict):
            raise ReplayInputError(f'{where} must be an object like {{"name": "H100", "per_image": 0.17}}.')
        _no_unknown(item, DEVICE_FIELDS, where)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 60:
            raise ReplayInputError(f'{where}.name must be a short text such as "H100", not {_shown(name)}.')
        if "per_image" not in item:
            raise ReplayInputError(f"{where}.per_image is missing: give the seconds each image adds to a call.")
        per_image = _number(item["per_image"], f"{where}.per_image", "seconds per image, above 0", low=0, open_low=True)
        fixed = _number(item.get("fixed", 0.0), f"{where}.fixed", "seconds of every call, 0 or more", low=0)
        knee = _number(
            item.get("knee", 1.0), f"{where}.knee", "the call size below which a call costs the same, 1 or more", low=1
        )
        count = item.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise ReplayInputError(
                f"{where}.count must be a whole number of devices from 1 to {MAX_COUNT}, not {_shown(count)}."
            )
        curve = Curve(fixed=fixed, per_image=per_image, knee=knee, calls=0, sizes=0, source="trace")
        for _ in range(count):
            devices.append((f"{name.strip()}#{len(devices) + 1}", curve, name.strip()))
    return devices


def _request(item: Any, where: str) -> tuple[float, int, str, int]:
    if not isinstance(item, dict):
        raise ReplayInputError(f'{where} must be an object like {{"at": 0.0, "images": 4}}, not {_shown(item)}.')
    _no_unknown(item, REQUEST_FIELDS, where)
    for name in ("at", "images"):
        if name not in item:
            raise ReplayInputError(f'{where}.{name} is missing: every request needs "at" (seconds) and "images".')
    at = _number(item["at"], f"{where}.at", "seconds, 0 or more", low=0)
    images = item["images"]
    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= MAX_IMAGES:
        raise ReplayInputError(f"{where}.images must be a whole number from 1 to {MAX_IMAGES}, not {_shown(images)}.")
    model = item.get("model", "")
    if not isinstance(model, str) or len(model) > 300:
        raise ReplayInputError(f"{where}.model must be a text (the model's name), not {_shown(model)}.")
    steps = item.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ReplayInputError(f"{where}.steps must be a whole number of steps, not {_shown(steps)}.")
    return at, images, model, steps


def _number(value: Any, where: str, hint: str, *, low: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReplayInputError(f"{where} must be a number ({hint}), not {_shown(value)}.")
    if value < low or (open_low and value == low):
        raise ReplayInputError(f"{where} is {value}: it must be {hint}.")
    return float(value)


def _no_unknown(item: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(item) - set(allowed))
    if unknown:
        raise ReplayInputError(
            f"{where} has unknown field(s) {', '.join(unknown)}: the fields are {', '.join(allowed)}."
        )


def _kind(value: Any) -> str:
    return {list: "list", str: "text", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the history ----------------------------------------------------------------------------------


def history_load(*, start: datetime, end: datetime) -> Workload:
    """The sample requests first placed in [start, end), on the devices not retired, each with its
    learned curves for the models and step counts the requests used."""
    from django.db.models import Min, Sum
    from django.utils import timezone

    from gpuscheduler.costs import curves_for
    from gpuscheduler.models import Assignment, AssignmentKind, Device

    # First attempts only: a retry re-runs images already counted. The request's model and steps
    # are read through the foreign key, so the scheduler needs nothing from the personas app.
    rows = list(
        Assignment.objects.filter(
            kind=AssignmentKind.SAMPLES, attempt=1, request__isnull=False, queued_at__gte=start, queued_at__lt=end
        )
        .values("request_id", "request__model", "request__steps")
        .annotate(arrival=Min("queued_at"), image_total=Sum("image_count"))
        .order_by()
    )
    window = f"{timezone.localtime(start):%Y-%m-%d %H:%M} to {timezone.localtime(end):%Y-%m-%d %H:%M %Z}"
    rows = [row for row in rows if row["image_total"]]
    if not rows:
        raise ReplayInputError(
            f"No sample request was placed from {window}: widen the window (--since HOURS, or --from/--to), "
            "or replay a JSON trace with --trace."
        )
    devices = list(Device.objects.filter(retired_at__isnull=True).order_by("pk"))
    if not devices:
        raise ReplayInputError(
            "No device is registered (or all are retired): start `python manage.py gpumonitor`, "
            "or replay a JSON trace with --trace."
        )
    keys = sorted({(row["request__model"], int(row["request__steps"])) for row in rows})
    index = {key: i for i, key in enumerate(keys)}
    ids = [d.pk for d in devices]
    per_key = [curves_for(ids, model=model, steps=steps) for model, steps in keys]
    first = min(row["arrival"] for row in rows)
    requests = sorted(
        (
            SimRequest(
                at=(row["arrival"] - first).total_seconds(),
                images=int(row["image_total"]),
                key=index[(row["request__model"], int(row["request__steps"]))],
            )
            for row in rows
        ),
        key=lambda r: r.at,
    )
    sims = tuple(
        SimDevice(f"{d.name}#{d.pk}", tuple(curves[d.pk] for curves in per_key), f"{d.label} on {d.host}")
        for d in devices
    )
    return Workload(
        devices=sims, requests=tuple(requests), keys=tuple(keys), source=f"sample requests placed from {window}"
    )
