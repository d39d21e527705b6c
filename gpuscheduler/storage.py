"""The media store of each host as a health input, like a GPU's memory.

Sample PNGs are written under MEDIA_ROOT of the host that made them. A full disk (ENOSPC) or a
read-only media folder (EROFS) used to surface only as attempts that timed out; here the store is
read like a device: free space (shutil.disk_usage) against STORAGE_MIN_FREE_MB, and a probe file
written, flushed to disk and removed. The verdict is kept per host in MediaStore. While a host's
store is unhealthy its workers take no work and placement passes its devices by; the next good
reading ends that, with no restart.

Who reads: gpumonitor every tick, and each worker before it takes work, but a store is probed at
most once per STORE_CHECK_SECONDS whoever asks (the row's `checked_at` says when it last was), so
workers on a host without a monitor still see it and a host with a monitor costs them one query.
A worker that hits a storage error while writing images reports it at once (store_report_error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from gpuscheduler.conf import gpu_config
from gpuscheduler.models import MediaStore
from gpuscheduler.policies import store_admit

log = logging.getLogger(__name__)

STORE_CHECK_SECONDS = 5.0
# About one sample PNG: a disk too full for the probe is too full for the images. Random bytes, so
# a compressing file system cannot store it in no space at all.
PROBE_BYTES = 256 * 1024
PROBE_PREFIX = ".storage-probe-"


@dataclass(frozen=True)
class StoreReading:
    """One reading of a media folder: free space, and whether a probe file could be written there."""

    path: str
    writable: bool
    free_bytes: int | None = None
    total_bytes: int | None = None
    error: str = ""


def media_path() -> Path:
    """The folder the store's probe reads: MEDIA_ROOT, where sample images are written (under
    samples/, which verify_samples keeps for the images alone)."""
    return Path(settings.MEDIA_ROOT)


def store_error_text(exc: OSError) -> str:
    """The error as an operator needs it: "No space left on device: media/samples/persona-3/r12-0.png"."""
    text = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return text
    path = Path(os.fsdecode(exc.filename))
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path(settings.MEDIA_ROOT).parent)
    return f"{text}: {path.as_posix()}"


def store_fault_simulate(*, path: Path | str) -> None:
    """With GPU_BACKEND=simulated, raise the storage error switched on for this host by
    gpuscheduler.simulated.set_storage_fault (tests, benchmarks); nothing otherwise."""
    config = gpu_config()
    if config["BACKEND"] != "simulated":
        return
    from gpuscheduler import simulated

    simulated.storage_fault_raise(host=config["HOST"], path=path)


def _probe_write(probe: Path) -> None:
    store_fault_simulate(path=probe)
    with open(probe, "wb") as handle:
        handle.write(os.urandom(PROBE_BYTES))
        handle.flush()
        # A network file system (or one with delayed allocation) may report a full disk only here.
        os.fsync(handle.fileno())


def store_read(path: Path) -> StoreReading:
    """Read a media folder (created if missing): its free space, and whether a probe file of
    PROBE_BYTES can be written, flushed and removed there. The seam tests replace."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return StoreReading(path=str(path), writable=False, error=store_error_text(exc))
    probe = path / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        _probe_write(probe)
    except OSError as exc:
        return StoreReading(str(path), False, usage.free, usage.total, store_error_text(exc))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
        _probes_left_remove(path)
    return StoreReading(str(path), True, usage.free, usage.total)


def _probes_left_remove(path: Path) -> None:
    """Remove probe files of processes killed while probing (a probe lives for milliseconds)."""
    cutoff = time.time() - 60
    with contextlib.suppress(OSError):
        for left in path.glob(f"{PROBE_PREFIX}*"):
            with contextlib.suppress(OSError):
                if left.stat().st_mtime < cutoff:
                    left.unlink()


# --- services ------------------------------------------------------------------------------------


