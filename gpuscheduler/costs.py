"""The scheduler's learned costs: every pipeline call timed, and each device's curve fitted from them.

Workers record their calls (call_record) and refit their own curve; placement, the split rule,
stealing and batching read the curves (curves_for). Nothing here knows what a device is: a
simulated device's speed stays inside the simulated backend and the image generator, and the
scheduler learns it from the calls' timings exactly as it would on real hardware.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace

from django.db import IntegrityError, transaction

from gpuscheduler import workloads
from gpuscheduler.clock import DbNow
from gpuscheduler.conf import samples_config
from gpuscheduler.curves import PRIOR, Curve, Timing, fit, peer_curve, scaled
from gpuscheduler.models import CostCurve, Device, PipelineCall

log = logging.getLogger(__name__)

# The fit reads this many of the device's latest calls for the model and step count.
FIT_WINDOW = 200
# A curve is refitted after every call while it rests on fewer calls than this, then every
# REFIT_EVERY calls, and every REFIT_EVERY_FULL once it rests on a whole FIT_WINDOW (ten more calls
# move a fit of 200 by little): a worker making thousands of small calls does not refit each time.
EAGER_CALLS = 20
REFIT_EVERY = 10
REFIT_EVERY_FULL = 25

# Per (device, model, steps), in this process: how many calls the curve rested on when this process
# last refitted it, and how many this process has recorded since. Only a device's own worker records
# its calls, so counting here spares a COUNT over the device's history at every call; a new process
# refits at its first call and learns where the curve stands.
_refits: dict[tuple[int, str, int], tuple[int, int]] = {}


def curve_from_row(row: CostCurve) -> Curve:
    return Curve(
        fixed=row.fixed_seconds,
        per_image=row.per_image_seconds,
        knee=row.knee,
        calls=row.calls,
        sizes=row.sizes,
        source="learned",
    )


def call_record(
    *, device: Device, model: str, steps: int, timing: Timing, calibration: bool = False, refit: bool | None = None
) -> PipelineCall:
    """Store one timed call and refit the device's curve when it is due (or when `refit` says so)."""
    call = PipelineCall.objects.create(
        device=device,
        model=model[:300],
        steps=steps,
        width=timing.width,
        height=timing.height,
        images=timing.images,
        seconds=timing.seconds,
        calibration=calibration,
    )
    key = (device.pk, model[:300], steps)
    rested, since = _refits.get(key, (0, -1))
    since += 1
    _refits[key] = (rested, since)
    if refit is None:
        refit = since == 0 or refit_due(rested=rested, since=since)
    if refit:
        curve_refit(device_id=device.pk, model=model, steps=steps)
    return call


def refit_due(*, rested: int, since: int) -> bool:
    """Whether a curve fitted on `rested` calls, with `since` calls recorded after that, is refitted now."""
    if rested + since <= EAGER_CALLS:
        return True
    return since >= (REFIT_EVERY_FULL if rested >= FIT_WINDOW else REFIT_EVERY)


def curve_refit(*, device_id: int, model: str, steps: int) -> Curve | None:
    """Fit the device's curve from its latest calls and store it; None when it has no calls."""
    observations = list(
        PipelineCall.objects.filter(device_id=device_id, model=model[:300], steps=steps)
        .order_by("-id")
        .values_list("images", "seconds")[:FIT_WINDOW]
    )
    curve = fit(observations)
    if curve is None:
        return None
    _refits[(device_id, model[:300], steps)] = (curve.calls, 0)
    values = {
        "fixed_seconds": curve.fixed,
        "per_image_seconds": curve.per_image,
        "knee": curve.knee,
        "calls": curve.calls,
        "sizes": curve.sizes,
        "updated_at": DbNow(),
    }
    key = {"device_id": device_id, "model": model[:300], "steps": steps}
    if not CostCurve.objects.filter(**key).update(**values):
        try:
            with transaction.atomic():
                CostCurve.objects.create(**key, **values)
        except IntegrityError:
            CostCurve.objects.filter(**key).update(**values)  # another process created it first
    return curve


