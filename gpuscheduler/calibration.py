"""Calibration at worker start: a few timed calls, so placement knows what a new device costs
before its first real call (gpuscheduler/costs.py keeps the curve; every later call refines it)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gpuscheduler import costs
from gpuscheduler.conf import samples_config
from gpuscheduler.curves import Timing

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext

log = logging.getLogger(__name__)


def calibration_sizes() -> list[int]:
    """SAMPLES_CALIBRATION's sizes, none above SAMPLES_MAX_BATCH (a call that large never runs)."""
    config = samples_config()
    limit = int(config["MAX_BATCH"])
    return sorted({min(int(size), limit) for size in config["CALIBRATION"]})


def calibrate(context: WorkerContext, model: str, steps: int) -> None:
    """Time a few calls (SAMPLES_CALIBRATION sizes) of the default model at its steps when this
    device's cost curve rests on fewer than two call sizes: placement then knows what the device
    costs before its first real call. Skipped once the curve is learned (it is kept in the
    database across restarts); every later call refines it. `model` is the key of a model the
    generator has warmed (its spec gives the guidance)."""
    sizes = calibration_sizes()
    if not sizes or not costs.needs_calibration(device=context.device, model=model, steps=steps, sizes=len(sizes)):
        return

    def call(images: int) -> Timing:
        result = context.generator.generate(
            model=model,
            prompt="calibration",
            seeds=list(range(images)),
            steps=steps,
        )
        return result.timings[-1]

    costs.calibrate(device=context.device, model=model, steps=steps, sizes=sizes, call=call)


def calibrate_safely(context: WorkerContext, model: str, steps: int) -> None:
    """Calibrate under the watchdog (a call hung in native code ends the worker, as in a job); a
    calibration that fails (out of memory, a model error) is logged and skipped: the device then
    learns from its real calls, and whatever failed fails those calls the usual way."""
    watchdog = context.watchdog
    if watchdog is not None:
        watchdog.arm(float(samples_config()["JOB_TIMEOUT"]))
    try:
        calibrate(context, model, steps)
    except Exception:
        log.warning("%s: calibration failed; learning its cost from real calls", context.device.label, exc_info=True)
        context.generator.free_memory()
    finally:
        if watchdog is not None:
            watchdog.disarm()
