"""The per-device pipeline cache on a simulated device: several models warm, bounded by
GPU_MODEL_CACHE, the least recently used evicted with its memory released (the device's reading
drops), each load timed, and what the cache holds recorded in DeviceModel rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gpuscheduler import simulated
from gpuscheduler.device_models import ModelEvents
from gpuscheduler.models import Device, DeviceModel, Health, ModelState
from gpuscheduler.services import device_upsert
from gpuscheduler.simulated import BASE_MEMORY, SimulatedBackend
from personas.imagegen import Generator, ModelDirectoryMissing, ModelError, Target
from personas.pipelines import SIMULATED_MODEL_BYTES, ImageSpec

GIB = 1024**3


def model(name: str, source: str = "simulated:0", **fields: Any) -> dict[str, Any]:
    """A request's recorded spec (personas.image_models.spec_of), keyed by its name."""
    return {"name": name, "source": source, "steps": 2, "guidance_scale": 7.5, "key": f"{name}@test", **fields}


A, B, C = model("alpha"), model("beta", "simulated:0.0"), model("gamma", "simulated-h100:0")


@dataclass(frozen=True)
class WatchedEvents(ModelEvents):
    """Records the device's memory reading at each event, as the monitor would read it then."""

    backend: Any = None
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def loaded(self, model: str, seconds: float, memory_bytes: int | None) -> None:
        super().loaded(model, seconds, memory_bytes)
        self.seen.append(("loaded", model, self.reading()))

    def evicted(self, model: str, freed_bytes: int | None, reason: str = "") -> None:
        super().evicted(model, freed_bytes, reason)
        self.seen.append(("evicted", model, self.reading()))

    def reading(self) -> int:
        return int(self.backend.read()[0].memory_used)


@dataclass
class Gpu:
    device: Device
    uuid: str
    events: WatchedEvents
    generator: Generator


@pytest.fixture
def gpu(settings, db) -> Gpu:
    """One simulated H100 (80 GiB), its device row, and a Generator bound to it as a worker's is."""
    backend = SimulatedBackend("H100", host=settings.GPUSCHEDULER["HOST"])
    info = backend.devices()[0]
    device = device_upsert(info=info, host=settings.GPUSCHEDULER["HOST"])
    events = WatchedEvents(device.pk, backend=backend)
    return Gpu(device, info.uuid, events, Generator(Target(kind="simulated", uuid=info.uuid), events))


def make(generator: Generator, spec: dict[str, Any], seeds: int = 1) -> Any:
    return generator.generate(model=spec, prompt="portrait", seeds=list(range(seeds)))


def states(device: Any) -> dict[str, tuple[str, int]]:
    return {row.model: (row.state, row.loads) for row in DeviceModel.objects.filter(device=device)}


