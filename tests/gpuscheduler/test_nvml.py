"""The NVML adapter against a fake `pynvml`, and the monitor tick (snapshots_record) on top of it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from gpuscheduler.backends import BackendUnavailable, CpuBackend, Reading, get_backend
from gpuscheduler.models import Device, Health, Snapshot
from gpuscheduler.nvml import NvmlBackend, decode_throttle_reasons
from gpuscheduler.services import snapshots_record

GIB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    used: int = 2 * GIB
    total: int = 80 * GIB
    gpu_util: int = 37
    bandwidth_util: int = 91  # nvmlUtilization_t.memory: bandwidth, never occupancy
    temperature: int = 44
    power_mw: int = 123_456
    clocks_event_mask: int = 0x1
    bus_id: str = "00000000:19:00.0"
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)


class FakeNvml:
    """Just enough of pynvml for gpuscheduler.nvml: the functions it calls and the error classes."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *gpus: FakeGpu, init_error: Exception | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.initialized = False
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def _check(self, gpu: FakeGpu, what: str) -> FakeGpu:
        self.calls.append(what)
        if gpu.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        if what in gpu.unsupported:
            raise NVMLError_NotSupported("Not Supported")
        return gpu

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return self._check(gpu, "uuid").uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return self._check(gpu, "name").name.encode()  # older bindings answer bytes

    def nvmlDeviceGetPciInfo(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(busId=self._check(gpu, "pci").bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        gpu = self._check(gpu, "memory")
        return SimpleNamespace(used=gpu.used, total=gpu.total, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        gpu = self._check(gpu, "utilization")
        return SimpleNamespace(gpu=gpu.gpu_util, memory=gpu.bandwidth_util)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._check(gpu, "temperature").temperature

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        return self._check(gpu, "power").power_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu: FakeGpu) -> int:
        return self._check(gpu, "clocks").clocks_event_mask


def by_uuid(readings: list[Reading]) -> dict[str, Reading]:
    return {r.uuid: r for r in readings}


# --- initialization and backend choice ------------------------------------------------------


def test_library_not_found_at_init_means_the_backend_is_unavailable():
    fake = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with pytest.raises(BackendUnavailable, match="NVMLError_LibraryNotFound: NVML Shared Library Not Found"):
        NvmlBackend(module=fake)


def test_auto_backend_falls_back_to_the_cpu_when_nvml_is_unavailable(monkeypatch):
    fake = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = get_backend("auto")
    assert isinstance(backend, CpuBackend)
    assert [d.uuid for d in backend.devices()] == ["CPU-testhost"], "the CPU's UUID names its host id"


def test_auto_backend_falls_back_to_the_cpu_when_nvml_sees_no_gpu(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert isinstance(get_backend("auto"), CpuBackend)
    assert not fake.initialized, "the unused NVML session is shut down"


def test_auto_backend_uses_nvml_when_it_sees_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(FakeGpu("GPU-aaaa")))
    backend = get_backend("auto")
    assert isinstance(backend, NvmlBackend)
    assert [d.uuid for d in backend.devices()] == ["GPU-aaaa"]


def test_an_explicit_nvml_backend_does_not_fall_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=NVMLError_LibraryNotFound("not found")))
    with pytest.raises(BackendUnavailable):
        get_backend("nvml")


def test_an_unknown_backend_name_is_refused():
    with pytest.raises(BackendUnavailable, match="Unknown GPU_BACKEND 'cuda'"):
        get_backend("cuda")


# --- devices ------------------------------------------------------------------------------------


def test_devices_are_identified_by_uuid_with_nvml_index_name_bus_and_memory():
    backend = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb", name="NVIDIA L4", total=24 * GIB)))
    first, second = backend.devices()
    assert (first.uuid, first.index, first.name, first.kind) == ("GPU-aaaa", 0, "NVIDIA H100 80GB HBM3", "cuda")
    assert first.pci_bus_id == "00000000:19:00.0"
    assert (second.uuid, second.index, second.name, second.memory_total) == ("GPU-bbbb", 1, "NVIDIA L4", 24 * GIB)


def test_a_device_without_pci_or_memory_support_is_still_listed():
    backend = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", unsupported={"pci", "memory"})))
    (info,) = backend.devices()
    assert (info.uuid, info.pci_bus_id, info.memory_total) == ("GPU-aaaa", "", 0)


def test_a_device_that_cannot_say_who_it_is_is_left_out_and_the_others_listed():
    backend = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", lost=True), FakeGpu("GPU-bbbb")))
    assert [(d.uuid, d.index) for d in backend.devices()] == [("GPU-bbbb", 1)]


