"""The media store of each host as a health input, like a GPU's memory.

Sample PNGs are written to the samples storage (config/storage.py): a folder, which several hosts may
share, or an S3 bucket. A full disk (ENOSPC), a read-only folder (EROFS), a missing bucket or an
unreachable endpoint used to surface only as attempts that timed out; here the store is read like a
device, as each host sees it: a probe object written through the storage and removed, and for a
folder its free space (shutil.disk_usage) against STORAGE_MIN_FREE_MB (a bucket has no such limit).
Probe names carry the host and PID, beside samples/ (which verify_samples keeps for the images
alone). The verdict is kept per host in MediaStore. While a host's store is unhealthy its workers
take no work and placement passes its devices by; the next good reading ends that, with no restart.

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

from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.db import IntegrityError, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q

from config.storage import (
    samples_storage,
    storage_error_text,
    storage_errors,
    storage_label,
    storage_local_path,
    storage_where,
)
from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import gpu_config
from gpuscheduler.models import MediaStore
from gpuscheduler.policies import store_admit

log = logging.getLogger(__name__)

STORE_CHECK_SECONDS = 5.0
# About one sample PNG: a disk too full for the probe is too full for the images. Random bytes, so
# a compressing file system cannot store it in no space at all.
PROBE_BYTES = 256 * 1024
PROBE_PREFIX = ".storage-probe-"
# A probe lives for milliseconds; one older than this was left by a process killed while probing
# (on any host: the margin covers clocks that disagree).
PROBE_LEFT_SECONDS = 600


@dataclass(frozen=True)
class StoreReading:
    """One reading of a media store: whether a probe file could be written there, and a folder's free space."""

    path: str
    writable: bool
    free_bytes: int | None = None
    total_bytes: int | None = None
    error: str = ""


def store_error_text(exc: Exception, label: str) -> str:
    """The error as an operator needs it: "No space left on device: media/.storage-probe-gpu1-412"."""
    return f"{storage_error_text(exc)}: {label}"


def store_fault_simulate(*, path: Path | str) -> None:
    """With GPU_BACKEND=simulated, raise the storage error switched on for this host by
    gpuscheduler.simulated.set_storage_fault (tests, benchmarks); nothing otherwise."""
    config = gpu_config()
    if config["BACKEND"] != "simulated":
        return
    from gpuscheduler import simulated

    simulated.storage_fault_raise(host=config["HOST"], path=path)


def _probe_write(storage: Storage, name: str) -> None:
    store_fault_simulate(path=storage_label(storage, name))
    # Written as the images are (a folder's storage fsyncs it: a network file system, or one with
    # delayed allocation, may report a full disk only then).
    storage.save(name, ContentFile(os.urandom(PROBE_BYTES)))


def store_read(*, host: str, storage: Storage | None = None) -> StoreReading:
    """Read this host's view of the samples storage: whether a probe file of PROBE_BYTES can be written
    and removed there, and for a folder (created if missing) its free space. The seam tests replace."""
    storage = storage or samples_storage()
    where = storage_where(storage)
    safe_host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in host)[:64]
    probe = f"{PROBE_PREFIX}{safe_host}-{os.getpid()}"
    error = ""
    try:
        _probe_write(storage, probe)
    except storage_errors() as exc:
        # Nothing more is asked of a store that failed (an unreachable endpoint answers each call
        # only after its timeouts); a probe it kept is removed as a leftover by a later reading.
        error = store_error_text(exc, storage_label(storage, probe))
    else:
        with contextlib.suppress(*storage_errors()):
            storage.delete(probe)
        _probes_left_remove(storage)
    local = storage_local_path(storage)
    if local is None:
        return StoreReading(where, not error, error=error)  # a bucket: no free space to read
    try:
        usage = shutil.disk_usage(local)
    except OSError as exc:
        return StoreReading(where, False, error=error or store_error_text(exc, local.name))
    return StoreReading(where, not error, usage.free, usage.total, error)


def _probes_left_remove(storage: Storage) -> None:
    """Remove probe files of processes killed while probing."""
    cutoff = time.time() - PROBE_LEFT_SECONDS
    with contextlib.suppress(*storage_errors()):
        for name in storage.listdir("")[1]:
            if name.startswith(PROBE_PREFIX):
                with contextlib.suppress(*storage_errors()):
                    if storage.get_modified_time(name).timestamp() < cutoff:
                        storage.delete(name)


# --- services ------------------------------------------------------------------------------------


def store_check(*, host: str, reading: StoreReading | None = None) -> MediaStore:
    """Read this host's media folder now (or judge `reading`) and record the verdict."""
    started = db_now()  # the database's time, as the worker's report uses: the two are ordered by it
    reading = reading or store_read(host=host)
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
    _store_record(host=host, healthy=False, reason=error, at=db_now())


def store_refresh(*, host: str, max_age: float = STORE_CHECK_SECONDS) -> MediaStore:
    """This host's store verdict, read again (a probe) only when older than `max_age` seconds."""
    fresh = ExpressionWrapper(Q(checked_at__gt=DbNow() - timedelta(seconds=max_age)), output_field=BooleanField())
    row = MediaStore.objects.filter(host=host).annotate(fresh=fresh).first()
    if row is not None and row.fresh:
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
        # A tie (one millisecond on SQLite, its resolution of the database's time) goes to the error.
        if row.checked_at > at or (row.checked_at == at and not row.healthy):
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
    """Every host's media store with its latest verdict, as plain data (`now`: clock.db_now())."""
    now = now or db_now()
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
