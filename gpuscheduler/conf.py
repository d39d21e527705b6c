"""The scheduler's options: settings.GPUSCHEDULER merged over defaults, read at call time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    "BACKEND": "auto",
    "SIMULATED": "sim*2",
    "POLICY": "balanced",
    "STEAL": "speed",
    "MODEL_AFFINITY": True,
    "MODEL_CACHE": 2,
    "HOST": "localhost",
    "MAX_TEMPERATURE": 85.0,
    "MIN_FREE_MEMORY_MB": 1024,
    "MONITOR_INTERVAL": 2.0,
    "HEARTBEAT_INTERVAL": 2.0,
    "LEASE_SECONDS": 10.0,
    "PLACEMENT_READ_SECONDS": 0.5,
    "WATCHDOG_GRACE": 30.0,
    "SNAPSHOT_RAW_HOURS": 2.0,
    "SNAPSHOT_BUCKET_SECONDS": 60,
    "SNAPSHOT_RETENTION_DAYS": 7.0,
    "RETIRE_AFTER_HOURS": 24.0,
    "STORAGE_MIN_FREE_MB": 512,
}

SAMPLES_DEFAULTS: dict[str, Any] = {
    "MODEL": "tiny",
    "MAX_PER_REQUEST": 16,
    "MAX_BATCH": 16,
    "CALIBRATION": [1, 4, 8, 16],
    "BATCHING": True,
    "BATCH_WAIT_MS": 0,
    "STEPS": 25,
    "GUIDANCE": 7.5,
    "JOB_TIMEOUT": 600,
    "MAX_ATTEMPTS": 3,
    "THUMBNAIL_SIZE": 256,
    "THUMBNAIL_FORMAT": "webp",
}


def gpu_config() -> dict[str, Any]:
    return {**DEFAULTS, **getattr(settings, "GPUSCHEDULER", {})}


def samples_config() -> dict[str, Any]:
    return {**SAMPLES_DEFAULTS, **getattr(settings, "SAMPLES", {})}


def lease() -> timedelta:
    """How long an attempt, or a worker's hold on its device, lives without a heartbeat."""
    return timedelta(seconds=float(gpu_config()["LEASE_SECONDS"]))


def stale_after() -> timedelta:
    """How long a device may go without a reading (monitor or worker) and without its worker's
    heartbeat before it counts as stale: three readings or heartbeats missed, and never less than
    the lease, so a device is not stale while its worker could still be alive."""
    config = gpu_config()
    interval = max(float(config["MONITOR_INTERVAL"]), float(config["HEARTBEAT_INTERVAL"]))
    return max(timedelta(seconds=3 * interval), lease())


def retire_after() -> timedelta:
    """How long a device may go unheard of before it is retired (hidden, kept for history)."""
    return timedelta(hours=float(gpu_config()["RETIRE_AFTER_HOURS"]))