def curves_for(device_ids: Iterable[int], *, model: str | None = None, steps: int | None = None) -> dict[int, Curve]:
    """Each device's curve for this model and step count (the default ones when not given), in one query.

    A device without a curve of its own for these steps borrows, in this order: its own curve for
    the model at the nearest other step count, scaled by the steps (a diffusion call costs about
    in proportion to its steps); the median of the other devices' curves; where no device has
    timed the model yet, the median of its own curves of other models (scaled by the steps: one
    more query), which says more of a device than the prior; the prior.
    """
    if model is None:
        model, default_steps = workloads.default_key_and_steps()
        steps = steps or default_steps
    model = model[:300]
    steps = int(steps or samples_config()["STEPS"])
    ids = list(device_ids)
    rows = list(CostCurve.objects.filter(model=model, device_id__in=ids))
    exact = {row.device_id: curve_from_row(row) for row in rows if row.steps == steps}
    others: dict[int, list[CostCurve]] = {}
    for row in rows:
        if row.steps != steps:
            others.setdefault(row.device_id, []).append(row)
    for device_id, candidates in others.items():
        if device_id not in exact:
            nearest = min(candidates, key=lambda r: (abs(r.steps - steps), r.steps))
            exact[device_id] = scaled(curve_from_row(nearest), steps / max(nearest.steps, 1))
    fallback = peer_curve(list(exact.values()))
    if fallback is PRIOR and ids:
        return _from_other_models(ids, model=model, steps=steps)
    return {device_id: exact.get(device_id, fallback) for device_id in ids}


def _from_other_models(ids: list[int], *, model: str, steps: int) -> dict[int, Curve]:
    """Each device's curves of other models, scaled to `steps`, as one curve (their median); the
    prior for a device that has timed no model."""
    mine: dict[int, list[Curve]] = {}
    for row in CostCurve.objects.filter(device_id__in=ids).exclude(model=model):
        mine.setdefault(row.device_id, []).append(scaled(curve_from_row(row), steps / max(row.steps, 1)))
    shown = {}
    for device_id in ids:
        median_curve = peer_curve(mine.get(device_id, []))
        shown[device_id] = replace(median_curve, source="models") if median_curve is not PRIOR else PRIOR
    return shown


def best_call_size(curve: Curve) -> int:
    """The call size a device should fill towards: the best by its curve, within SAMPLES_MAX_BATCH."""
    return curve.best_size(int(samples_config()["MAX_BATCH"]))


def needs_calibration(*, device: Device, model: str, steps: int, sizes: int = 2) -> bool:
    """Whether the device's curve for this model rests on fewer call sizes than a calibration of
    `sizes` distinct sizes (at most two are needed to see a slope) would give it."""
    row = CostCurve.objects.filter(device=device, model=model[:300], steps=steps).values_list("sizes", flat=True)
    return (row.first() or 0) < min(2, sizes)


def calibrate(
    *,
    device: Device,
    model: str,
    steps: int,
    sizes: Iterable[int],
    call: Callable[[int], Timing],
) -> Curve | None:
    """Time one call of each size (`call(n)` makes n throwaway images and returns its timing),
    record them and fit the device's curve: a short calibration at worker start, so placement
    knows this device before its first real call."""
    made = 0
    for size in sizes:
        timing = call(int(size))
        call_record(device=device, model=model, steps=steps, timing=timing, calibration=True, refit=False)
        made += 1
    if not made:
        return None
    curve = curve_refit(device_id=device.pk, model=model, steps=steps)
    if curve is not None:
        log.info(
            "%s calibrated for %s at %d steps: %s",
            device.label,
            model,
            steps,
            curve.describe(int(samples_config()["MAX_BATCH"])),
        )
    return curve


__all__ = [
    "PRIOR",
    "Curve",
    "Timing",
    "best_call_size",
    "calibrate",
    "call_record",
    "curve_refit",
    "curves_for",
    "needs_calibration",
]
