"""Which models each device holds warm, has evicted, or cannot load (DeviceModel rows).

A device's worker writes its device's rows as its pipeline cache changes: the Generator (in
personas, above the scheduler) reports through the ModelEvents the worker hands it. Placement,
stealing and the status page read them.

Rows are made on first use, and two workers of one device may overlap for a moment (one dying,
its successor attaching), so every write is one conditional UPDATE, and an INSERT only where none
matched, retried as an UPDATE when another process inserted first (the unique constraint
decides). Safe with any number of hosts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, IntegrityError, close_old_connections, transaction
from django.db.models import F

from gpuscheduler.clock import DbNow
from gpuscheduler.models import DeviceModel, ModelState

log = logging.getLogger(__name__)

KEY_LENGTH = 300  # DeviceModel.model


def _upsert(*, device_id: int, model: str, update: dict[str, Any], create: dict[str, Any]) -> None:
    rows = DeviceModel.objects.filter(device_id=device_id, model=model[:KEY_LENGTH])
    if rows.update(**update, updated_at=DbNow()):
        return
    try:
        with transaction.atomic():
            DeviceModel.objects.create(device_id=device_id, model=model[:KEY_LENGTH], **create)
    except IntegrityError:
        rows.update(**update, updated_at=DbNow())  # another process made the row a moment ago


def model_loaded(*, device_id: int, model: str, seconds: float, memory_bytes: int | None) -> None:
    """The device's worker loaded `model` in `seconds`, holding `memory_bytes` (as measured)."""
    fields = {
        "state": ModelState.WARM,
        "reason": "",
        "load_seconds": seconds,
        "memory_bytes": memory_bytes,
        "loaded_at": DbNow(),
        "used_at": DbNow(),
    }
    _upsert(device_id=device_id, model=model, update={**fields, "loads": F("loads") + 1}, create={**fields, "loads": 1})


def model_used(*, device_id: int, model: str, memory_bytes: int | None = None) -> None:
    """`model` ran on the device from a pipeline already loaded (loaded for it, or for a model that
    differs from it only in image size or steps, which shares its pipeline): warm, used now."""
    fields: dict[str, Any] = {"state": ModelState.WARM, "reason": "", "used_at": DbNow()}
    if memory_bytes is not None:
        fields["memory_bytes"] = memory_bytes
    _upsert(device_id=device_id, model=model, update=fields, create=fields)


def model_evicted(*, device_id: int, model: str, freed_bytes: int | None, reason: str = "") -> None:
    """The device's worker evicted `model` (its memory released; `freed_bytes` as measured)."""
    freed = f"; {freed_bytes / 1024**2:.0f} MiB freed" if freed_bytes is not None else ""
    DeviceModel.objects.filter(device_id=device_id, model=model[:KEY_LENGTH], state=ModelState.WARM).update(
        state=ModelState.EVICTED, reason=f"evicted: {reason}{freed}"[:2000], updated_at=DbNow()
    )


def model_failed(*, device_id: int, model: str, reason: str) -> None:
    """`model` does not load on the device: that pair is out of service, with the reason."""
    fields = {"state": ModelState.FAILED, "reason": reason[:2000]}
    _upsert(device_id=device_id, model=model, update=fields, create=fields)


def models_forget(*, device_id: int, reason: str) -> int:
    """The device's worker process starts or stops, holding nothing: its warm models are evicted.
    Returns how many were. (Failed pairs stay failed: a restart does not fix a model's files.)"""
    return DeviceModel.objects.filter(device_id=device_id, state=ModelState.WARM).update(
        state=ModelState.EVICTED, reason=f"evicted: {reason}"[:2000], updated_at=DbNow()
    )


# --- reads ------------------------------------------------------------------------------------------


def warm_models(*, device_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
    """The models each device holds warm, by device id (devices with none are left out)."""
    rows = DeviceModel.objects.filter(state=ModelState.WARM)
    if device_ids is not None:
        rows = rows.filter(device_id__in=list(device_ids))
    found: dict[int, list[str]] = {}
    for device_id, model in rows.order_by("device_id", "model").values_list("device_id", "model"):
        found.setdefault(device_id, []).append(model)
    return found


def failed_models(*, device_ids: Iterable[int] | None = None) -> dict[int, dict[str, str]]:
    """The models each device cannot load, with the reason, by device id."""
    rows = DeviceModel.objects.filter(state=ModelState.FAILED)
    if device_ids is not None:
        rows = rows.filter(device_id__in=list(device_ids))
    found: dict[int, dict[str, str]] = {}
    for device_id, model, reason in rows.values_list("device_id", "model", "reason"):
        found.setdefault(device_id, {})[model] = reason
    return found


def load_times(*, model: str) -> dict[int, float]:
    """Each device's latest measured load time of `model`, in seconds (devices that never loaded it
    are left out)."""
    rows = DeviceModel.objects.filter(model=model[:KEY_LENGTH], load_seconds__isnull=False)
    return {device_id: float(seconds or 0.0) for device_id, seconds in rows.values_list("device_id", "load_seconds")}


# --- what a worker hands its Generator ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelEvents:
    """Where a device's pipeline cache reports what it holds: the device's DeviceModel rows.

    Without a device (a Generator in a test or a benchmark, `regenerate_samples --sync`, whose
    process holds its pipelines only while it runs) nothing is recorded. A write that fails is
    logged and costs the job nothing: the rows are a hint for placement, the job's images are not.
    """

    device_id: int | None = None

    def loaded(self, model: str, seconds: float, memory_bytes: int | None) -> None:
        self._write(model_loaded, model=model, seconds=seconds, memory_bytes=memory_bytes)

    def used(self, model: str, memory_bytes: int | None = None) -> None:
        self._write(model_used, model=model, memory_bytes=memory_bytes)

    def evicted(self, model: str, freed_bytes: int | None, reason: str = "") -> None:
        self._write(model_evicted, model=model, freed_bytes=freed_bytes, reason=reason)

    def failed(self, model: str, reason: str) -> None:
        self._write(model_failed, model=model, reason=reason)

    def _write(self, write: Callable[..., None], **fields: Any) -> None:
        if self.device_id is None:
            return
        try:
            write(device_id=self.device_id, **fields)
        except DatabaseError:
            log.exception("could not record %s of %s on device %s", write.__name__, fields["model"], self.device_id)
            close_old_connections()
