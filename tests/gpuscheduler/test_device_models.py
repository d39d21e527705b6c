"""DeviceModel rows as a device's worker writes them: loads counted and timed, evictions, failures,
a restarted worker holding nothing, and the reads placement uses."""

from __future__ import annotations

import pytest

from gpuscheduler import device_models
from gpuscheduler.device_models import ModelEvents
from gpuscheduler.models import DeviceModel, ModelState

MODEL = "portrait@0badcafe"
OTHER = "landscape@c0ffee00"


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True, warm=())


def row(device, model: str = MODEL) -> DeviceModel:
    return DeviceModel.objects.get(device=device, model=model)


def test_a_load_makes_the_pair_warm_with_its_time_and_memory(gpu):
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=12.5, memory_bytes=2 * 1024**3)

    loaded = row(gpu)
    assert (loaded.state, loaded.loads, loaded.load_seconds, loaded.memory_bytes) == (
        ModelState.WARM,
        1,
        12.5,
        2 * 1024**3,
    )
    assert loaded.loaded_at is not None and loaded.used_at is not None


def test_each_load_is_counted_and_the_latest_time_kept(gpu):
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=12.5, memory_bytes=1)
    device_models.model_evicted(device_id=gpu.pk, model=MODEL, freed_bytes=1)
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=3.0, memory_bytes=1)

    assert (row(gpu).state, row(gpu).loads, row(gpu).load_seconds) == (ModelState.WARM, 2, 3.0)
    assert DeviceModel.objects.count() == 1


def test_an_eviction_says_what_it_freed(gpu):
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=1.0, memory_bytes=2 * 1024**3)

    device_models.model_evicted(
        device_id=gpu.pk, model=MODEL, freed_bytes=2 * 1024**3, reason="least recently used, room made for b"
    )

    evicted = row(gpu)
    assert evicted.state == ModelState.EVICTED
    assert evicted.reason == "evicted: least recently used, room made for b; 2048 MiB freed"
    assert evicted.loads == 1, "the load history stays"


def test_a_failure_takes_only_that_pair_out_and_a_later_load_brings_it_back(gpu, device_factory):
    other_gpu = device_factory("H100", worker=True, warm=())
    device_models.model_loaded(device_id=gpu.pk, model=OTHER, seconds=1.0, memory_bytes=None)
    device_models.model_loaded(device_id=other_gpu.pk, model=MODEL, seconds=1.0, memory_bytes=None)

    device_models.model_failed(
        device_id=gpu.pk, model=MODEL, reason="model m: source='/x' is not a diffusers directory"
    )

    assert device_models.failed_models() == {gpu.pk: {MODEL: "model m: source='/x' is not a diffusers directory"}}
    assert device_models.warm_models() == {gpu.pk: [OTHER], other_gpu.pk: [MODEL]}
    device_models.model_evicted(device_id=gpu.pk, model=MODEL, freed_bytes=None)
    assert row(gpu).state == ModelState.FAILED, "an eviction does not hide a failure"

    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=2.0, memory_bytes=None)
    assert (row(gpu).state, row(gpu).reason) == (ModelState.WARM, "")


def test_a_model_sharing_a_loaded_pipeline_is_warm_without_a_load(gpu):
    device_models.model_used(device_id=gpu.pk, model=MODEL, memory_bytes=5)

    used = row(gpu)
    assert (used.state, used.loads, used.load_seconds, used.memory_bytes) == (ModelState.WARM, 0, None, 5)


def test_a_worker_that_starts_or_stops_holds_nothing(gpu, device_factory):
    other_gpu = device_factory("H100", worker=True, warm=())
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=1.0, memory_bytes=None)
    device_models.model_failed(device_id=gpu.pk, model=OTHER, reason="broken")
    device_models.model_loaded(device_id=other_gpu.pk, model=MODEL, seconds=1.0, memory_bytes=None)

    assert device_models.models_forget(device_id=gpu.pk, reason="its worker started") == 1

    assert (row(gpu).state, row(gpu).reason) == (ModelState.EVICTED, "evicted: its worker started")
    assert row(gpu, OTHER).state == ModelState.FAILED, "a restart does not fix a model's files"
    assert row(other_gpu).state == ModelState.WARM


def test_load_times_are_read_per_device(gpu, device_factory):
    slow = device_factory("T4", worker=True, warm=())
    device_models.model_loaded(device_id=gpu.pk, model=MODEL, seconds=4.0, memory_bytes=None)
    device_models.model_loaded(device_id=slow.pk, model=MODEL, seconds=15.0, memory_bytes=None)
    device_models.model_used(device_id=slow.pk, model=OTHER)

    assert device_models.load_times(model=MODEL) == {gpu.pk: 4.0, slow.pk: 15.0}
    assert device_models.load_times(model=OTHER) == {}
    assert device_models.warm_models(device_ids=[slow.pk]) == {slow.pk: sorted([MODEL, OTHER])}


def test_events_without_a_device_record_nothing(db):
    events = ModelEvents()
    events.loaded(MODEL, 1.0, None)
    events.failed(MODEL, "broken")
    assert not DeviceModel.objects.exists()


def test_events_of_a_device_write_its_rows(gpu):
    events = ModelEvents(gpu.pk)
    events.loaded(MODEL, 1.5, 10)
    events.evicted(MODEL, 10, "room made for b")
    events.failed(OTHER, "broken")
    assert (row(gpu).state, row(gpu).load_seconds) == (ModelState.EVICTED, 1.5)
    assert row(gpu, OTHER).state == ModelState.FAILED
