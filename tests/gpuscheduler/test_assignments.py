"""The attempt lifecycle and recovery, in one process: retries, hand-offs, cancels, re-enqueues."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpuscheduler import queues
from gpuscheduler.assignments import assignment_claim, assignment_fail, assignments_place
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, Health, Snapshot
from gpuscheduler.recovery import assignments_recover, assignments_recover_in_turn
from gpuscheduler.services import snapshots_compact
from personas.models import RequestState, SampleRequest
from personas.services import sample_image_path, sample_request_cancel, sample_request_submit
from tests.media import store, stored_names

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def three_gpus(device_factory):
    return [device_factory("H100", worker=True) for _ in range(3)]


def running(request: SampleRequest, device, *, first_index: int = 0, heartbeat_age: float = 0.0) -> Assignment:
    """Claim the request's chunk at `first_index` for `device` and age its heartbeat."""
    attempt = Assignment.objects.get(request=request, first_index=first_index, state=AssignmentState.QUEUED)
    claimed = assignment_claim(assignment_id=attempt.pk, device=device, worker_name="w", host="testhost", timeout=600)
    assert claimed is not None
    Assignment.objects.filter(pk=attempt.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=heartbeat_age))
    return Assignment.objects.get(pk=attempt.pk)


def test_a_dead_workers_two_image_chunk_is_retried_whole_even_with_idle_devices_to_split_over(
    persona, three_gpus, redis_db
):
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    # Two idle simulated devices would split 2 images 1 + 1; make it one chunk of 2 first.
    Assignment.objects.filter(request=request).delete()
    with transaction.atomic():
        (chunk,) = assignments_place(request_id=request.pk, count=2, whole=True)
    assert chunk.image_count == 2
    dead = running(request, three_gpus[0], heartbeat_age=3600)

    report = assignments_recover()

    assert report.abandoned == [dead.job_id]
    (retry,) = Assignment.objects.filter(request=request, state=AssignmentState.QUEUED)
    assert (retry.first_index, retry.image_count, retry.attempt) == (0, 2, 2)
    assert retry.avoid_device_id == three_gpus[0].pk
    assert retry.job_id.encode() in redis_db.lrange(f"rq:queue:{retry.queue_name}", 0, -1)


