"""Real gpuworker processes and models as data: a worker warms the default model (whatever its own
SAMPLES_MODEL says), loads what each request recorded, evicts within GPU_MODEL_CACHE, and a default
model that does not load takes only that pair out of service."""

from __future__ import annotations

import pytest

from gpuscheduler.models import Device, DeviceModel, Health, ModelState
from personas.image_models import default_model, spec_of
from personas.models import ImageModel, RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.processes import wait_for

pytestmark = pytest.mark.e2e

WORKER_OWN_MODEL = "simulated-h100:0.3"  # what the worker's environment names: never loaded


def wait_succeeded(request: SampleRequest, cluster) -> None:
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        60,
        lambda: f"the request to succeed\n{cluster.logs()}",
    )


def rows(device: Device) -> dict[str, tuple[str, int]]:
    return {r.model: (r.state, r.loads) for r in DeviceModel.objects.filter(device=device)}


def make_default(name: str, source: str) -> ImageModel:
    ImageModel.objects.update(is_default=False)
    return ImageModel.objects.create(name=name, source=source, steps=2, is_default=True)


def test_a_worker_warms_the_default_model_and_loads_what_each_request_recorded(cluster, persona_factory):
    cluster.configure(GPU_SIMULATED="sim*1", GPU_MODEL_CACHE="1")
    default = spec_of(make_default("house", "simulated:0.1"))
    assert default_model().name == "house"
    cluster.start("gpuworkers", env={"SAMPLES_MODEL": WORKER_OWN_MODEL})
    cluster.wait_workers(expect=1)
    device = Device.objects.get()
    warmed = DeviceModel.objects.get(device=device, model=default["key"])
    assert (warmed.state, warmed.loads, warmed.load_seconds is not None) == (ModelState.WARM, 1, True)

    other = ImageModel.objects.create(name="other", source="simulated:0.05", steps=2)
    request = sample_request_submit(persona=persona_factory(image_model=other), count=2).request
    wait_succeeded(request, cluster)

    key = spec_of(other)["key"]
    assert set(SampleImage.objects.values_list("model", flat=True)) == {key}
    assert rows(device) == {default["key"]: (ModelState.EVICTED, 1), key: (ModelState.WARM, 1)}, "a cache of one"
    assert "2048 MiB freed" in DeviceModel.objects.get(device=device, model=default["key"]).reason
    assert not DeviceModel.objects.filter(model__contains="h100").exists(), "the worker's own setting is not loaded"


def test_a_default_model_that_does_not_load_takes_only_that_pair_out(cluster, persona_factory, tmp_path):
    cluster.configure(GPU_SIMULATED="sim*1")
    (tmp_path / "weights").mkdir()
    broken = make_default("broken", str(tmp_path / "weights"))
    cluster.start_workers(expect=1)
    device = Device.objects.get()

    failed = DeviceModel.objects.get(device=device, model=spec_of(broken)["key"])
    assert failed.state == ModelState.FAILED
    assert "no model_index.json" in failed.reason
    assert device.health == Health.HEALTHY, "the model's fault, not the device's"

    good = ImageModel.objects.create(name="good", source="simulated:0.05", steps=2)
    request = sample_request_submit(persona=persona_factory(image_model=good), count=1).request
    wait_succeeded(request, cluster)
    assert rows(device)[spec_of(good)["key"]] == (ModelState.WARM, 1)


def test_two_models_alternating_over_two_devices_load_each_at_most_once_per_device(cluster, persona_factory):
    cluster.configure(GPU_SIMULATED="sim*2", GPU_MODEL_CACHE="2")
    alpha = make_default("alpha", "simulated:0.05")
    beta = ImageModel.objects.create(name="beta", source="simulated:0.05", dtype="float32", steps=2)
    cluster.start("gpuworkers")
    cluster.wait_workers(expect=2)
    warm_up = {(r.device_id, r.model): r.loads for r in DeviceModel.objects.all()}
    assert set(warm_up.values()) == {1}, "each worker warmed the default model once"

    requests = []
    for i in range(8):  # alpha, beta, alpha, ... in two waves, each spread over both devices
        model = alpha if i % 2 == 0 else beta
        requests.append(sample_request_submit(persona=persona_factory(image_model=model), count=4).request)
        if i == 3:
            for request in requests:
                wait_succeeded(request, cluster)
    for request in requests:
        wait_succeeded(request, cluster)

    keys = {spec_of(alpha)["key"], spec_of(beta)["key"]}
    assert set(SampleImage.objects.values_list("model", flat=True)) == keys
    loads = {(r.device_id, r.model): r.loads for r in DeviceModel.objects.all()}
    assert all(n <= 1 for n in loads.values()), f"a model loaded twice on one device: {loads}"
    assert {r.state for r in DeviceModel.objects.all()} == {ModelState.WARM}, "a cache of two evicts neither"
