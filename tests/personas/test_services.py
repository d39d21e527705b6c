"""The personas services: submitting, deriving request states, committing images, cancelling."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from gpuscheduler import queues
from gpuscheduler.assignments import assignment_claim
from gpuscheduler.models import Assignment, AssignmentState
from personas.attempts import sample_images_commit
from personas.image_models import default_model, model_key, spec_of
from personas.imagegen import placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import (
    RequestAlreadyActive,
    sample_image_path,
    sample_request_cancel,
    sample_request_refresh,
    sample_request_submit,
)
from tests.media import stored_bytes, stored_names


@pytest.fixture
def two_gpus(device_factory):
    return [device_factory("H100", worker=True), device_factory("H100", worker=True)]


def submit(persona, count: int = 4, **options):
    return sample_request_submit(persona=persona, count=count, enqueue=False, **options)


def set_states(request: SampleRequest, *states: str) -> list[Assignment]:
    """Give the request's chunks these states, in image order."""
    chunks = list(request.assignments.order_by("first_index"))
    assert len(chunks) == len(states)
    for chunk, state in zip(chunks, states, strict=True):
        Assignment.objects.filter(pk=chunk.pk).update(state=state, error="boom" if state == "failed" else "")
    return chunks


def media_files(settings) -> list[str]:
    """Every file in the samples storage, by name (.part files included)."""
    return stored_names()


# --- submitting ---------------------------------------------------------------------------------


def test_a_request_gets_seeds_after_every_image_asked_before(persona, two_gpus):
    first = submit(persona, 4).request
    persona.refresh_from_db()
    assert (first.first_seed, persona.images_requested) == (persona.base_seed, 4)
    assert [first.seed_for(i) for i in range(4)] == [persona.base_seed + i for i in range(4)]
    SampleRequest.objects.filter(pk=first.pk).update(state=RequestState.SUCCEEDED)

    second = submit(persona, 3).request

    persona.refresh_from_db()
    assert second.first_seed == persona.base_seed + 4
    assert persona.images_requested == 7


def test_seeds_wrap_around_at_the_largest_seed(persona_factory, two_gpus):
    persona = persona_factory(base_seed=2**32 - 2)
    request = submit(persona, 3).request
    assert [request.seed_for(i) for i in range(3)] == [2**32 - 2, 2**32 - 1, 0]


def test_a_request_records_who_asked_what_model_and_steps(persona, two_gpus, user_factory):
    user = user_factory()
    default = default_model()
    submitted = submit(persona, 2, user=user)
    request = submitted.request
    assert (request.requested_by, request.image_model, request.steps, request.state) == (
        user,
        default,
        default.steps,
        RequestState.QUEUED,
    )
    assert request.model_spec == spec_of(default)
    assert request.model == spec_of(default)["key"] == model_key(request.model_spec)
    assert request.model.startswith(f"{default.name}@")
    assert submitted.by_device == {two_gpus[0].label: 1, two_gpus[1].label: 1}
    assert submitted.summary() == f"2 images of {persona.name}: 1 on {two_gpus[0].label}, 1 on {two_gpus[1].label}"


def test_a_second_submit_while_one_is_active_raises_and_writes_nothing(persona, two_gpus):
    first = submit(persona, 4).request

    with pytest.raises(RequestAlreadyActive) as error:
        submit(persona, 2)

    assert error.value.request == first
    assert str(error.value) == f"{persona.name} already has 4 images queued."
    assert SampleRequest.objects.count() == 1
    assert Assignment.objects.count() == 2
    persona.refresh_from_db()
    assert persona.images_requested == 4


def test_a_running_request_also_blocks_a_second_submit(persona, two_gpus):
    first = submit(persona, 2).request
    SampleRequest.objects.filter(pk=first.pk).update(state=RequestState.RUNNING)
    with pytest.raises(RequestAlreadyActive, match="already has 2 images running"):
        submit(persona, 2)


def test_other_personas_are_not_blocked(persona_factory, two_gpus):
    submit(persona_factory(), 2)
    submit(persona_factory(), 2)
    assert SampleRequest.objects.count() == 2


@pytest.mark.parametrize("active", [RequestState.QUEUED, RequestState.RUNNING])
def test_the_database_itself_refuses_a_second_active_request(persona, active):
    SampleRequest.objects.create(persona=persona, count=1, first_seed=0, model="tiny", steps=2, state=active)
    with pytest.raises(IntegrityError), transaction.atomic():
        SampleRequest.objects.create(persona=persona, count=1, first_seed=1, model="tiny", steps=2)


def test_the_database_allows_any_number_of_ended_requests_beside_one_active(persona):
    for state in (RequestState.SUCCEEDED, RequestState.FAILED, RequestState.CANCELLED, RequestState.SUCCEEDED):
        SampleRequest.objects.create(persona=persona, count=1, first_seed=0, model="tiny", steps=2, state=state)
    SampleRequest.objects.create(persona=persona, count=1, first_seed=0, model="tiny", steps=2)
    assert SampleRequest.objects.filter(persona=persona).count() == 5


# --- deriving the request's state ---------------------------------------------------------------


