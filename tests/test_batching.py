"""Cross-request batching: queued chunks of several requests made in one pipeline call, each image
with its own prompt and seed, each attempt committed (or dropped, failed, requeued) on its own."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

import config.storage
from gpuscheduler import assignments
from gpuscheduler.curves import Timing
from gpuscheduler.heartbeat import Heartbeat, WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, Device, PipelineCall
from gpuscheduler.services import device_upsert
from gpuscheduler.simulated import describe
from personas.attempts import sample_assignment_run
from personas.image_models import default_model
from personas.imagegen import GenerationResult, Prompt, placeholder_image
from personas.models import ImageModel, RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.conftest import learned_curve
from tests.gpuscheduler.test_batching_claims import H100, chunk
from tests.media import files_of, stored_bytes, stored_names
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Generator:
    """Makes placeholder images at once and records each call's prompts; `during` runs inside the call."""

    def __init__(self, during: Callable[[], None] = lambda: None, fail: Exception | None = None) -> None:
        self.during = during
        self.fail = fail
        self.calls: list[list[Prompt]] = []

    def generate(
        self,
        *,
        seeds: Sequence[int] = (),
        prompt: str = "",
        negative_prompt: str = "",
        items: Sequence[Prompt] | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        batch = list(items) if items is not None else [Prompt(seed, prompt, negative_prompt) for seed in seeds]
        self.calls.append(batch)
        self.during()
        if self.fail is not None:
            raise self.fail
        timing = Timing(images=len(batch), seconds=1.0, width=64, height=64)
        return GenerationResult(images=[placeholder_image(p.seed) for p in batch], calls=1, timings=[timing])

    def free_memory(self) -> None:
        pass


@pytest.fixture
def h100(device_factory):
    device = device_factory("H100", worker=True)
    learned_curve(device, **H100)
    return device


def expected_prompts(attempts: list[Assignment]) -> list[Prompt]:
    prompts = []
    for attempt in attempts:
        request = SampleRequest.objects.select_related("persona").get(pk=attempt.request_id)
        text, negative = request.persona.appearance_prompt, request.persona.negative_prompt
        prompts += [Prompt(request.seed_for(i), text, negative) for i in attempt.indexes]
    return prompts


def assert_made_as_asked(attempt: Assignment) -> None:
    """The attempt's images are stored, each with its own request's prompt, negative prompt and seed."""
    request = SampleRequest.objects.select_related("persona").get(pk=attempt.request_id)
    images = list(SampleImage.objects.filter(assignment_id=attempt.pk).order_by("index"))
    assert [i.index for i in images] == list(attempt.indexes)
    persona = request.persona
    for image in images:
        assert image.seed == request.seed_for(image.index)
        assert (image.model, image.steps) == (request.model, request.steps), "its own request's model and steps"
        assert (image.prompt, image.negative_prompt) == (persona.appearance_prompt, persona.negative_prompt)
        assert stored_bytes(image.image.name) == placeholder_image(image.seed).png


def reloaded(*attempts: Assignment) -> list[Assignment]:
    return [Assignment.objects.get(pk=a.pk) for a in attempts]


# --- in this process, with a generator that records its calls -----------------------------------


def test_one_call_makes_several_personas_images_each_with_its_own_prompt_and_seed(h100, persona_factory, redis_db):
    personas = [persona_factory(negative_prompt=f"no hats, take {n}") for n in range(3)]
    attempts = [chunk(p, n, h100) for p, n in zip(personas, (2, 2, 3), strict=True)]
    generator = Generator()
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=generator)

    result = sample_assignment_run(assignment_id=attempts[0].pk, context=context)

    assert result["committed"] is True and result["batch"] == [a.pk for a in attempts]
    assert generator.calls == [expected_prompts(attempts)], "one call, each image with its own prompt and seed"
    done = reloaded(*attempts)
    assert {a.state for a in done} == {AssignmentState.SUCCEEDED}
    (call_id,) = {a.pipeline_call_id for a in done}
    assert call_id is not None and PipelineCall.objects.get(pk=call_id).images == 7, "the history shows the shared call"
    for attempt in done:
        assert_made_as_asked(attempt)
    assert {r.state for r in SampleRequest.objects.all()} == {RequestState.SUCCEEDED}
    # A partner's own job, delivered anyway, finds its attempt taken.
    assert sample_assignment_run(assignment_id=attempts[1].pk, context=context)["skipped"] is True
    assert len(generator.calls) == 1


