"""A worker makes a request's images with the model the request recorded: whatever the worker's own
settings say, whatever the persona's model became since; a model that does not load fails its
attempt (retried elsewhere) and takes only that (device, model) pair out of service."""

from __future__ import annotations

from typing import Any

import pytest

from gpuscheduler.device_models import ModelEvents
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import (
    Assignment,
    AssignmentState,
    CostCurve,
    Device,
    DeviceModel,
    Health,
    ModelState,
    PipelineCall,
)
from personas.attempts import sample_assignment_run
from personas.image_models import spec_of
from personas.imagegen import Generator, ModelError, Target
from personas.models import ImageModel, RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def web_settings(settings, redis_db):
    """The web process's SAMPLES_MODEL, which seeds the default model."""
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated:0", "STEPS": 2}


@pytest.fixture
def model_factory():
    def make(name: str, **fields: Any) -> ImageModel:
        return ImageModel.objects.create(name=name, **{"source": "simulated:0", "steps": 2, **fields})

    return make


def worker(device: Device) -> WorkerContext:
    """What a gpuworker builds for its device (gpuscheduler.worker.build_context), in this process."""
    generator = Generator(Target(kind="simulated", uuid=device.uuid), ModelEvents(device.pk))
    return WorkerContext(device=device, name=f"w{device.pk}", host="testhost", generator=generator)


def submit(persona: Any, count: int = 1) -> Assignment:
    (attempt,) = sample_request_submit(persona=persona, count=count, enqueue=False).assignments
    return attempt


def warm(device: Device) -> dict[str, str]:
    return dict(DeviceModel.objects.filter(device=device).values_list("model", "state"))


def test_the_worker_loads_the_model_the_request_recorded_not_the_one_its_settings_name(
    persona, device_factory, model_factory, settings
):
    gpu = device_factory("H100", worker=True, warm=())
    persona.image_model = model_factory("portrait", source="simulated:0.0", steps=3)
    persona.save()
    attempt = submit(persona, count=2)
    key = SampleRequest.objects.get().model
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated-h100:0.5", "STEPS": 9}  # the worker's own settings
    context = worker(gpu)

    assert sample_assignment_run(assignment_id=attempt.pk, context=context)["committed"] is True

    assert context.generator.warm_models() == [key]
    assert warm(gpu) == {key: ModelState.WARM}
    assert set(SampleImage.objects.values_list("model", "steps")) == {(key, 3)}
    assert set(PipelineCall.objects.values_list("model", "steps")) == {(key, 3)}


def test_a_persona_switched_to_another_model_mid_request_keeps_the_requests_model(
    persona, device_factory, model_factory
):
    gpu = device_factory("H100", worker=True, warm=())
    first = model_factory("first", steps=3)
    persona.image_model = first
    persona.save()
    attempt = submit(persona)
    recorded = spec_of(first)
    persona.image_model = model_factory("second", source="simulated:0.0")
    persona.save()
    ImageModel.objects.filter(pk=first.pk).update(steps=40, source="simulated-h100:0")  # edited meanwhile

    context = worker(gpu)
    sample_assignment_run(assignment_id=attempt.pk, context=context)

    assert warm(gpu) == {recorded["key"]: ModelState.WARM}
    assert context.generator.spec_for(recorded["key"]).steps == 3
    assert set(SampleImage.objects.values_list("model", "steps")) == {(recorded["key"], 3)}


def test_a_model_that_does_not_load_fails_its_attempt_and_only_that_pair(
    persona_factory, device_factory, model_factory, tmp_path
):
    gpus = [device_factory("H100", worker=True, warm=()), device_factory("H100", worker=True, warm=())]
    (tmp_path / "weights").mkdir()  # on the web host, perhaps; on the worker's, no model in it
    broken = ImageModel.objects.create(name="broken", source=str(tmp_path / "weights"), steps=2)
    persona = persona_factory(image_model=broken)
    attempt = submit(persona)
    gpu = next(g for g in gpus if g.pk == attempt.planned_device_id)
    other = next(g for g in gpus if g.pk != gpu.pk)
    context = worker(gpu)

    with pytest.raises(ModelError, match=r"no model_index\.json"):
        sample_assignment_run(assignment_id=attempt.pk, context=context)

    key = spec_of(broken)["key"]
    failed = DeviceModel.objects.get(device=gpu, model=key)
    assert (failed.state, "is not a diffusers directory" in failed.reason) == (ModelState.FAILED, True)
    assert Assignment.objects.get(pk=attempt.pk).state == AssignmentState.RETRIED
    retry = Assignment.objects.get(request=attempt.request, attempt=2)
    assert (retry.avoid_device_id, retry.planned_device_id) == (gpu.pk, other.pk), "its retry goes elsewhere"
    assert Device.objects.get(pk=gpu.pk).health == Health.HEALTHY, "the model's fault, not the device's"

    # The device serves another model at once.
    good = submit(persona_factory(image_model=model_factory("good")))
    Assignment.objects.filter(pk=good.pk).update(planned_device=gpu)
    assert sample_assignment_run(assignment_id=good.pk, context=context)["committed"] is True
    assert SampleRequest.objects.get(pk=good.request_id).state == RequestState.SUCCEEDED
    assert warm(gpu) == {key: ModelState.FAILED, spec_of(ImageModel.objects.get(name="good"))["key"]: ModelState.WARM}


def test_requests_of_one_model_share_a_call_only_with_the_same_guidance(persona_factory, device_factory, model_factory):
    gpu = device_factory("H100", worker=True, warm=())
    shared = model_factory("shared", guidance_scale=7.5)
    key = spec_of(shared)["key"]
    CostCurve.objects.create(device=gpu, model=key, steps=2, fixed_seconds=1.0, per_image_seconds=0.01, knee=1, calls=9)
    before = submit(persona_factory(image_model=shared))
    ImageModel.objects.filter(pk=shared.pk).update(guidance_scale=3.0)  # no part of the key: the same model
    after = [submit(persona_factory(image_model=shared)) for _ in range(2)]
    assert {a.request.model for a in (before, *after)} == {key}

    context = worker(gpu)
    alone = sample_assignment_run(assignment_id=before.pk, context=context)
    together = sample_assignment_run(assignment_id=after[0].pk, context=context)

    assert alone["batch"] == [before.pk], "a request made at guidance 7.5 is not made at 3.0"
    assert together["batch"] == [after[0].pk, after[1].pk]