def test_a_failure_after_the_request_was_cancelled_is_not_retried(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    attempt = running(request, three_gpus[0])
    sample_request_cancel(request=request)

    retry = assignment_fail(assignment_id=attempt.pk, error="boom")

    assert retry is None
    attempt.refresh_from_db()
    assert attempt.state == AssignmentState.FAILED and "no longer active" in attempt.error
    assert not Assignment.objects.filter(request=request, state=AssignmentState.QUEUED).exists()
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.CANCELLED


def test_a_dead_worker_of_a_cancelled_request_is_not_retried(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    running(request, three_gpus[0], heartbeat_age=3600)
    sample_request_cancel(request=request)

    assignments_recover()

    assert list(Assignment.objects.filter(request=request).values_list("state", flat=True)) == [AssignmentState.FAILED]


def test_abandoning_an_attempt_removes_the_files_it_renamed_into_place(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    dead = running(request, three_gpus[0], heartbeat_age=3600)
    name = sample_image_path(persona_id=persona.pk, request_id=request.pk, index=0, assignment_id=dead.pk)
    store(name, b"\x89PNG half a commit")
    store(name + ".part", b"\x89PNG half a write")  # killed while writing its next file

    assignments_recover()

    assert stored_names() == []


def test_a_retry_popped_by_the_device_it_failed_on_moves_to_a_device_that_can_take_it(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    failed_on = three_gpus[0]
    attempt = running(request, failed_on)
    retry = assignment_fail(assignment_id=attempt.pk, error="OutOfMemory at one image")
    # Make the retry sit on the failed device's own queue, as a thief could have found it.
    Assignment.objects.filter(pk=retry.pk).update(
        planned_device=failed_on, queue_name=queues.device_queue_name(failed_on.pk)
    )

    claimed = assignment_claim(assignment_id=retry.pk, device=failed_on, worker_name="w", host="h", timeout=60)

    assert claimed is None
    retry.refresh_from_db()
    assert retry.state == AssignmentState.QUEUED and retry.planned_device_id != failed_on.pk
    assert retry.reason.startswith(f"moved away from {failed_on.label}")
    assert retry.job_id.encode() in redis_db.lrange(f"rq:queue:{retry.queue_name}", 0, -1)


def test_the_device_a_retry_failed_on_takes_it_when_no_other_device_has_a_worker(persona, device_factory, redis_db):
    alone = device_factory("H100", worker=True)
    device_factory("H100")  # registered, no worker
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    retry = assignment_fail(assignment_id=running(request, alone).pk, error="boom")

    claimed = assignment_claim(assignment_id=retry.pk, device=alone, worker_name="w", host="h", timeout=60)

    assert claimed is not None and claimed.state == AssignmentState.RUNNING


def test_a_queued_attempt_that_redis_lost_is_enqueued_again_once(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1).request
    (attempt,) = Assignment.objects.filter(request=request)
    redis_db.flushdb()
    later = timezone.now() + timedelta(seconds=30)

    first = assignments_recover(now=later)
    second = assignments_recover(now=later)

    assert first.requeued == [attempt.job_id]
    assert second.requeued == [], "now it is on its queue again"
    assert redis_db.lrange(f"rq:queue:{attempt.queue_name}", 0, -1) == [attempt.job_id.encode()]


def test_a_job_on_its_queue_or_enqueued_a_moment_ago_is_left_alone(persona, three_gpus, redis_db):
    sample_request_submit(persona=persona, count=1)
    assert assignments_recover(now=timezone.now() + timedelta(seconds=30)).requeued == []
    redis_db.flushdb()
    assert assignments_recover(now=timezone.now() + timedelta(seconds=1)).requeued == [], "within the grace"


def test_an_active_request_with_no_live_attempt_left_gets_its_final_state(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    Assignment.objects.filter(request=request).update(state=AssignmentState.FAILED, error="lost")
    SampleRequest.objects.filter(pk=request.pk).update(created=timezone.now() - timedelta(minutes=1))

    report = assignments_recover()

    assert report.repaired_requests == [request.pk]
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.FAILED


def test_orphaned_requests_of_either_outcome_are_repaired_in_a_fixed_number_of_queries(persona_factory, three_gpus):
    def orphans(count: int) -> list[int]:
        """`count` requests left with no live attempt, alternately all failed and all succeeded."""
        ids = []
        for n in range(count):
            request = sample_request_submit(persona=persona_factory(), count=1, enqueue=False).request
            state = AssignmentState.FAILED if n % 2 else AssignmentState.SUCCEEDED
            Assignment.objects.filter(request=request).update(state=state, error="lost" if n % 2 else "")
            ids.append(request.pk)
        SampleRequest.objects.filter(pk__in=ids).update(created=timezone.now() - timedelta(minutes=1))
        return ids

    queries = []
    for count in (2, 8):
        ids = orphans(count)
        with CaptureQueriesContext(connection) as captured:
            report = assignments_recover()
        assert sorted(report.repaired_requests) == ids
        states = dict(SampleRequest.objects.filter(pk__in=ids).values_list("pk", "state"))
        assert [states[pk] for pk in ids] == [RequestState.SUCCEEDED, RequestState.FAILED] * (count // 2)
        queries.append(len(captured.captured_queries))
    assert queries[0] == queries[1], queries


def test_the_heartbeat_never_stops_a_job_it_did_not_find_abandoned(persona, three_gpus):
    context = WorkerContext(device=three_gpus[0], name="w", host="h", generator=None)
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    first, second = Assignment.objects.filter(request=request).order_by("first_index")
    with context.running(first, report=False):
        pass
    with context.running(second, report=False):
        context.mark_lost(first.pk, AssignmentState.ABANDONED)  # a late verdict about the job that already ended
        assert context.alive()
        context.mark_lost(second.pk, AssignmentState.ABANDONED)
        assert not context.alive()


def test_a_device_out_of_service_for_heat_returns_only_well_below_the_limit(device_factory):
    from gpuscheduler.backends import Reading
    from gpuscheduler.services import device_observe

    hot = device_factory("H100", health=Health.UNHEALTHY)
    limit = settings.GPUSCHEDULER["MAX_TEMPERATURE"]
    reading = Reading(uuid=hot.uuid, ok=True, memory_used=0, memory_total=80 * 1024**3, temperature=limit - 2)
    assert device_observe(device=hot, reading=reading) == Health.UNHEALTHY
    cool = Reading(uuid=hot.uuid, ok=True, memory_used=0, memory_total=80 * 1024**3, temperature=limit - 10)
    assert device_observe(device=hot, reading=cool) == Health.PROBATION


def test_memory_held_by_the_devices_own_worker_counts_as_free(device_factory, settings):
    from gpuscheduler.backends import Reading
    from gpuscheduler.services import reading_admission

    gib = 1024**3
    device = device_factory("T4", worker=True, worker_pid=4242)
    full = Reading(uuid=device.uuid, ok=True, memory_used=15.5 * gib, memory_total=16 * gib, temperature=50.0)
    assert not reading_admission(full, device).ok, "another program's memory blocks it"
    own = Reading(
        uuid=device.uuid,
        ok=True,
        memory_used=15.5 * gib,
        memory_total=16 * gib,
        temperature=50.0,
        process_memory=((4242, 12 * gib),),
    )
    assert reading_admission(own, device).ok, "its own worker's pipeline does not"


def test_compaction_of_a_long_backlog_is_spread_over_calls(device_factory, django_assert_max_num_queries):
    devices = [device_factory("H100") for _ in range(3)]
    start = (timezone.now() - timedelta(hours=5)).replace(second=0, microsecond=0)  # on a bucket edge
    Snapshot.objects.bulk_create(
        Snapshot(device=d, taken_at=start + timedelta(seconds=5 * i), utilization=50.0, health="healthy")
        for d in devices
        for i in range(600)  # 50 minutes each, all older than the raw window
    )
    # Bounded by max_batches, not by the backlog (18: each batch also takes its device's fold lock on PostgreSQL).
    with django_assert_max_num_queries(18):
        folded, _ = snapshots_compact(batch=200, max_batches=2)
    assert 0 < folded <= 400
    total = 0
    while True:
        folded, _ = snapshots_compact(batch=200, max_batches=2)
        if not folded:
            break
        total += folded
    assert not Snapshot.objects.filter(bucket_seconds=0).exists()
    assert Snapshot.objects.filter(bucket_seconds=60).count() == 3 * 50


def test_one_process_per_interval_reconciles_and_the_next_after_it(persona, three_gpus, redis_db):
    request = sample_request_submit(persona=persona, count=1).request
    redis_db.flushdb()  # the job is lost; recovery puts it back once it is someone's turn
    earlier = timezone.now() - timedelta(seconds=30)
    Assignment.objects.filter(request=request).update(queued_at=earlier, enqueued_at=earlier)

    first, second = assignments_recover_in_turn(), assignments_recover_in_turn()

    assert first is not None and len(first.requeued) == 1
    assert second is None, "another process reconciled a moment ago"
    redis_db.delete("gpuscheduler:turn:recover")  # the interval has passed
    assert assignments_recover_in_turn() is not None