def test_an_attempt_that_loses_its_lease_during_the_call_is_dropped_and_the_others_commit(
    h100, persona_factory, redis_db
):
    first, lost, third = (chunk(persona_factory(), n, h100) for n in (2, 2, 3))
    seen: list[bool] = []

    def reconciler_gives_one_up() -> None:
        Assignment.objects.filter(pk=lost.pk).update(state=AssignmentState.ABANDONED)
        Heartbeat(context, interval=1.0).beat()
        seen.append(context.alive())

    context = WorkerContext(device=h100, name="w1", host="testhost", generator=Generator(reconciler_gives_one_up))

    result = sample_assignment_run(assignment_id=first.pk, context=context)

    assert seen == [True], "the call goes on while an attempt of it holds its lease"
    assert result["committed"] is True
    first, lost, third = reloaded(first, lost, third)
    assert [a.state for a in (first, lost, third)] == [
        AssignmentState.SUCCEEDED,
        AssignmentState.ABANDONED,
        AssignmentState.SUCCEEDED,
    ]
    assert first.pipeline_call_id == third.pipeline_call_id is not None
    assert not SampleImage.objects.filter(assignment=lost).exists()
    assert not [name for name in stored_names() if name.endswith(f"-a{lost.pk}.png")], "no file of the lost attempt"
    for attempt in (first, third):
        assert_made_as_asked(attempt)


def test_a_failed_call_fails_each_of_its_attempts_and_places_a_retry_for_each(h100, persona_factory, redis_db):
    attempts = [chunk(persona_factory(), n, h100) for n in (2, 2, 3)]
    context = WorkerContext(
        device=h100, name="w1", host="testhost", generator=Generator(fail=RuntimeError("illegal memory access"))
    )

    with pytest.raises(RuntimeError, match="illegal memory access"):
        sample_assignment_run(assignment_id=attempts[0].pk, context=context)

    for attempt in reloaded(*attempts):
        assert attempt.state == AssignmentState.RETRIED and "illegal memory access" in attempt.error
        retry = Assignment.objects.get(request_id=attempt.request_id, first_index=attempt.first_index, attempt=2)
        assert retry.state == AssignmentState.QUEUED and retry.avoid_device_id == h100.pk
    assert not SampleImage.objects.exists()


def test_a_storage_fault_sends_every_attempt_not_yet_committed_back_to_waiting(
    h100, persona_factory, redis_db, monkeypatch
):
    first, second, third = (chunk(persona_factory(), n, h100) for n in (2, 2, 3))
    real = config.storage._write_part
    writes: list[str] = []

    def third_write_fills_the_disk(path: Path, chunks: Any) -> None:
        writes.append(path.name)
        if len(writes) == 5:  # the first image of the second attempt (each image: its PNG, its thumbnail)
            raise OSError(28, "No space left on device", str(path))
        real(path, chunks)

    monkeypatch.setattr(config.storage, "_write_part", third_write_fills_the_disk)
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=Generator())

    result = sample_assignment_run(assignment_id=first.pk, context=context)

    assert "No space left on device" in str(result["storage_error"])
    first, second, third = reloaded(first, second, third)
    assert first.state == AssignmentState.SUCCEEDED
    assert_made_as_asked(first)
    for waiting in (second, third):
        assert (waiting.state, waiting.attempt, waiting.device_id) == (AssignmentState.QUEUED, 1, None)
        assert "No space left on device" in waiting.error
    assert stored_names() == files_of(SampleImage.objects.all()), "only the committed files"