def store_check(*, host: str, reading: StoreReading | None = None) -> MediaStore:
    """Read this host's media folder now (or judge `reading`) and record the verdict."""
    started = timezone.now()
    reading = reading or store_read(media_path())
    admission = store_admit(
        ok=reading.writable,
        error=reading.error,
        free_bytes=reading.free_bytes,
        min_free_bytes=int(gpu_config()["STORAGE_MIN_FREE_MB"]) * 1024**2,
    )
    fields = {"path": reading.path[:1000], "free_bytes": reading.free_bytes, "total_bytes": reading.total_bytes}
    return _store_record(host=host, healthy=admission.ok, reason=admission.reason, at=started, **fields)


def store_report_error(*, host: str, error: str) -> None:
    """A worker failed to write files to its media store: mark the store unhealthy at once.

    The verdict stands until a probe that starts after it writes its file: a probe already under
    way cannot overwrite it, and none starts for STORE_CHECK_SECONDS. Call it outside a transaction
    that may roll back.
    """
    _store_record(host=host, healthy=False, reason=error, at=timezone.now())


def store_refresh(*, host: str, max_age: float = STORE_CHECK_SECONDS) -> MediaStore:
    """This host's store verdict, read again (a probe) only when older than `max_age` seconds."""
    row = MediaStore.objects.filter(host=host).first()
    if row is not None and row.checked_at > timezone.now() - timedelta(seconds=max_age):
        return row
    return store_check(host=host)


def store_admits(*, host: str) -> tuple[bool, str]:
    """May work start on `host`, judging by its media store? (ok, why not). Probes when due."""
    row = store_refresh(host=host)
    return (True, "") if row.healthy else (False, f"the media store of {host} is unhealthy: {row.reason}")


def _store_record(*, host: str, healthy: bool, reason: str, at: datetime, **reading: Any) -> MediaStore:
    """Record a verdict reached at `at`, unless a newer one is recorded already: a probe that
    began before a worker reported a write error must not hide that error."""
    fields = {"healthy": healthy, "reason": reason[:500], "checked_at": at, **reading}
    for _ in range(3):
        row = MediaStore.objects.filter(host=host).first()
        if row is None:
            try:
                with transaction.atomic():
                    row = MediaStore.objects.create(host=host, changed_at=at, **fields)
            except IntegrityError:
                continue  # another process recorded the first verdict at the same moment
            if not healthy:
                log.warning("the media store of %s is unhealthy: %s", host, reason)
            return row
        if row.checked_at > at:
            return row
        changed = {"changed_at": at} if row.healthy != healthy else {}
        if MediaStore.objects.filter(pk=row.pk, checked_at=row.checked_at).update(**fields, **changed):
            if changed:
                log.warning("the media store of %s is now %s: %s", host, "healthy" if healthy else "unhealthy", reason)
            for key, value in {**fields, **changed}.items():
                setattr(row, key, value)
            return row
    return MediaStore.objects.get(host=host)


# --- selectors -----------------------------------------------------------------------------------


def stores_unhealthy() -> dict[str, str]:
    """Host -> why its media store takes no work, for every unhealthy store."""
    return dict(MediaStore.objects.filter(healthy=False).values_list("host", "reason"))


def store_status(now: datetime | None = None) -> list[dict[str, Any]]:
    """Every host's media store with its latest verdict, as plain data."""
    now = now or timezone.now()
    min_free = int(gpu_config()["STORAGE_MIN_FREE_MB"])
    return [
        {
            "host": row.host,
            "healthy": row.healthy,
            "reason": row.reason,
            "path": row.path,
            "free_bytes": row.free_bytes,
            "total_bytes": row.total_bytes,
            "min_free_mb": min_free,
            "checked_at": row.checked_at.isoformat(),
            "age_seconds": round((now - row.checked_at).total_seconds(), 1),
            "changed_at": row.changed_at.isoformat() if row.changed_at else None,
        }
        for row in MediaStore.objects.order_by("host")
    ]