@pytest.fixture
def request_of_two_chunks(persona, two_gpus) -> SampleRequest:
    request = submit(persona, 4).request
    assert request.assignments.count() == 2
    return request


def test_a_request_whose_chunks_all_wait_is_queued(request_of_two_chunks):
    refreshed = sample_request_refresh(request_id=request_of_two_chunks.pk)
    assert (refreshed.state, refreshed.started_at, refreshed.finished_at) == (RequestState.QUEUED, None, None)


def test_a_request_with_a_running_chunk_is_running_and_has_started(request_of_two_chunks):
    set_states(request_of_two_chunks, AssignmentState.RUNNING, AssignmentState.QUEUED)
    refreshed = sample_request_refresh(request_id=request_of_two_chunks.pk)
    assert refreshed.state == RequestState.RUNNING
    assert refreshed.started_at is not None and refreshed.finished_at is None


def test_a_request_with_one_chunk_done_and_one_waiting_is_running(request_of_two_chunks):
    set_states(request_of_two_chunks, AssignmentState.SUCCEEDED, AssignmentState.QUEUED)
    assert sample_request_refresh(request_id=request_of_two_chunks.pk).state == RequestState.RUNNING


def test_a_request_whose_chunks_all_succeeded_has_succeeded(request_of_two_chunks):
    set_states(request_of_two_chunks, AssignmentState.SUCCEEDED, AssignmentState.SUCCEEDED)
    refreshed = sample_request_refresh(request_id=request_of_two_chunks.pk)
    assert (refreshed.state, refreshed.error) == (RequestState.SUCCEEDED, "")
    assert refreshed.started_at is not None and refreshed.finished_at is not None


def test_a_request_with_a_failed_chunk_has_failed_and_says_which_images(request_of_two_chunks):
    set_states(request_of_two_chunks, AssignmentState.SUCCEEDED, AssignmentState.FAILED)
    refreshed = sample_request_refresh(request_id=request_of_two_chunks.pk)
    assert refreshed.state == RequestState.FAILED
    assert refreshed.error == "images from 2: boom"
    assert refreshed.finished_at is not None


def test_a_retried_chunk_counts_by_its_latest_attempt(request_of_two_chunks):
    _, second = set_states(request_of_two_chunks, AssignmentState.SUCCEEDED, AssignmentState.RETRIED)
    retry = Assignment.objects.create(
        request=request_of_two_chunks,
        first_index=second.first_index,
        image_count=second.image_count,
        attempt=2,
        job_id="samples-retry",
        queue_name=second.queue_name,
        planned_device=second.planned_device,
        policy="balanced",
        reason="retry",
    )
    assert sample_request_refresh(request_id=request_of_two_chunks.pk).state == RequestState.RUNNING

    Assignment.objects.filter(pk=retry.pk).update(state=AssignmentState.SUCCEEDED)
    assert sample_request_refresh(request_id=request_of_two_chunks.pk).state == RequestState.SUCCEEDED


def test_an_ended_request_is_left_alone(request_of_two_chunks):
    SampleRequest.objects.filter(pk=request_of_two_chunks.pk).update(state=RequestState.CANCELLED)
    set_states(request_of_two_chunks, AssignmentState.SUCCEEDED, AssignmentState.SUCCEEDED)
    assert sample_request_refresh(request_id=request_of_two_chunks.pk).state == RequestState.CANCELLED


def test_refreshing_a_missing_request_returns_none(db):
    assert sample_request_refresh(request_id=987654) is None


# --- committing images --------------------------------------------------------------------------


@pytest.fixture
def running(persona, two_gpus):
    """A request of two images on one device, its only attempt claimed by a worker."""
    request = submit(persona, 2, device=two_gpus[0]).request
    (queued,) = request.assignments.all()
    assignment = assignment_claim(
        assignment_id=queued.pk, device=two_gpus[0], worker_name="w1", host="testhost", timeout=60
    )
    assert assignment is not None
    return request, assignment, two_gpus[0]


def commit(request, assignment, device):
    images = [placeholder_image(request.seed_for(i)) for i in range(assignment.image_count)]
    return sample_images_commit(
        assignment=assignment, request=request, images=images, device=device, calls=1, peak_memory=None
    )


def test_a_live_attempt_commits_its_files_and_rows(running, settings):
    request, assignment, device = running

    assert commit(request, assignment, device) is True

    images = list(SampleImage.objects.filter(request=request).order_by("index"))
    assert [(i.index, i.seed) for i in images] == [(0, request.first_seed), (1, request.first_seed + 1)]
    assert all(i.device == device and i.assignment_id == assignment.pk for i in images)
    # Each image and its thumbnail beside it (personas/thumbnails.py), named on the row.
    assert [i.thumbnail for i in images] == [i.image.name.removesuffix(".png") + ".thumb.webp" for i in images]
    assert media_files(settings) == sorted(name for i in images for name in (i.image.name, i.thumbnail))
    assert all(stored_bytes(i.image.name)[:4] == b"\x89PNG" for i in images)
    assert all(stored_bytes(i.thumbnail)[8:12] == b"WEBP" for i in images)
    assignment.refresh_from_db()
    assert (assignment.state, assignment.calls) == (AssignmentState.SUCCEEDED, 1)
    request.refresh_from_db()
    assert request.state == RequestState.SUCCEEDED