# --- real workers ---------------------------------------------------------------------------------


def registered(spec: str) -> list[Device]:
    """The simulated devices of `spec`, registered as their workers will find them, with the H100's
    learned curve (best call size 7), and just read (not stale): placement can plan work on them
    before any worker runs, so the work is all queued when the worker pops its first job."""
    host = settings.GPUSCHEDULER["HOST"]
    devices = [device_upsert(info=info, host=host) for info in describe(spec, host)]
    Device.objects.filter(pk__in=[d.pk for d in devices]).update(last_seen=timezone.now())
    for device in devices:
        learned_curve(device, **H100)
    return devices


def wait_done(requests: list[SampleRequest], cluster, timeout: float = 90) -> None:
    for request in requests:
        wait_for(
            lambda r=request: SampleRequest.objects.get(pk=r.pk).state == RequestState.SUCCEEDED,
            timeout,
            lambda r=request: f"request {r.pk} to succeed\n{cluster.logs()}",
        )


def attempt_of(request: SampleRequest) -> Assignment:
    return Assignment.objects.get(request=request, state=AssignmentState.SUCCEEDED)


def assert_exactly_once(request: SampleRequest) -> None:
    """Every image of the request exists once, as a row and as a file, and no other file of it exists."""
    images = list(SampleImage.objects.filter(request=request))
    assert sorted(i.index for i in images) == list(range(request.count))
    folder = f"samples/persona-{request.persona_id}"
    stored = [name for name in stored_names(folder) if name.startswith(f"{folder}/r{request.pk}-")]
    assert stored == files_of(images), "no orphan or half-written file"


@pytest.mark.e2e
def test_a_worker_makes_queued_requests_of_several_personas_in_one_call_of_the_best_size(cluster, persona_factory):
    cluster.configure(GPU_SIMULATED="sim*1", SAMPLES_MODEL="simulated-h100:0.3")
    (device,) = registered("sim*1")
    default = default_model()
    steps = default.steps

    def submit(count: int, model: ImageModel | None = None) -> SampleRequest:
        return sample_request_submit(persona=persona_factory(image_model=model), count=count).request

    first = submit(2)
    # The default model's steps edited between two presses: the same model (its key leaves steps
    # out), made at other steps, so only the steps keep this request out of the others' call.
    ImageModel.objects.filter(pk=default.pk).update(steps=steps + 1)
    more_steps = submit(2)
    ImageModel.objects.filter(pk=default.pk).update(steps=steps)
    second = submit(2)
    other_model = submit(2, ImageModel.objects.create(name="simulated-0.1", source="simulated:0.1", steps=steps))
    third = submit(3)
    fourth = submit(2)
    assert (more_steps.model, more_steps.steps) == (first.model, steps + 1)
    assert other_model.model != first.model and other_model.steps == steps
    cluster.start("gpuworker", "--device", device.uuid)
    wait_done([first, more_steps, second, other_model, third, fourth], cluster)

    shared = {attempt_of(r).pipeline_call_id for r in (first, second, third)}
    assert len(shared) == 1, f"2 + 2 + 3 images of three personas in one call\n{cluster.logs()}"
    call = PipelineCall.objects.get(pk=shared.pop())
    assert (call.images, call.device_id, call.steps) == (7, device.pk, steps)
    alone = [attempt_of(r).pipeline_call for r in (more_steps, other_model, fourth)]
    assert [c.images for c in alone] == [2, 2, 2], "other steps and models are not mixed in; 9 > the best size"
    made_as = [(r.model, r.steps) for r in (more_steps, other_model, fourth)]
    assert [(c.model, c.steps) for c in alone] == made_as, "each call made as its requests recorded"
    assert len({c.pk for c in alone} | {call.pk}) == 4
    for request in (first, second, third, fourth, more_steps, other_model):
        assert_made_as_asked(attempt_of(request))
        assert_exactly_once(request)


