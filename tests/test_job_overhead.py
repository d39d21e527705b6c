"""What one job costs a worker (bench/bench_overhead.py measures it): queries per batched call, one
transaction for a call's commits, fsyncs per call, device readings per pop, curve refits per call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext

import config.storage
from config.storage import SaveError, samples_storage
from gpuscheduler import assignments, costs
from gpuscheduler.batching import attempt_claim, call_size
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, Health, PipelineCall
from gpuscheduler.worker import GpuWorker
from gpuscheduler.workloads import default_key_and_steps
from personas.attempts import sample_assignment_run
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_requests_refresh
from tests.conftest import learned_curve
from tests.gpuscheduler.test_batching_claims import H100, chunk
from tests.media import files_of, stored_names
from tests.test_batching import Generator, assert_made_as_asked, reloaded

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def h100(device_factory):
    device = device_factory("H100", worker=True)
    learned_curve(device, **H100)
    return device


def call_queries(device, persona_factory, size: int) -> list[str]:
    """The statements of one worker job that makes `size` one-image requests in one call."""
    learned_curve(device, **H100)  # best at 7 again: the previous call's timing was learned
    attempts = [chunk(persona_factory(), 1, device) for _ in range(size)]
    context = WorkerContext(device=device, name="w1", host="testhost", generator=Generator())
    with CaptureQueriesContext(connection) as queries:
        result = sample_assignment_run(assignment_id=attempts[0].pk, context=context)
    assert result["batch"] == [a.pk for a in attempts], "one call for all of them"
    assert {a.state for a in reloaded(*attempts)} == {AssignmentState.SUCCEEDED}
    return [q["sql"] for q in queries.captured_queries]


# --- the database ---------------------------------------------------------------------------------------


def test_a_batched_call_costs_a_fixed_number_of_queries_and_one_update_per_attempt(h100, persona_factory, redis_db):
    two = call_queries(h100, persona_factory, 2)
    six = call_queries(h100, persona_factory, 6)

    # Each attempt's own conditional RUNNING -> SUCCEEDED claim; claims, rows, requests: one each.
    assert len(six) - len(two) == 4, "\n".join(six)
    assert len(six) <= 25, "\n".join(six)
    claims = [q for q in six if q.startswith('UPDATE "gpuscheduler_assignment"') and "'succeeded'" in q]
    assert len(claims) == 6
    assert sum(q.startswith('INSERT INTO "personas_sampleimage"') for q in six) == 1
    assert sum(q.startswith('UPDATE "personas_samplerequest"') for q in six) == 2, "started, then succeeded"
    # One transaction for the call's commits.
    assert sum(q.startswith(("BEGIN", "SAVEPOINT")) for q in six) <= 1


def test_the_commits_of_a_call_made_once_a_lost_reply_hides_them_keep_every_image(
    h100, persona_factory, redis_db, monkeypatch
):
    attempts = [chunk(persona_factory(), 1, h100) for _ in range(3)]
    real = assignments.assignment_succeed
    raised: list[bool] = []

    def reply_lost(**kwargs: Any) -> bool:
        won = real(**kwargs)
        if not raised:
            raised.append(True)

            def cut() -> None:
                raise OperationalError("server closed the connection unexpectedly")

            transaction.on_commit(cut)
        return won

    monkeypatch.setattr(assignments, "assignment_succeed", reply_lost)
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=Generator())

    result = sample_assignment_run(assignment_id=attempts[0].pk, context=context)

    assert result["committed"] is True
    for attempt in reloaded(*attempts):
        assert attempt.state == AssignmentState.SUCCEEDED
        assert_made_as_asked(attempt)
    assert {r.state for r in SampleRequest.objects.all()} == {RequestState.SUCCEEDED}
    assert stored_names() == files_of(SampleImage.objects.all())


def test_an_attempt_the_database_refuses_fails_alone_and_the_others_of_its_call_commit(h100, persona_factory, redis_db):
    first, refused, third = (chunk(persona_factory(), 1, h100) for _ in range(3))
    # Another attempt already stored the second request's image: the unique (request, index) refuses it.
    request = SampleRequest.objects.get(pk=refused.request_id)
    SampleImage.objects.create(
        persona=request.persona, request=request, index=0, image="elsewhere.png", seed=1, prompt="p", model="m"
    )
    context = WorkerContext(device=h100, name="w1", host="testhost", generator=Generator())

    with pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"):
        sample_assignment_run(assignment_id=first.pk, context=context)

    first, refused, third = reloaded(first, refused, third)
    assert (first.state, third.state) == (AssignmentState.SUCCEEDED, AssignmentState.SUCCEEDED)
    assert refused.state == AssignmentState.RETRIED
    assert_made_as_asked(first)
    assert_made_as_asked(third)
    assert not [name for name in stored_names() if name.endswith(f"-a{refused.pk}.png")]


def test_a_popped_first_attempt_is_claimed_with_one_update_and_one_read(h100, persona_factory, redis_db):
    attempt = chunk(persona_factory(), 2, h100)
    with CaptureQueriesContext(connection) as queries:
        claimed = attempt_claim(assignment_id=attempt.pk, device=h100, worker_name="w1", host="testhost", timeout=60)
    assert claimed is not None and claimed.pk == attempt.pk
    assert (claimed.state, claimed.device_id, claimed.worker_name) == (AssignmentState.RUNNING, h100.pk, "w1")
    assert len(queries.captured_queries) == 2
    again = attempt_claim(assignment_id=attempt.pk, device=h100, worker_name="w2", host="testhost", timeout=60)
    assert again is None, "claimed once"


def test_a_popped_retry_that_failed_on_this_device_is_left_for_another(h100, device_factory, persona_factory, redis_db):
    device_factory("A100", worker=True)
    retry = chunk(persona_factory(), 2, h100, avoid=h100)
    claimed = attempt_claim(assignment_id=retry.pk, device=h100, worker_name="w1", host="testhost", timeout=60)
    assert claimed is None
    assert Assignment.objects.get(pk=retry.pk).state == AssignmentState.QUEUED


def test_requests_are_refreshed_together_and_a_whole_request_committed_needs_no_read(persona_factory, h100):
    one, other = (chunk(persona_factory(), 1, h100) for _ in range(2))
    Assignment.objects.filter(pk__in=[one.pk, other.pk]).update(state=AssignmentState.SUCCEEDED)

    with CaptureQueriesContext(connection) as queries:
        sample_requests_refresh(request_ids=[one.request_id], complete=[one.request_id])
    assert len(queries.captured_queries) == 1
    with CaptureQueriesContext(connection) as queries:
        sample_requests_refresh(request_ids=[other.request_id])
    assert len(queries.captured_queries) == 3
    for request in SampleRequest.objects.all():
        assert request.state == RequestState.SUCCEEDED
        assert request.started_at is not None and request.finished_at is not None


# --- the files ------------------------------------------------------------------------------------------


def record_disk(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync and rename of the folder storage, in order (fsyncs run in threads: their order
    among themselves is not fixed, but each comes before what waits for it)."""
    events: list[tuple[str, str]] = []
    fsync, replace = config.storage._fsync, config.storage.os.replace

    def fsynced(path: Path) -> None:
        fsync(path)
        events.append(("fsync", path.name))

    def renamed(source: Any, target: Any) -> None:
        events.append(("rename", Path(source).name))
        replace(source, target)

    monkeypatch.setattr(config.storage, "_fsync", fsynced)
    monkeypatch.setattr(config.storage.os, "replace", renamed)
    return events


