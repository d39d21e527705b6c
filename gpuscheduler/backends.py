"""The one interface every device backend implements: what devices exist and how they read now.

Backends never raise for a single device's trouble: a device that cannot be read comes back as a
Reading with ok=False and the error text, so one lost GPU never stops the collector.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from gpuscheduler.conf import gpu_config

log = logging.getLogger(__name__)


class BackendUnavailable(Exception):
    """The backend cannot run here at all (no NVML library, no driver)."""


@dataclass(frozen=True)
class DeviceInfo:
    uuid: str
    name: str
    kind: str  # a DeviceKind value
    index: int | None = None
    pci_bus_id: str = ""
    memory_total: int = 0
    speed: float = 1.0


@dataclass(frozen=True)
class Reading:
    uuid: str
    ok: bool
    error: str = ""
    memory_used: int | None = None
    memory_total: int | None = None
    utilization: float | None = None
    temperature: float | None = None
    power_watts: float | None = None
    throttle_reasons: tuple[str, ...] = field(default_factory=tuple)
    # (pid, bytes) of each process holding device memory, where the backend can tell.
    process_memory: tuple[tuple[int, int], ...] = field(default_factory=tuple)


class Backend(Protocol):
    name: str

    def devices(self) -> list[DeviceInfo]: ...

    def read(self, uuids: Collection[str] | None = None) -> list[Reading]:
        """A reading of every device, or only of those in `uuids` (a worker reads its own)."""
        ...

    def close(self) -> None: ...


# GPU_BACKEND's choices; "auto" is NVML where it initializes, else the CPU.
BACKENDS = ("auto", "nvml", "cpu", "simulated")


def cpu_uuid(host: str) -> str:
    """The CPU device of one host: UUIDs key devices cluster-wide, so it names its host id."""
    return f"CPU-{host}"


class CpuBackend:
    """One device: this host's CPU. Memory is the host's; there is no temperature to read."""

    name = "cpu"

    def __init__(self, host: str | None = None) -> None:
        self.uuid = cpu_uuid(host or gpu_config()["HOST"])

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(uuid=self.uuid, name="CPU", kind="cpu", index=None, memory_total=_host_memory()[0])]

    def read(self, uuids: Collection[str] | None = None) -> list[Reading]:
        if uuids is not None and self.uuid not in uuids:
            return []
        total, available = _host_memory()
        load = None
        with contextlib.suppress(OSError):
            load = min(100.0, 100.0 * os.getloadavg()[0] / (os.cpu_count() or 1))
        used = total - available if total else None
        return [Reading(uuid=self.uuid, ok=True, memory_used=used, memory_total=total or None, utilization=load)]

    def close(self) -> None:
        pass


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo; (0, 0) where there is none."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def get_backend(name: str | None = None) -> Backend:
    """Build the configured backend; `auto` means NVML where it initializes, else the CPU."""
    config = gpu_config()
    name = name or config["BACKEND"]
    if name == "cpu":
        return CpuBackend()
    if name == "simulated":
        from gpuscheduler.simulated import SimulatedBackend

        return SimulatedBackend(config["SIMULATED"], host=config["HOST"])
    from gpuscheduler.nvml import NvmlBackend

    if name == "nvml":
        return NvmlBackend()
    if name != "auto":
        raise BackendUnavailable(f"Unknown GPU_BACKEND {name!r}: use one of {', '.join(BACKENDS)}.")
    try:
        backend = NvmlBackend()
    except BackendUnavailable as exc:
        log.info("NVML is not available (%s): using the CPU backend", exc)
        return CpuBackend()
    if not backend.devices():
        backend.close()
        log.info("NVML reports no GPU: using the CPU backend")
        return CpuBackend()
    return backend
