"""GPU_SIMULATED parsing and the simulated backend: readings that follow load, and fault switches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import parse_simulated_spec
from gpuscheduler import simulated
from gpuscheduler.backends import Reading, get_backend
from gpuscheduler.policies import Limits, admit
from gpuscheduler.simulated import (
    ACTIVATION_BYTES_PER_IMAGE,
    BASE_MEMORY,
    BUSY_C,
    GIB,
    IDLE_C,
    TAU_S,
    SimulatedBackend,
    busy,
    clear_faults,
    describe,
    set_faults,
    set_model_memory,
)


@pytest.fixture
def clock(monkeypatch):
    """The simulated backend's wall clock, moved by the test instead of by sleeping."""
    now = [1_000_000.0]
    monkeypatch.setattr(simulated, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def backend():
    return SimulatedBackend("H100*2", host="testhost")


def read(backend: SimulatedBackend, index: int) -> Reading:
    return backend.read()[index]


# --- GPU_SIMULATED ----------------------------------------------------------------------------


def test_spec_with_counts_and_speeds():
    assert parse_simulated_spec("H100*2,T4:0.25") == [("H100", 1.0), ("H100", 1.0), ("T4", 0.25)]


def test_spec_with_speed_and_count_together_and_spaces():
    assert parse_simulated_spec(" A100:2*3 , L4 ") == [("A100", 2.0)] * 3 + [("L4", 1.0)]


def test_spec_ignores_empty_items():
    assert parse_simulated_spec("sim,,") == [("sim", 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("H100*0", "'H100*0': the count after '*' must be a whole number from 1 to 64"),
        ("H100*two", "'H100*two': the count after '*' must be a whole number from 1 to 64"),
        ("H100*65", "'H100*65': the count after '*' must be a whole number from 1 to 64"),
        ("H100*-1", "the count after '*' must be a whole number from 1 to 64"),
        ("T4:fast", "'T4:fast': the speed after ':' must be a number from 0.01 to 100"),
        ("T4:0", "'T4:0': the speed after ':' must be a number from 0.01 to 100"),
        ("T4:nan", "the speed after ':' must be a number from 0.01 to 100"),
        ("T4:1000", "the speed after ':' must be a number from 0.01 to 100"),
        (":2", "the name must be 1-32 letters, digits, '-', '_' or '.'"),
        ("H 100", "'H 100': the name must be 1-32 letters"),
        ("H100/../x", "the name must be 1-32 letters"),
        ("x" * 33, "the name must be 1-32 letters"),
        ("", "GPU_SIMULATED describes no device: use e.g. 'H100*2,T4:0.25'"),
        (" , ", "GPU_SIMULATED describes no device"),
        ("H100*40,T4*40", "GPU_SIMULATED describes 80 devices; at most 64 are supported"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ImproperlyConfigured) as error:
        parse_simulated_spec(spec)
    assert message in str(error.value)


def test_described_devices_have_stable_distinct_uuids_memory_by_name_and_speed():
    first = describe("H100*2,T4:0.25,Mystery", "hostA")
    again = describe("H100*2,T4:0.25,Mystery", "hostA")
    elsewhere = describe("H100*2,T4:0.25,Mystery", "hostB")
    assert [d.uuid for d in first] == [d.uuid for d in again]
    assert len({d.uuid for d in first + elsewhere}) == 8, "unique per host and index"
    assert all(d.uuid.startswith("SIM-") and d.kind == "simulated" for d in first)
    assert [d.index for d in first] == [0, 1, 2, 3]
    assert [d.memory_total // GIB for d in first] == [80, 80, 16, 24]
    assert [d.speed for d in first] == [1.0, 1.0, 0.25, 1.0]


def test_get_backend_builds_the_configured_simulated_devices(settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "BACKEND": "simulated", "SIMULATED": "T4*3", "HOST": "h1"}
    devices = get_backend().devices()
    assert [(d.name, d.index) for d in devices] == [("T4", 0), ("T4", 1), ("T4", 2)]
    assert devices[0].uuid == simulated.simulated_uuid("h1", 0, "T4")


# --- readings that move with load ----------------------------------------------------------


def test_an_idle_device_reads_cool_idle_and_nearly_empty(backend, clock):
    reading = read(backend, 0)
    assert reading.ok
    assert (reading.utilization, reading.temperature, reading.memory_used) == (0.0, IDLE_C, BASE_MEMORY)
    assert reading.memory_total == 80 * GIB
    assert reading.throttle_reasons == ("gpu_idle",)


def test_busy_raises_utilization_and_memory_of_that_device_only(backend, clock):
    uuid = backend.devices()[0].uuid
    with busy(uuid, 4):
        loaded, other = backend.read()
        assert loaded.utilization >= 90.0
        assert loaded.memory_used == BASE_MEMORY + 4 * ACTIVATION_BYTES_PER_IMAGE
        assert loaded.power_watts > other.power_watts
        assert "gpu_idle" not in loaded.throttle_reasons
        assert (other.utilization, other.memory_used) == (0.0, BASE_MEMORY)
    after = read(backend, 0)
    assert (after.utilization, after.memory_used) == (0.0, BASE_MEMORY)


def test_two_overlapping_calls_add_their_memory(backend, clock):
    uuid = backend.devices()[1].uuid
    with busy(uuid, 2), busy(uuid, 3):
        assert read(backend, 1).memory_used == BASE_MEMORY + 5 * ACTIVATION_BYTES_PER_IMAGE
    assert read(backend, 1).memory_used == BASE_MEMORY


def test_a_loaded_model_holds_memory_while_idle(backend, clock):
    uuid = backend.devices()[0].uuid
    set_model_memory(uuid, 3 * GIB)
    assert read(backend, 0).memory_used == BASE_MEMORY + 3 * GIB
    simulated.reset_load(uuid)
    assert read(backend, 0).memory_used == BASE_MEMORY


def test_temperature_rises_while_busy_and_falls_after(backend, clock):
    uuid = backend.devices()[0].uuid
    with busy(uuid, 1):
        start = read(backend, 0).temperature
        clock[0] += TAU_S
        warm = read(backend, 0).temperature
        clock[0] += 10 * TAU_S
        hot = read(backend, 0).temperature
    assert start == IDLE_C
    assert warm == pytest.approx(BUSY_C - (BUSY_C - IDLE_C) / math.e, abs=0.1)
    assert hot == pytest.approx(BUSY_C, abs=0.1)
    clock[0] += TAU_S
    cooling = read(backend, 0).temperature
    assert IDLE_C < cooling < hot
    assert read(backend, 1).temperature == IDLE_C, "the other device did not work"


# --- fault switches ---------------------------------------------------------------------------


def test_a_lost_device_fails_its_reading_and_the_other_still_reads(backend, clock):
    lost_uuid = backend.devices()[0].uuid
    set_faults(lost_uuid, lost=True)
    lost, fine = backend.read()
    assert (lost.ok, lost.uuid) == (False, lost_uuid)
    assert lost.error.startswith("NVMLError_GpuIsLost")
    assert fine.ok and fine.memory_used == BASE_MEMORY


def test_an_nvml_error_fails_the_reading(backend, clock):
    set_faults(backend.devices()[1].uuid, nvml_error=True)
    reading = read(backend, 1)
    assert not reading.ok
    assert reading.error.startswith("NVMLError_Unknown")
    assert read(backend, 0).ok


def test_over_temperature_reads_hot_throttled_and_is_not_admitted(backend, clock):
    set_faults(backend.devices()[0].uuid, over_temperature=True)
    reading = read(backend, 0)
    assert reading.ok
    assert reading.temperature >= 95
    assert set(reading.throttle_reasons) == {"sw_thermal", "hw_thermal"}
    admission = admit(
        ok=reading.ok,
        error=reading.error,
        memory_used=reading.memory_used,
        memory_total=reading.memory_total,
        temperature=reading.temperature,
        limits=Limits(max_temperature=85.0, min_free_memory=GIB),
    )
    assert not admission.ok and "at or above the 85 C limit" in admission.reason


def test_faults_are_shared_through_the_state_file_with_another_backend(backend, clock):
    uuid = backend.devices()[0].uuid
    set_faults(uuid, lost=True, oom_above_batch=2)
    other_process_view = SimulatedBackend("H100*2", host="testhost")
    assert not other_process_view.read()[0].ok
    assert simulated.faults(uuid) == {"lost": True, "oom_above_batch": 2}


def test_a_switch_set_to_none_or_false_is_cleared(backend, clock):
    uuid = backend.devices()[0].uuid
    set_faults(uuid, lost=True, nvml_error=True)
    set_faults(uuid, lost=None, nvml_error=False)
    assert simulated.faults(uuid) == {}
    assert read(backend, 0).ok


def test_clear_faults_of_one_device_leaves_the_others(backend, clock):
    first, second = (d.uuid for d in backend.devices())
    set_faults(first, lost=True)
    set_faults(second, nvml_error=True)
    clear_faults(first)
    assert read(backend, 0).ok
    assert not read(backend, 1).ok


def test_clear_faults_without_a_device_clears_every_device(backend, clock):
    first, second = (d.uuid for d in backend.devices())
    set_faults(first, over_temperature=True)
    set_faults(second, lost=True)
    clear_faults()
    assert [r.ok for r in backend.read()] == [True, True]
    assert read(backend, 0).temperature < 50


def test_clearing_faults_keeps_the_load(backend, clock):
    uuid = backend.devices()[0].uuid
    set_model_memory(uuid, GIB)
    set_faults(uuid, lost=True)
    clear_faults(uuid)
    assert read(backend, 0).memory_used == BASE_MEMORY + GIB


def test_an_unknown_fault_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown simulated fault\\(s\\): melted; known: lost, nvml_error"):
        set_faults("SIM-x", melted=True)


def test_a_corrupt_state_file_reads_as_no_state(backend, clock):
    simulated.state_path().write_text("{not json")
    assert read(backend, 0).ok
    set_faults(backend.devices()[0].uuid, lost=True)
    assert not read(backend, 0).ok


def test_reading_some_devices_reads_only_those(backend, clock):
    first, second = (d.uuid for d in backend.devices())
    set_faults(first, lost=True)
    assert [(r.uuid, r.ok) for r in backend.read([second])] == [(second, True)]
    assert [r.uuid for r in backend.read()] == [first, second]