FILES = [
    ("samples/persona-1/r1-i0-a1.png", b"\x89PNG 1"),
    ("samples/persona-1/r1-i1-a1.png", b"\x89PNG 2"),
    ("samples/persona-2/r2-i0-a2.png", b"\x89PNG 3"),
]


def test_a_call_s_files_are_fsynced_before_their_renames_and_each_folder_once_after(monkeypatch):
    events = record_disk(monkeypatch)

    names = config.storage.storage_save_all(samples_storage(), FILES)

    assert names == [name for name, _ in FILES]
    assert stored_names() == names
    renames = [i for i, (what, _) in enumerate(events) if what == "rename"]
    for name, _ in FILES:
        part = Path(name).name + ".part"
        assert events.index(("fsync", part)) < events.index(("rename", part)), "durable before it is visible"
    folders = [name for what, name in events[renames[-1] + 1 :] if what == "fsync"]
    assert sorted(folders) == ["persona-1", "persona-2"], "each folder once, after its renames"
    assert len(events) == 3 + 3 + 2


def test_a_refused_file_keeps_the_files_before_it_and_nothing_of_it_or_after(monkeypatch):
    real = config.storage._write_part
    writes: list[str] = []

    def second_fills_the_disk(path: Path, chunks: Any) -> None:
        writes.append(path.name)
        real(path, chunks)
        if len(writes) == 2:
            raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(config.storage, "_write_part", second_fills_the_disk)

    with pytest.raises(SaveError, match=r"No space left on device: samples/persona-1/r1-i1-a1\.png") as raised:
        config.storage.storage_save_all(samples_storage(), FILES)

    assert raised.value.saved == [FILES[0][0]]
    assert stored_names() == [FILES[0][0]], "no .part file, no later file"