def test_an_attempt_that_lost_its_lease_leaves_no_file_and_no_row(running, settings):
    request, assignment, device = running
    Assignment.objects.filter(pk=assignment.pk).update(state=AssignmentState.ABANDONED)

    assert commit(request, assignment, device) is False

    assert SampleImage.objects.count() == 0
    assert media_files(settings) == [], "neither the PNGs nor their .part files stay behind"
    assignment.refresh_from_db()
    assert assignment.state == AssignmentState.ABANDONED


def test_a_commit_that_fails_in_the_database_removes_its_files(running, settings):
    request, assignment, device = running
    # Another attempt already stored image 1: the unique (request, index) constraint refuses ours.
    SampleImage.objects.create(
        persona=request.persona, request=request, index=1, image="elsewhere.png", seed=1, prompt="p", model="m"
    )

    with pytest.raises(IntegrityError):
        commit(request, assignment, device)

    assert media_files(settings) == []
    assert SampleImage.objects.filter(request=request).count() == 1
    assignment.refresh_from_db()
    assert assignment.state == AssignmentState.RUNNING, "the attempt's success was rolled back with the rows"


def test_image_paths_are_built_from_ids_only():
    assert sample_image_path(persona_id=3, request_id=70, index=2, assignment_id=9) == "samples/persona-3/r70-i2-a9.png"
    with pytest.raises(ValueError):
        sample_image_path(persona_id="../../etc", request_id=1, index=0, assignment_id=1)  # type: ignore[arg-type]


def test_stored_image_names_never_contain_the_persona_slug_or_prompt(running, settings):
    request, assignment, device = running
    request.persona.slug = "evil-slug"
    request.persona.appearance_prompt = "../../../etc/passwd"
    request.persona.save()
    assert commit(request, assignment, device) is True
    images = list(SampleImage.objects.filter(request=request))
    assert len(images) == assignment.image_count == 2
    for image in images:
        assert "evil" not in image.image.name and ".." not in image.image.name
        assert image.image.name.startswith(f"samples/persona-{request.persona_id}/")


# --- cancelling ---------------------------------------------------------------------------------


def test_cancel_drops_queued_attempts_from_redis_and_keeps_made_images(
    persona, two_gpus, redis_db, django_capture_on_commit_callbacks, settings
):
    with django_capture_on_commit_callbacks(execute=True):
        request = sample_request_submit(persona=persona, count=4).request
    first, second = request.assignments.order_by("first_index")
    assert queues.queue_job_ids(first.queue_name, redis_db) == {first.job_id}
    assert queues.queue_job_ids(second.queue_name, redis_db) == {second.job_id}
    # The first chunk ran and stored an image before the cancel.
    claimed = assignment_claim(assignment_id=first.pk, device=two_gpus[0], worker_name="w", host="h", timeout=60)
    redis_db.lrem(f"rq:queue:{first.queue_name}", 0, first.job_id)  # the worker popped it
    assert commit(request, claimed, two_gpus[0])
    kept_files = media_files(settings)

    with django_capture_on_commit_callbacks(execute=True):
        cancelled = sample_request_cancel(request=request)

    assert cancelled == 1
    assert (request.state, request.error) == (RequestState.CANCELLED, "")
    assert request.finished_at is not None
    second.refresh_from_db()
    assert (second.state, second.error) == (AssignmentState.CANCELLED, "request cancelled")
    assert queues.queue_job_ids(second.queue_name, redis_db) == set()
    first.refresh_from_db()
    assert first.state == AssignmentState.SUCCEEDED
    assert SampleImage.objects.filter(request=request).count() == 2
    assert media_files(settings) == kept_files and len(kept_files) == 4  # 2 images, 2 thumbnails


def test_cancel_leaves_a_running_attempt_to_finish(persona, two_gpus):
    request = submit(persona, 4).request
    first, second = request.assignments.order_by("first_index")
    assignment_claim(assignment_id=first.pk, device=two_gpus[0], worker_name="w", host="h", timeout=60)

    assert sample_request_cancel(request=request) == 1

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.state, second.state) == (AssignmentState.RUNNING, AssignmentState.CANCELLED)


def test_cancelling_twice_or_an_ended_request_does_nothing(persona, two_gpus):
    request = submit(persona, 2).request
    assert sample_request_cancel(request=request) == 2
    assert sample_request_cancel(request=request) == 0
    done = SampleRequest.objects.create(
        persona=persona, count=1, first_seed=0, model="tiny", steps=2, state=RequestState.SUCCEEDED
    )
    assert sample_request_cancel(request=done) == 0
    done.refresh_from_db()
    assert done.state == RequestState.SUCCEEDED


def test_a_cancelled_request_no_longer_blocks_a_new_one(persona, two_gpus):
    sample_request_cancel(request=submit(persona, 2).request)
    assert submit(persona, 2).request.state == RequestState.QUEUED
