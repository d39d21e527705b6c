"""Which queues an idle worker steals from, read from the database (placement_reads.steal_sources)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gpuscheduler.assignments import assignment_claim
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, Device
from gpuscheduler.placement_reads import steal_sources
from gpuscheduler.queues import device_queue_name, enqueue_assignment
from gpuscheduler.worker import GpuWorker
from personas.services import sample_request_submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def fast_busy_gpu(device_factory, persona_factory):
    """A fast device running a call of 4 images with a call of 1 queued behind it."""
    fast = device_factory("fast", worker=True, speed=1.0)
    first = sample_request_submit(persona=persona_factory(), count=4, enqueue=False).assignments
    assert [a.planned_device_id for a in first] == [fast.pk]
    assert assignment_claim(assignment_id=first[0].pk, device=fast, worker_name="w", host="testhost", timeout=60)
    second = sample_request_submit(persona=persona_factory(), count=1, enqueue=False).assignments
    assert [(a.planned_device_id, a.state) for a in second] == [(fast.pk, AssignmentState.QUEUED)]
    return fast


def test_a_slow_device_does_not_steal_from_a_busy_fast_one(fast_busy_gpu, device_factory):
    slow = device_factory("slow", worker=True, speed=0.1)
    assert steal_sources(slow.pk) == set()


def test_an_equally_fast_device_steals_the_call_waiting_behind_a_running_one(fast_busy_gpu, device_factory):
    twin = device_factory("twin", worker=True, speed=1.0)
    assert steal_sources(twin.pk) == {fast_busy_gpu.pk}


def test_a_slow_device_steals_from_a_fast_one_whose_worker_is_gone(fast_busy_gpu, device_factory):
    slow = device_factory("slow", worker=True, speed=0.1)
    Device.objects.filter(pk=fast_busy_gpu.pk).update(worker_seen_at=timezone.now() - timedelta(minutes=5))
    assert steal_sources(slow.pk) == {fast_busy_gpu.pk}


def test_pinned_work_is_never_a_steal_source(fast_busy_gpu, device_factory):
    twin = device_factory("twin", worker=True, speed=1.0)
    Assignment.objects.filter(state=AssignmentState.QUEUED).update(pinned=True)
    assert steal_sources(twin.pk) == set()


@pytest.mark.parametrize(
    ("rule", "thief_speed", "steals"),
    [("speed", 0.1, False), ("speed", 1.0, True), ("always", 0.1, True)],
    ids=["slow-thief-speed-rule", "twin-thief-speed-rule", "slow-thief-always"],
)
def test_the_worker_reads_the_queues_its_stealing_rule_allows(
    fast_busy_gpu, device_factory, redis_db, settings, rule, thief_speed, steals
):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "STEAL": rule}
    for waiting in Assignment.objects.filter(state=AssignmentState.QUEUED):
        enqueue_assignment(waiting, connection=redis_db)
    thief = device_factory("thief", worker=True, speed=thief_speed)
    context = WorkerContext(device=thief, name="thief-worker", host="testhost", generator=None)
    worker = GpuWorker(context, connection=redis_db)
    others = worker.queues[2:]
    assert [queue.name for queue in others] == [device_queue_name(fast_busy_gpu.pk)]
    assert worker._worth_stealing(others) == (others if steals else [])


def test_the_worker_asks_the_database_nothing_while_other_queues_are_empty(
    fast_busy_gpu, device_factory, redis_db, django_assert_num_queries
):
    twin = device_factory("twin", worker=True, speed=1.0)
    worker = GpuWorker(
        WorkerContext(device=twin, name="twin-worker", host="testhost", generator=None), connection=redis_db
    )
    others = worker.queues[2:]
    assert [queue.name for queue in others] == [device_queue_name(fast_busy_gpu.pk)]
    with django_assert_num_queries(0):
        assert worker._worth_stealing(others) == [], "the queued call is in the database but not on Redis"


def test_a_slower_device_leaves_the_call_queued_behind_one_about_to_end(fast_busy_gpu, device_factory):
    half = device_factory("half", worker=True, speed=0.5)  # 2 s for the queued image
    running = Assignment.objects.filter(device=fast_busy_gpu, state=AssignmentState.RUNNING)
    running.update(started_at=timezone.now() - timedelta(seconds=3.9))  # 0.1 s left, then 1 s queued
    assert steal_sources(half.pk) == set()


def test_a_slower_device_takes_the_call_queued_behind_one_just_begun(fast_busy_gpu, device_factory):
    half = device_factory("half", worker=True, speed=0.5)  # 2 s, against 4 s left and 1 s queued
    assert steal_sources(half.pk) == {fast_busy_gpu.pk}