# --- readings -----------------------------------------------------------------------------------


def test_a_reading_has_memory_from_memory_info_not_utilization_memory():
    fake = FakeNvml(FakeGpu("GPU-aaaa", used=10 * GIB, total=80 * GIB, gpu_util=37, bandwidth_util=99))
    (reading,) = NvmlBackend(module=fake).read()
    assert reading.ok
    assert (reading.memory_used, reading.memory_total) == (10 * GIB, 80 * GIB)
    assert reading.utilization == 37.0, "utilization is the .gpu field; .memory is bandwidth"


def test_a_reading_converts_power_to_watts_and_keeps_the_temperature():
    (reading,) = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", power_mw=123_456, temperature=61))).read()
    assert reading.power_watts == pytest.approx(123.456)
    assert reading.temperature == 61.0


@pytest.mark.parametrize("unsupported", ["utilization", "temperature", "power", "clocks"])
def test_a_not_supported_reading_becomes_none_and_the_rest_still_reads(unsupported):
    (reading,) = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", unsupported={unsupported}))).read()
    assert reading.ok and reading.error == ""
    values = {
        "utilization": reading.utilization,
        "temperature": reading.temperature,
        "power": reading.power_watts,
        "clocks": reading.throttle_reasons or None,
    }
    assert values.pop(unsupported) is None
    assert all(value is not None for value in values.values()), values
    assert reading.memory_used == 2 * GIB


def test_unsupported_memory_info_leaves_memory_empty_but_the_device_readable():
    (reading,) = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", unsupported={"memory"}))).read()
    assert reading.ok
    assert (reading.memory_used, reading.memory_total) == (None, None)
    assert reading.temperature == 44.0


def test_every_optional_reading_unsupported_still_gives_an_ok_reading():
    gpu = FakeGpu("GPU-aaaa", unsupported={"memory", "utilization", "temperature", "power", "clocks"})
    (reading,) = NvmlBackend(module=FakeNvml(gpu)).read()
    assert reading == Reading(uuid="GPU-aaaa", ok=True)