@pytest.mark.e2e
def test_a_worker_waits_up_to_samples_batch_wait_ms_to_fill_its_call(cluster, persona_factory):
    cluster.configure(GPU_SIMULATED="sim*1", SAMPLES_MODEL="simulated-h100:0.3", SAMPLES_BATCH_WAIT_MS="60000")
    (device,) = registered("sim*1")
    early = sample_request_submit(persona=persona_factory(), count=3).request
    cluster.start("gpuworker", "--device", device.uuid)
    wait_for(
        lambda: Assignment.objects.filter(request=early, state=AssignmentState.RUNNING).exists(),
        60,
        lambda: f"the worker to take the first request\n{cluster.logs()}",
    )
    assert not PipelineCall.objects.exists(), "it waits for more work before calling"

    late = sample_request_submit(persona=persona_factory(), count=4).request  # 3 + 4: the call is full
    wait_done([early, late], cluster)

    assert attempt_of(early).pipeline_call_id == attempt_of(late).pipeline_call_id
    assert PipelineCall.objects.get().images == 7


@pytest.mark.e2e
def test_a_worker_killed_in_the_middle_of_a_batched_call_leaves_every_image_made_exactly_once(cluster, persona_factory):
    cluster.configure(GPU_SIMULATED="sim*2", SAMPLES_MODEL="simulated:1.5")  # a call of 7 images: 10.5 s
    victim, survivor = registered("sim*2")
    requests = [sample_request_submit(persona=persona_factory(), count=n).request for n in (2, 2, 3)]
    worker = cluster.start("gpuworker", "--device", victim.uuid)
    running = Assignment.objects.filter(state=AssignmentState.RUNNING, device=victim)
    wait_for(
        lambda: sum(running.values_list("image_count", flat=True)) == 7,
        60,
        lambda: f"the victim to take all seven images into one call\n{cluster.logs()}",
        interval=0.05,
    )
    batch = list(running)
    assert Assignment.objects.filter(pk__in=[a.pk for a in batch], state=AssignmentState.RUNNING).count() == len(batch)
    assert not PipelineCall.objects.exists(), "the batched call is still running"

    # Killed before the survivor starts: a worker's start (seconds on a loaded machine) must not
    # eat into the 10.5 s call, which could end first.
    os.killpg(worker.pid, signal.SIGKILL)
    cluster.start_worker(survivor)
    wait_done(requests, cluster)

    for request in requests:
        assert_exactly_once(request)
    for attempt in batch:
        chunk = Assignment.objects.filter(request=attempt.request_id, first_index=attempt.first_index)
        assert [(a.state, a.device_id) for a in chunk.order_by("attempt")] == [
            (AssignmentState.ABANDONED, victim.pk),
            (AssignmentState.SUCCEEDED, survivor.pk),
        ]
    assert SampleImage.objects.count() == 7
    assert not PipelineCall.objects.filter(device=victim).exists(), "the killed call made nothing"


def test_batching_off_makes_one_call_per_chunk(settings, device_factory, persona_factory):
    """SAMPLES_BATCHING=0 (for measuring what batching brings): the popped chunk runs alone."""
    from personas.batch import batch_gather

    device = device_factory("H100", worker=True)
    learned_curve(device, fixed=0.11, per_image=0.17, knee=6.5)  # best at 7: with batching, 2 + 2 would share
    settings.SAMPLES = {**settings.SAMPLES, "BATCHING": False}
    first, second = (sample_request_submit(persona=persona_factory(), count=2, device=device).request for _ in range(2))
    attempt = assignments.assignment_claim(
        assignment_id=first.assignments.get().pk, device=device, worker_name="w", host="testhost", timeout=60
    )
    context = WorkerContext(device=device, name="w", host="testhost", generator=None)
    members = batch_gather(first=attempt, request=first, context=context)
    assert [m.assignment.pk for m in members] == [attempt.pk]
    assert second.assignments.get().state == "queued"