def test_two_models_alternating_over_one_device_load_each_once_with_a_cache_of_two(gpu, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_CACHE": 2}
    for _ in range(3):
        make(gpu.generator, A)
        make(gpu.generator, B)

    assert gpu.generator.loads == 2
    assert states(gpu.device) == {"alpha@test": (ModelState.WARM, 1), "beta@test": (ModelState.WARM, 1)}
    assert gpu.events.seen[-1][2] == BASE_MEMORY + 2 * SIMULATED_MODEL_BYTES, "both held on the device"
    assert gpu.generator.warm_models() == ["beta@test", "alpha@test"]


def test_with_a_cache_of_one_the_evicted_models_memory_is_released(gpu, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_CACHE": 1}
    make(gpu.generator, A)
    make(gpu.generator, B)
    make(gpu.generator, A)

    assert [(event, name) for event, name, _ in gpu.events.seen] == [
        ("loaded", "alpha@test"),
        ("evicted", "alpha@test"),
        ("loaded", "beta@test"),
        ("evicted", "beta@test"),
        ("loaded", "alpha@test"),
    ]
    readings = [reading for _, _, reading in gpu.events.seen]
    assert readings == [BASE_MEMORY + SIMULATED_MODEL_BYTES, BASE_MEMORY] * 2 + [BASE_MEMORY + SIMULATED_MODEL_BYTES]
    assert states(gpu.device) == {"alpha@test": (ModelState.WARM, 2), "beta@test": (ModelState.EVICTED, 1)}
    beta = DeviceModel.objects.get(device=gpu.device, model="beta@test")
    assert beta.reason == "evicted: least recently used, room made for alpha; 2048 MiB freed"
    assert beta.memory_bytes == SIMULATED_MODEL_BYTES, "what it held, as measured when it loaded"


def test_an_eviction_drops_the_reading_at_once(gpu):
    make(gpu.generator, A)
    make(gpu.generator, B)
    before = gpu.events.reading()

    freed = gpu.generator.cache.evict(ImageSpec.of(A).recipe, why="asked by the test")

    assert freed == SIMULATED_MODEL_BYTES
    assert gpu.events.reading() == before - SIMULATED_MODEL_BYTES
    assert states(gpu.device)["alpha@test"][0] == ModelState.EVICTED


def test_the_cache_holds_as_many_models_as_gpu_model_cache_says(gpu, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_CACHE": 3}
    for spec in (A, B, C, A, B, C):
        make(gpu.generator, spec)
    assert gpu.generator.loads == 3
    make(gpu.generator, model("delta", "simulated:0.00"))
    assert states(gpu.device)["alpha@test"] == (ModelState.EVICTED, 1), "the least recently used"
    assert sorted(gpu.generator.warm_models()) == ["beta@test", "delta@test", "gamma@test"]


def test_each_load_is_timed_on_its_device(gpu):
    simulated.set_faults(gpu.uuid, load_seconds=0.2)  # a model load this slow on this device
    make(gpu.generator, A)
    loaded = DeviceModel.objects.get(device=gpu.device, model="alpha@test")
    assert loaded.load_seconds >= 0.2
    assert loaded.loaded_at is not None


def test_models_that_differ_only_in_size_share_one_pipeline(gpu):
    small, large = model("small", "simulated:0"), model("large", "simulated:0", width=512, height=512)
    make(gpu.generator, small)
    make(gpu.generator, large)

    assert gpu.generator.loads == 1
    assert states(gpu.device) == {"small@test": (ModelState.WARM, 1), "large@test": (ModelState.WARM, 0)}
    assert sorted(gpu.generator.warm_models()) == ["large@test", "small@test"]


def test_a_model_that_does_not_load_marks_only_that_pair_failed(gpu, tmp_path):
    make(gpu.generator, A)
    (tmp_path / "weights").mkdir()  # a folder, but no diffusers model in it on this host
    broken = model("broken", str(tmp_path / "weights"))

    with pytest.raises(ModelDirectoryMissing, match=r"no model_index\.json"):
        make(gpu.generator, broken)

    failed = DeviceModel.objects.get(device=gpu.device, model="broken@test")
    assert failed.state == ModelState.FAILED
    assert failed.reason.startswith(f"model broken: source='{tmp_path / 'weights'}' is not a diffusers directory")
    assert states(gpu.device)["alpha@test"] == (ModelState.WARM, 1), "the other model stays warm"
    assert len(make(gpu.generator, B).images) == 1, "and the device serves the others"
    assert gpu.device.health == Health.HEALTHY


def test_a_folder_that_does_not_load_is_that_pairs_failure_too(gpu, tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load model"):
        make(gpu.generator, model("garbled", str(tmp_path)))
    assert states(gpu.device) == {"garbled@test": (ModelState.FAILED, 0)}


def test_a_call_out_of_memory_evicts_another_model_before_it_splits(gpu):
    make(gpu.generator, A)
    make(gpu.generator, B)
    simulated.set_faults(gpu.uuid, oom_above_batch=1)

    result = make(gpu.generator, B, seeds=2)

    assert len(result.images) == 2
    assert result.notes[0].startswith("out of memory at 2 images per call; evicted another model")
    assert result.notes[1].startswith("out of memory at 2 images per call; retrying at 1")
    assert states(gpu.device)["alpha@test"][0] == ModelState.EVICTED
    assert gpu.generator.warm_models() == ["beta@test"]


def test_a_load_out_of_memory_evicts_the_least_recently_used_and_tries_again(gpu, settings, monkeypatch):
    import torch

    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_CACHE": 3}
    make(gpu.generator, A)
    make(gpu.generator, B)
    cache = gpu.generator.cache
    build = cache._build
    failures = iter([True])

    def tight(*args: Any) -> Any:
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return build(*args)

    monkeypatch.setattr(cache, "_build", tight)
    make(gpu.generator, C)

    assert states(gpu.device) == {
        "alpha@test": (ModelState.EVICTED, 1),
        "beta@test": (ModelState.WARM, 1),
        "gamma@test": (ModelState.WARM, 1),
    }
    assert "out of memory loading gamma" in DeviceModel.objects.get(device=gpu.device, model="alpha@test").reason


def test_a_model_too_big_for_the_device_alone_is_that_pairs_failure(gpu, monkeypatch):
    import torch

    def too_big(*args: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 GiB")

    monkeypatch.setattr(gpu.generator.cache, "_build", too_big)
    with pytest.raises(ModelError, match="model alpha does not fit on this device alone: CUDA out of memory"):
        make(gpu.generator, A)
    assert states(gpu.device) == {"alpha@test": (ModelState.FAILED, 0)}