def test_a_lost_gpu_gives_a_failed_reading_for_that_device_only():
    fake = FakeNvml(FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb", used=5 * GIB))
    backend = NvmlBackend(module=fake)
    backend.devices()
    fake.gpus[0].lost = True  # falls off the bus after the monitor started
    readings = by_uuid(backend.read())
    assert readings["GPU-aaaa"] == Reading(uuid="GPU-aaaa", ok=False, error="NVMLError_GpuIsLost: GPU is lost")
    assert readings["GPU-bbbb"].ok
    assert readings["GPU-bbbb"].memory_used == 5 * GIB


def test_an_error_in_a_later_reading_also_fails_only_that_device():
    class Flaky(FakeNvml):
        def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
            if gpu.uuid == "GPU-aaaa":
                raise NVMLError("Unknown Error")
            return super().nvmlDeviceGetTemperature(gpu, sensor)

    readings = by_uuid(NvmlBackend(module=Flaky(FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb"))).read())
    assert (readings["GPU-aaaa"].ok, readings["GPU-aaaa"].error) == (False, "NVMLError: Unknown Error")
    assert readings["GPU-bbbb"].ok and readings["GPU-bbbb"].temperature == 44.0


def test_throttle_reasons_are_decoded_from_the_clocks_event_mask():
    (reading,) = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", clocks_event_mask=0x4 | 0x20 | 0x40))).read()
    assert reading.throttle_reasons == ("sw_power_cap", "sw_thermal", "hw_thermal")


@pytest.mark.parametrize(
    ("mask", "reasons"),
    [
        (0, ()),
        (0x1, ("gpu_idle",)),
        (0x8 | 0x80, ("hw_slowdown", "hw_power_brake")),
        (
            0x1FF,
            (
                "gpu_idle",
                "applications_clocks",
                "sw_power_cap",
                "hw_slowdown",
                "sync_boost",
                "sw_thermal",
                "hw_thermal",
                "hw_power_brake",
                "display_clocks",
            ),
        ),
        (0x10000, ()),  # bits this adapter does not know are ignored, not misread
    ],
)
def test_decode_throttle_reasons(mask, reasons):
    assert decode_throttle_reasons(mask) == reasons


def test_close_shuts_nvml_down_and_ignores_an_error_while_doing_so():
    fake = FakeNvml(FakeGpu("GPU-aaaa"))
    backend = NvmlBackend(module=fake)
    backend.close()
    assert not fake.initialized

    def broken() -> None:
        raise NVMLError("Uninitialized")

    fake.nvmlShutdown = broken  # type: ignore[method-assign]
    backend.close()


# --- the monitor tick -------------------------------------------------------------------------


def test_snapshots_record_marks_only_the_lost_gpu_unhealthy_and_stores_both_snapshots(db, settings):
    host = settings.GPUSCHEDULER["HOST"]
    fake = FakeNvml(FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb", used=6 * GIB, temperature=52, clocks_event_mask=0x20))
    backend = NvmlBackend(module=fake)
    backend.devices()
    fake.gpus[0].lost = True

    snapshots = snapshots_record(backend=backend, host=host)

    assert len(snapshots) == 2
    lost = Device.objects.get(host=host, uuid="GPU-aaaa")
    fine = Device.objects.get(host=host, uuid="GPU-bbbb")
    assert lost.health == Health.UNHEALTHY
    assert lost.health_reason == "NVML error: NVMLError_GpuIsLost: GPU is lost"
    assert fine.health == Health.HEALTHY
    assert lost.last_seen is not None and fine.last_seen is not None
    lost_snap = Snapshot.objects.get(device=lost)
    fine_snap = Snapshot.objects.get(device=fine)
    assert (lost_snap.health, lost_snap.error, lost_snap.memory_used) == (
        Health.UNHEALTHY,
        "NVMLError_GpuIsLost: GPU is lost",
        None,
    )
    assert (fine_snap.health, fine_snap.error) == (Health.HEALTHY, "")
    assert (fine_snap.memory_used, fine_snap.memory_total, fine_snap.temperature) == (6 * GIB, 80 * GIB, 52.0)
    assert fine_snap.throttle_reasons == "sw_thermal"


def test_a_lost_gpu_that_reads_again_goes_to_probation_not_straight_back_to_healthy(db, settings):
    host = settings.GPUSCHEDULER["HOST"]
    fake = FakeNvml(FakeGpu("GPU-aaaa"))
    backend = NvmlBackend(module=fake)
    backend.devices()
    fake.gpus[0].lost = True
    snapshots_record(backend=backend, host=host)
    fake.gpus[0].lost = False

    snapshots_record(backend=backend, host=host)

    device = Device.objects.get(host=host, uuid="GPU-aaaa")
    assert device.health == Health.PROBATION
    assert "waiting for a canary job" in device.health_reason
    assert Snapshot.objects.filter(device=device).count() == 2


def test_snapshots_record_marks_a_hot_gpu_unhealthy_with_the_reason(db, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MAX_TEMPERATURE": 85.0}
    host = settings.GPUSCHEDULER["HOST"]
    backend = NvmlBackend(module=FakeNvml(FakeGpu("GPU-aaaa", temperature=91), FakeGpu("GPU-bbbb")))

    snapshots_record(backend=backend, host=host)

    hot = Device.objects.get(uuid="GPU-aaaa")
    assert (hot.health, hot.health_reason) == (Health.UNHEALTHY, "temperature 91 C is at or above the 85 C limit")
    assert Device.objects.get(uuid="GPU-bbbb").health == Health.HEALTHY


def test_a_worker_reads_only_its_own_gpu():
    fake = FakeNvml(FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb", used=5 * GIB))
    backend = NvmlBackend(module=fake)
    backend.devices()
    fake.calls.clear()
    (reading,) = backend.read(["GPU-bbbb"])
    assert (reading.uuid, reading.memory_used) == ("GPU-bbbb", 5 * GIB)
    assert fake.calls.count("memory") == 1, "the other GPU is not read at all"


def test_the_cpu_backend_reads_the_cpu_only_when_asked_for_it():
    assert [r.uuid for r in CpuBackend().read(["CPU-testhost"])] == ["CPU-testhost"]
    assert CpuBackend().read(["GPU-aaaa"]) == []


def test_a_steady_monitor_tick_costs_the_same_queries_for_two_gpus_or_eight(db, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    host = settings.GPUSCHEDULER["HOST"]
    counts = []
    for n in (2, 8):
        Device.objects.all().delete()
        backend = NvmlBackend(module=FakeNvml(*(FakeGpu(f"GPU-{n}-{i:04d}") for i in range(n))))
        snapshots_record(backend=backend, host=host)  # registers the devices, first verdicts
        with CaptureQueriesContext(connection) as tick:
            assert len(snapshots_record(backend=backend, host=host)) == n
        counts.append(len(tick.captured_queries))
    assert counts[0] == counts[1], counts
