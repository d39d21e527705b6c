"""The NVML adapter: the only module that talks to `pynvml` (package nvidia-ml-py).

Facts it is built on (measured on an H100, see the project notes): every optional reading may
answer NotSupported (fan speed did); `nvmlUtilization_t.memory` is memory *bandwidth*, so
occupancy comes from nvmlDeviceGetMemoryInfo; NVML's index is not CUDA's, so devices are
identified by UUID.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Collection
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

from gpuscheduler.backends import BackendUnavailable, DeviceInfo, Reading

log = logging.getLogger(__name__)
T = TypeVar("T")

# Clock-event ("throttle") reason bits, as NVML defines them.
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}

_init_lock = threading.Lock()


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_BITS.items() if mask & bit)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    name = "nvml"

    def __init__(self, module: ModuleType | None = None) -> None:
        try:
            self.nv = module or importlib.import_module("pynvml")
        except ImportError as exc:
            raise BackendUnavailable(f"the nvidia-ml-py package is not installed ({exc})") from exc
        try:
            with _init_lock:
                self.nv.nvmlInit()
        except self.nv.NVMLError as exc:
            # NVMLError_LibraryNotFound / DriverNotLoaded mean "no GPU here", not a crash.
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._handles: dict[str, Any] = {}
        self._infos: list[DeviceInfo] | None = None

    def close(self) -> None:
        with contextlib.suppress(self.nv.NVMLError):
            self.nv.nvmlShutdown()

    def devices(self) -> list[DeviceInfo]:
        if self._infos is not None:
            return self._infos
        infos: list[DeviceInfo] = []
        count = self.nv.nvmlDeviceGetCount()
        for index in range(count):
            try:
                handle = self.nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(self.nv.nvmlDeviceGetUUID(handle))
                info = DeviceInfo(
                    uuid=uuid,
                    name=_text(self.nv.nvmlDeviceGetName(handle)),
                    kind="cuda",
                    index=index,
                    pci_bus_id=self._optional(partial(self._bus_id, handle)) or "",
                    memory_total=self._optional(partial(self._memory_total, handle)) or 0,
                )
            except self.nv.NVMLError as exc:
                # A device that cannot even say who it is cannot be scheduled; the others can.
                log.error("NVML device %d cannot be identified: %s", index, exc)
                continue
            self._handles[uuid] = handle
            infos.append(info)
        self._infos = infos
        return infos

    def _bus_id(self, handle: Any) -> str:
        return _text(self.nv.nvmlDeviceGetPciInfo(handle).busId)

    def _memory_total(self, handle: Any) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(handle).total)

    def read(self, uuids: Collection[str] | None = None) -> list[Reading]:
        return [self._read_one(info) for info in self.devices() if uuids is None or info.uuid in uuids]

    def _read_one(self, info: DeviceInfo) -> Reading:
        handle = self._handles[info.uuid]
        nv = self.nv
        memory_used: int | None
        memory_total: int | None
        try:
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            memory_used, memory_total = int(memory.used), int(memory.total)
        except nv.NVMLError_NotSupported:
            memory_used = memory_total = None
        except nv.NVMLError as exc:
            return Reading(uuid=info.uuid, ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            utilization = self._optional(lambda: float(nv.nvmlDeviceGetUtilizationRates(handle).gpu))
            temperature = self._optional(lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)))
            power = self._optional(lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            # nvidia-ml-py 12.535+ names it ClocksEvent; older releases only ClocksThrottle.
            reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
            )
            mask = self._optional(lambda: int(reasons(handle))) if reasons else None
            processes = getattr(nv, "nvmlDeviceGetComputeRunningProcesses", None)
            running = (self._optional(lambda: list(processes(handle))) if processes else None) or []
        except nv.NVMLError as exc:
            return Reading(uuid=info.uuid, ok=False, error=f"{type(exc).__name__}: {exc}")
        # usedGpuMemory is None where the driver cannot tell (some virtualized setups).
        process_memory = tuple(
            (int(p.pid), int(p.usedGpuMemory)) for p in running if getattr(p, "usedGpuMemory", None) is not None
        )
        return Reading(
            uuid=info.uuid,
            ok=True,
            memory_used=memory_used,
            memory_total=memory_total,
            utilization=utilization,
            temperature=temperature,
            power_watts=power,
            throttle_reasons=decode_throttle_reasons(mask) if mask else (),
            process_memory=process_memory,
        )

    def _optional(self, read: Callable[[], T]) -> T | None:
        """Run one reading; NotSupported becomes None, any other NVML error propagates."""
        try:
            return read()
        except self.nv.NVMLError_NotSupported:
            return None
