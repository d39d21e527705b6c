"""A simulated GPU backend for tests, benchmarks and demos on machines without GPUs.

Devices come from GPU_SIMULATED (``NAME[:SPEED][*COUNT]``). Their memory, utilization and
temperature move with the load that simulated workers report, and tests flip fault switches
(device lost, NVML error, over temperature, out of memory, hang). State is shared by every
process of the installation (monitor, workers, tests) through one JSON file under DATA_DIR,
read and written under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings

from config.env import parse_simulated_spec
from gpuscheduler.backends import DeviceInfo, Reading
from gpuscheduler.conf import gpu_config

GIB = 1024**3
MEMORY_BY_NAME = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "A10": 24, "L4": 24, "T4": 16, "V100": 32}
DEFAULT_MEMORY_GIB = 24
BASE_MEMORY = 512 * 1024**2  # what a driver and an idle context hold
ACTIVATION_BYTES_PER_IMAGE = GIB // 2
IDLE_C, BUSY_C, OVER_C, TAU_S = 35.0, 78.0, 97.0, 20.0
SPANS_KEPT_S, MAX_SPANS = 60.0, 200  # the last minute of busy spans: the longest utilization window
_NAMESPACE = uuidlib.UUID("6f1c1c52-5b6e-4b8e-9a4a-3d1f0e2a7c11")

FAULTS = (
    "lost",
    "nvml_error",
    "over_temperature",
    "oom_above_batch",
    "hang_seconds",
    "hang_native",
    "fail",
    "load_seconds",  # every model load this slow (a real model takes 12-18 s on an H100)
)


def simulated_uuid(host: str, index: int, name: str) -> str:
    return "SIM-" + str(uuidlib.uuid5(_NAMESPACE, f"{host}/{index}/{name}"))


def describe(spec: str, host: str) -> list[DeviceInfo]:
    return [
        DeviceInfo(
            uuid=simulated_uuid(host, index, name),
            name=name,
            kind="simulated",
            index=index,
            pci_bus_id=f"00000000:{0x10 + index:02X}:00.0",
            memory_total=MEMORY_BY_NAME.get(name.upper(), DEFAULT_MEMORY_GIB) * GIB,
            speed=speed,
        )
        for index, (name, speed) in enumerate(parse_simulated_spec(spec))
    ]


# --- shared state -------------------------------------------------------------------------


def state_path() -> Path:
    return Path(settings.DATA_DIR) / "simulated-gpus.json"


@contextlib.contextmanager
def _locked_state() -> Iterator[dict[str, Any]]:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            state = {}
        yield state
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def read_state() -> dict[str, Any]:
    path = state_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _update(uuid: str, change: Callable[[dict[str, Any], float], None]) -> None:
    now = time.time()
    with _locked_state() as state:
        entry = state.setdefault(uuid, {})
        # Fold the temperature curve up to now before the load changes its target.
        entry["temp"] = _temperature(entry, now)
        entry["temp_at"] = now
        change(entry, now)


def set_faults(uuid: str, **switches: Any) -> None:
    """Flip fault switches on one simulated device (None clears one)."""
    unknown = set(switches) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown simulated fault(s): {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")

    def change(entry: dict[str, Any], now: float) -> None:
        faults = entry.setdefault("faults", {})
        for key, value in switches.items():
            if value is None or value is False:
                faults.pop(key, None)
            else:
                faults[key] = value

    _update(uuid, change)


def clear_faults(uuid: str | None = None) -> None:
    with _locked_state() as state:
        for key, entry in state.items():
            if uuid is None or key == uuid:
                entry["faults"] = {}


def faults(uuid: str) -> dict[str, Any]:
    return dict(read_state().get(uuid, {}).get("faults", {}))


# Simulated storage faults, per host: what a write to the media folder raises (see
# gpuscheduler.storage.store_fault_simulate, consulted only with GPU_BACKEND=simulated).
STORAGE_FAULTS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}


def _storage_key(host: str) -> str:
    return f"storage@{host}"


def set_storage_fault(host: str, fault: str | None) -> None:
    """Make writes to the media folder of `host` fail as a full disk ("enospc") or a read-only
    file system ("erofs") in every process of the installation; None clears it."""
    if fault is not None and fault not in STORAGE_FAULTS:
        raise ValueError(f"unknown simulated storage fault {fault!r}; known: {', '.join(STORAGE_FAULTS)}")
    with _locked_state() as state:
        faults = state.setdefault(_storage_key(host), {}).setdefault("faults", {})
        if fault is None:
            faults.pop("storage", None)
        else:
            faults["storage"] = fault


def storage_fault_raise(*, host: str, path: Path | str) -> None:
    """Raise the simulated storage error of `host` for a write to `path`, if one is switched on."""
    fault = read_state().get(_storage_key(host), {}).get("faults", {}).get("storage")
    if fault in STORAGE_FAULTS:
        code = STORAGE_FAULTS[fault]
        raise OSError(code, f"{os.strerror(code)} (simulated)", str(path))


def set_model_memory(uuid: str, nbytes: int) -> None:
    def change(entry: dict[str, Any], now: float) -> None:
        entry["model_bytes"] = int(nbytes)

    _update(uuid, change)


# Memory held by each model a simulated worker keeps loaded, by a name of the worker's choosing:
# the reading rises when one loads and drops when the worker's cache evicts it.


def model_memory_add(uuid: str, name: str, nbytes: int) -> None:
    """A model of `nbytes` is now loaded on the simulated device."""

    def change(entry: dict[str, Any], now: float) -> None:
        entry.setdefault("models", {})[name] = int(nbytes)

    _update(uuid, change)


def model_memory_drop(uuid: str, name: str) -> None:
    """The model is unloaded: its memory is free again."""

    def change(entry: dict[str, Any], now: float) -> None:
        entry.setdefault("models", {}).pop(name, None)

    _update(uuid, change)


def model_memory(uuid: str) -> int:
    """The memory the device's loaded models hold, in bytes (what its worker's allocator would say)."""
    return _model_bytes(read_state().get(uuid, {}))


def _model_bytes(entry: dict[str, Any]) -> int:
    return int(entry.get("model_bytes", 0)) + sum(int(n) for n in entry.get("models", {}).values())


@contextlib.contextmanager
def busy(uuid: str, images: int) -> Iterator[None]:
    """Report a running pipeline call of `images` images on a simulated device."""

    def start(entry: dict[str, Any], now: float) -> None:
        if not entry.get("busy", 0):
            entry["busy_since"] = now
        entry["busy"] = entry.get("busy", 0) + 1
        entry["active_bytes"] = entry.get("active_bytes", 0) + images * ACTIVATION_BYTES_PER_IMAGE

    def stop(entry: dict[str, Any], now: float) -> None:
        entry["busy"] = max(0, entry.get("busy", 0) - 1)
        entry["active_bytes"] = max(0, entry.get("active_bytes", 0) - images * ACTIVATION_BYTES_PER_IMAGE)
        if not entry["busy"]:
            _busy_span_close(entry, now)

    _update(uuid, start)
    try:
        yield
    finally:
        _update(uuid, stop)


def reset_load(uuid: str, owner_pid: int | None = None) -> None:
    """Forget the load of a worker that died (the kernel freed its memory); note the new owner."""

    def change(entry: dict[str, Any], now: float) -> None:
        if entry.get("busy", 0):
            _busy_span_close(entry, now)
        entry["busy"] = 0
        entry["active_bytes"] = 0
        entry["model_bytes"] = 0
        entry["models"] = {}
        entry["owner_pid"] = owner_pid

    _update(uuid, change)


def _busy_span_close(entry: dict[str, Any], now: float) -> None:
    """Keep the busy span that just ended (the last minute's, for busy_share)."""
    since = float(entry.pop("busy_since", now))
    spans = [span for span in entry.get("busy_spans", []) if span[1] > now - SPANS_KEPT_S]
    entry["busy_spans"] = [*spans, [since, now]][-MAX_SPANS:]


def busy_share(entry: dict[str, Any], now: float, window: float) -> float:
    """The share of the last `window` seconds the device spent in pipeline calls, 0 to 1.

    What NVML's utilization is: the share of its last sample period in which a kernel ran. A
    reading of the busy flag alone said 0 % and "gpu_idle" for a device working flat out on short
    calls (the tiny model's take a fraction of a second; claims, PNGs and commits fill the gaps), as
    long as the monitor's reading fell between two calls, which it nearly always did.
    """
    start = now - window
    spans = [(float(a), float(b)) for a, b in entry.get("busy_spans", [])]
    if entry.get("busy", 0):
        spans.append((float(entry.get("busy_since", now)), now))
    busy = sum(max(0.0, min(b, now) - max(a, start)) for a, b in spans)
    return min(1.0, busy / window) if window > 0 else 0.0


def _temperature(entry: dict[str, Any], now: float) -> float:
    start = float(entry.get("temp", IDLE_C))
    since = float(entry.get("temp_at", now))
    target = BUSY_C if entry.get("busy", 0) else IDLE_C
    return target + (start - target) * math.exp(-max(0.0, now - since) / TAU_S)


# --- the backend ----------------------------------------------------------------------------


class SimulatedBackend:
    name = "simulated"

    def __init__(self, spec: str, *, host: str) -> None:
        self._infos = describe(spec, host)

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def close(self) -> None:
        pass

    def read(self, uuids: Collection[str] | None = None) -> list[Reading]:
        state = read_state()
        now = time.time()
        return [
            self._read_one(info, state.get(info.uuid, {}), now)
            for info in self._infos
            if uuids is None or info.uuid in uuids
        ]

    @staticmethod
    def _read_one(info: DeviceInfo, entry: dict[str, Any], now: float) -> Reading:
        switches = entry.get("faults", {})
        if switches.get("lost"):
            return Reading(uuid=info.uuid, ok=False, error="NVMLError_GpuIsLost: GPU is lost (simulated)")
        if switches.get("nvml_error"):
            return Reading(uuid=info.uuid, ok=False, error="NVMLError_Unknown: Unknown Error (simulated)")
        running = entry.get("busy", 0) > 0
        temperature = OVER_C if switches.get("over_temperature") else _temperature(entry, now)
        own_bytes = _model_bytes(entry) + int(entry.get("active_bytes", 0))
        used = BASE_MEMORY + own_bytes
        if running:
            utilization = min(100.0, 92.0 + 2.0 * entry.get("busy", 0))
        else:  # between calls: the share of the last sample period spent in calls, as NVML says
            window = min(SPANS_KEPT_S, max(1.0, float(gpu_config()["MONITOR_INTERVAL"])))
            utilization = round(100.0 * busy_share(entry, now, window), 1)
        owner = entry.get("owner_pid")
        reasons: tuple[str, ...] = ()
        if switches.get("over_temperature"):
            reasons = ("sw_thermal", "hw_thermal")
        elif not utilization:
            reasons = ("gpu_idle",)
        return Reading(
            uuid=info.uuid,
            ok=True,
            memory_used=min(used, info.memory_total),
            memory_total=info.memory_total,
            utilization=utilization,
            temperature=round(temperature, 1),
            power_watts=round(60.0 + 290.0 * utilization / 100.0 * info.speed, 1),
            throttle_reasons=reasons,
            process_memory=((int(owner), own_bytes),) if owner else (),
        )