# --- the curve and the call size ----------------------------------------------------------------------


def test_a_curve_is_refitted_at_every_call_at_first_then_less_often_as_it_rests_on_more():
    assert costs.refit_due(rested=5, since=1)
    assert costs.refit_due(rested=19, since=1), "still eager"
    assert not costs.refit_due(rested=40, since=9)
    assert costs.refit_due(rested=40, since=10)
    assert not costs.refit_due(rested=costs.FIT_WINDOW, since=24)
    assert costs.refit_due(rested=costs.FIT_WINDOW, since=25)


def test_a_call_that_is_not_due_for_a_refit_is_one_insert(h100):
    model, steps = default_key_and_steps()
    timing = costs.Timing(images=4, seconds=1.0, width=64, height=64)
    for _ in range(costs.EAGER_CALLS + 1):
        costs.call_record(device=h100, model=model, steps=steps, timing=timing)
    with CaptureQueriesContext(connection) as queries:
        costs.call_record(device=h100, model=model, steps=steps, timing=timing)
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["INSERT"], "no COUNT of the history"
    assert PipelineCall.objects.filter(device=h100).count() == costs.EAGER_CALLS + 2


def test_the_worker_s_own_cost_of_a_call_fills_the_calls_of_a_near_free_model(h100, device_factory):
    model, steps = default_key_and_steps()
    free = device_factory("H100", worker=True)
    learned_curve(free, per_image=0.001)  # a millisecond an image: the zero-second simulated model
    assert call_size(device=free, model=model, steps=steps) == 1, "by the pipeline call alone, no gain"
    assert call_size(device=free, model=model, steps=steps, overhead=0.04) >= 12
    assert call_size(device=h100, model=model, steps=steps, overhead=0.04) == 7, "a second-long call: no change"


# --- admission ------------------------------------------------------------------------------------------


@pytest.fixture
def worker(h100, redis_db):
    return GpuWorker(WorkerContext(device=h100, name="w", host="testhost", generator=None), connection=redis_db)


def test_a_busy_worker_pops_again_without_reading_its_device_for_half_a_second(worker):
    assert worker.housekeeping()
    with CaptureQueriesContext(connection) as queries:
        assert worker.housekeeping()
    assert not queries.captured_queries, "admitted a moment ago"

    worker.context.admission_expire()  # what a storage fault of its own does
    with CaptureQueriesContext(connection) as queries:
        assert worker.housekeeping()
    assert queries.captured_queries, "read again"


def test_a_worker_that_is_not_admitted_reads_its_device_at_every_turn(worker, h100):
    type(h100).objects.filter(pk=h100.pk).update(health=Health.UNHEALTHY, health_reason="lost")
    assert not worker.housekeeping()
    with CaptureQueriesContext(connection) as queries:
        assert not worker.housekeeping()
    assert queries.captured_queries
