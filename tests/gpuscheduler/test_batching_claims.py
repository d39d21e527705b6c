"""Which queued attempts a worker claims to fill its call (gpuscheduler/batching.py), and how the
heartbeat keeps a call of several attempts alive."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from gpuscheduler import queues
from gpuscheduler.assignments import assignment_claim
from gpuscheduler.batching import call_fill, call_size, joins
from gpuscheduler.heartbeat import Heartbeat, WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, Device, Health
from gpuscheduler.workloads import default_key_and_steps
from personas.image_models import spec_of
from personas.models import ImageModel, SampleRequest
from tests.conftest import learned_curve

pytestmark = pytest.mark.django_db(transaction=True)

# An H100's curve (1.23 s for 1 image ... 2.85 s for 16): its best call size is 7 of SAMPLES_MAX_BATCH=16.
H100 = {"fixed": 0.11, "per_image": 0.17, "knee": 6.5}


@pytest.fixture
def h100(device_factory):
    device = device_factory("H100", worker=True)
    learned_curve(device, **H100)
    return device


def chunk(persona, count, device, *, pinned=False, steps=None, model=None, avoid=None) -> Assignment:
    """A request of `count` images queued as one chunk on `device`'s queue (pinned or not), of the
    default model at its steps unless `model` or `steps` say otherwise."""
    default_model, default_steps = default_key_and_steps()
    # The default model's spec, as sample_request_submit records it (another model: none, as a
    # request made before models were data).
    spec: dict[str, Any] = {}
    if model is None:
        spec = {**spec_of(ImageModel.objects.get(is_default=True)), "steps": steps or default_steps}
    request = SampleRequest.objects.create(
        persona=persona,
        count=count,
        first_seed=persona.base_seed,
        model=model or default_model,
        model_spec=spec,
        steps=steps or default_steps,
    )
    attempt = Assignment.objects.create(
        request=request,
        image_count=count,
        job_id=f"samples-{uuid.uuid4().hex}",
        queue_name=queues.device_queue_name(device.pk, pinned=pinned),
        planned_device=device,
        pinned=pinned,
        avoid_device=avoid,
        policy="test",
        reason="queued by the test",
    )
    assert queues.enqueue_assignments([attempt]) == 1
    return attempt


def fill(first: Assignment, device, *, context: WorkerContext | None = None) -> list[Assignment]:
    """What the worker of `device` claims for the call of `first`, which it has just popped."""
    context = context or WorkerContext(device=device, name="w1", host="testhost", generator=None)
    claimed = assignment_claim(assignment_id=first.pk, device=device, worker_name="w1", host="testhost", timeout=60)
    assert claimed is not None
    request = SampleRequest.objects.get(pk=first.request_id)
    with context.running(claimed, report=False):
        taken = call_fill(
            first=claimed,
            context=context,
            model=request.model,
            steps=request.steps,
            match={"request__model": request.model, "request__steps": request.steps},
            timeout=60,
        )
        assert context.assignment_ids == [a.pk for a in taken], "the heartbeat renews every attempt of the call"
    return taken


def states(*attempts: Assignment) -> list[str]:
    return [Assignment.objects.get(pk=a.pk).state for a in attempts]


def test_a_chunk_joins_a_call_while_it_brings_the_call_nearer_the_best_size():
    assert joins(4, 3, best=7, limit=16)
    assert joins(4, 4, best=7, limit=16), "8 is nearer 7 than 4 is"
    assert not joins(4, 6, best=7, limit=16), "10 is as far from 7 as 4"
    assert not joins(7, 1, best=7, limit=16), "a call of the best size is full"
    assert not joins(1, 16, best=16, limit=16), "never past SAMPLES_MAX_BATCH"


def test_the_best_call_size_comes_from_the_devices_learned_curve(h100, device_factory):
    model, steps = default_key_and_steps()
    assert call_size(device=h100, model=model, steps=steps) == 7
    linear = device_factory("T4", speed=1.0)  # a line through zero: a bigger call gains nothing
    assert call_size(device=linear, model=model, steps=steps) == 1


def test_a_call_takes_other_requests_chunks_oldest_first_up_to_the_best_size(h100, persona_factory, redis_db):
    first, second, third, fourth = (chunk(persona_factory(), n, h100) for n in (2, 2, 3, 2))

    taken = fill(first, h100)

    assert [a.pk for a in taken] == [first.pk, second.pk, third.pk], "2 + 2 + 3 = 7, the best size"
    assert states(first, second, third, fourth) == [AssignmentState.RUNNING] * 3 + [AssignmentState.QUEUED]
    assert {(a.device_id, a.worker_name) for a in taken} == {(h100.pk, "w1")}
    waiting = queues.queue_job_ids(queues.device_queue_name(h100.pk), redis_db)
    assert fourth.job_id in waiting
    assert not {second.job_id, third.job_id} & waiting, "the claimed partners' jobs left the queue"


def test_two_four_image_chunks_share_a_call_when_the_best_size_is_seven(h100, persona_factory, redis_db):
    first, second, third = (chunk(persona_factory(), 4, h100) for _ in range(3))

    taken = fill(first, h100)

    assert [a.pk for a in taken] == [first.pk, second.pk]
    assert states(third) == [AssignmentState.QUEUED]


def test_a_chunk_too_large_for_the_call_is_passed_over_for_a_later_one_that_fits(h100, persona_factory, redis_db):
    first, large, small = (chunk(persona_factory(), n, h100) for n in (3, 8, 4))

    taken = fill(first, h100)

    assert [a.pk for a in taken] == [first.pk, small.pk]
    assert states(large) == [AssignmentState.QUEUED]


def test_other_steps_or_another_model_never_join_a_call(h100, persona_factory, redis_db):
    first = chunk(persona_factory(), 2, h100)
    more_steps = chunk(persona_factory(), 2, h100, steps=default_key_and_steps()[1] + 1)
    other_model = chunk(persona_factory(), 2, h100, model="simulated:0.5")
    same = chunk(persona_factory(), 2, h100)

    taken = fill(first, h100)

    assert [a.pk for a in taken] == [first.pk, same.pk]
    assert states(more_steps, other_model) == [AssignmentState.QUEUED] * 2


def test_pinned_work_of_another_device_is_never_taken_its_unpinned_work_is_where_stealing_pays(
    h100, device_factory, persona_factory, redis_db
):
    other = device_factory("A100", worker=True)
    learned_curve(other, **H100)
    first = chunk(persona_factory(), 1, h100)
    pinned_elsewhere = chunk(persona_factory(), 1, other, pinned=True)
    pinned_here = chunk(persona_factory(), 1, h100, pinned=True)
    unpinned_elsewhere = chunk(persona_factory(), 1, other)
    # The other device is out of service: work queued on it must not wait for it.
    Device.objects.filter(pk=other.pk).update(health=Health.UNHEALTHY, health_reason="lost")

    taken = fill(first, h100)

    assert [a.pk for a in taken] == [first.pk, pinned_here.pk, unpinned_elsewhere.pk], "own queue first"
    assert states(pinned_elsewhere) == [AssignmentState.QUEUED]
    assert queues.queue_job_ids(queues.device_queue_name(other.pk, pinned=True), redis_db) == {pinned_elsewhere.job_id}


def test_work_of_a_healthy_peer_stays_where_stealing_does_not_pay(h100, device_factory, persona_factory, redis_db):
    twin = device_factory("H100", worker=True)
    learned_curve(twin, **H100)
    first = chunk(persona_factory(), 2, h100)
    theirs = chunk(persona_factory(), 2, twin)  # its idle twin makes it as soon as this device would

    assert fill(first, h100) == [Assignment.objects.get(pk=first.pk)]
    assert states(theirs) == [AssignmentState.QUEUED]


def test_a_retry_that_failed_on_this_device_is_left_for_another(h100, persona_factory, redis_db):
    first = chunk(persona_factory(), 2, h100)
    retry = chunk(persona_factory(), 2, h100, avoid=h100)

    assert [a.pk for a in fill(first, h100)] == [first.pk]
    assert states(retry) == [AssignmentState.QUEUED]


def test_the_heartbeat_renews_every_attempt_of_a_call_and_it_goes_on_while_one_holds_its_lease(
    h100, persona_factory, redis_db
):
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=None)
    first = chunk(persona_factory(), 2, h100)
    partner = chunk(persona_factory(), 2, h100)
    heartbeat = Heartbeat(context, interval=1.0)
    model, steps = default_key_and_steps()
    claimed = assignment_claim(assignment_id=first.pk, device=h100, worker_name="w1", host="testhost", timeout=60)
    with context.running(claimed, report=False):
        taken = call_fill(
            first=claimed,
            context=context,
            model=model,
            steps=steps,
            match={},
            timeout=60,
        )
        assert [a.pk for a in taken] == [first.pk, partner.pk]
        old = timezone.now() - timedelta(hours=1)
        Assignment.objects.filter(pk__in=[first.pk, partner.pk]).update(heartbeat_at=old)

        heartbeat.beat()
        assert Assignment.objects.filter(pk__in=[first.pk, partner.pk], heartbeat_at__gt=old).count() == 2

        Assignment.objects.filter(pk=partner.pk).update(state=AssignmentState.ABANDONED)
        heartbeat.beat()
        assert context.is_lost(partner.pk) and context.alive(), "the call goes on for the attempt still held"
        assert context.assignment_id == first.pk

        Assignment.objects.filter(pk=first.pk).update(state=AssignmentState.ABANDONED)
        heartbeat.beat()
        assert not context.alive(), "nothing of the call is wanted any more: it stops"


def test_a_settled_attempt_is_no_longer_renewed(h100, persona_factory, redis_db):
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=None)
    first, partner = chunk(persona_factory(), 2, h100), chunk(persona_factory(), 2, h100)
    with context.running(first, report=False):
        context.add_running(partner)
        assert context.assignment_ids == [first.pk, partner.pk]
        context.settle(partner.pk)  # e.g. put back to waiting after a storage fault, then claimed elsewhere
        assert context.assignment_ids == [first.pk]
