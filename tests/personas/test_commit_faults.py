"""Faults around an attempt's commit: the database, not a local exception, decides which files live."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from rq.timeouts import JobTimeoutException

import config.storage
from gpuscheduler import assignments
from gpuscheduler.assignments import assignment_claim
from gpuscheduler.heartbeat import Heartbeat, WorkerContext
from gpuscheduler.models import Assignment, AssignmentState
from personas.attempts import StorageFault, sample_assignment_run, sample_images_commit
from personas.imagegen import GenerationResult, placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_images_delete, sample_request_submit
from tests.media import stored_bytes, stored_names

# on_commit hooks run, and other connections see the rows: as in a worker.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


@pytest.fixture
def queued(persona, gpu) -> SampleRequest:
    return sample_request_submit(persona=persona, count=2, device=gpu, enqueue=False).request


@pytest.fixture
def running(queued, gpu):
    """A request of two images, its only attempt claimed by a worker."""
    (attempt,) = queued.assignments.all()
    claimed = assignment_claim(assignment_id=attempt.pk, device=gpu, worker_name="w1", host="testhost", timeout=60)
    assert claimed is not None
    return queued, claimed, gpu


def commit(request, assignment, device) -> bool:
    images = [placeholder_image(request.seed_for(i)) for i in range(assignment.image_count)]
    return sample_images_commit(
        assignment=assignment, request=request, images=images, device=device, calls=1, peak_memory=None
    )


def media_files(settings) -> list[str]:
    """Every file in the samples storage, by name (.part files included)."""
    return stored_names()


def assert_every_row_has_its_file(settings, request: SampleRequest, count: int) -> None:
    rows = list(SampleImage.objects.filter(request=request).order_by("index"))
    assert [r.index for r in rows] == list(range(count))
    assert media_files(settings) == sorted(name for r in rows for name in (r.image.name, r.thumbnail))
    for row in rows:
        assert stored_bytes(row.image.name) == placeholder_image(request.seed_for(row.index)).png


def fail_after_commit(monkeypatch, exc: BaseException) -> None:
    """The attempt's COMMIT is applied, then `exc` reaches the worker: a reply lost on the
    network, or rq's SIGALRM landing between the COMMIT and the end of the block."""
    real = assignments.assignment_succeed

    def succeed_then_fail(**kwargs: Any) -> bool:
        won = real(**kwargs)

        def raise_it() -> None:
            raise exc

        transaction.on_commit(raise_it)
        return won

    monkeypatch.setattr(assignments, "assignment_succeed", succeed_then_fail)


# --- 1. an ambiguous commit -----------------------------------------------------------------------


def test_a_commit_whose_reply_never_arrives_keeps_the_committed_images(running, settings, monkeypatch):
    request, assignment, device = running
    fail_after_commit(monkeypatch, OperationalError("server closed the connection unexpectedly"))

    assert commit(request, assignment, device) is True

    assert_every_row_has_its_file(settings, request, 2)
    assert Assignment.objects.get(pk=assignment.pk).state == AssignmentState.SUCCEEDED
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED


def test_a_job_timeout_that_lands_after_the_commit_keeps_the_committed_images(running, settings, monkeypatch):
    request, assignment, device = running
    fail_after_commit(monkeypatch, JobTimeoutException("Task exceeded maximum timeout value (600 seconds)"))

    assert commit(request, assignment, device) is True

    assert_every_row_has_its_file(settings, request, 2)


def test_a_commit_that_never_reached_the_database_is_made_again(running, settings, monkeypatch):
    request, assignment, device = running
    real = assignments.assignment_succeed
    calls: list[int] = []

    def connection_lost_once(**kwargs: Any) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("terminating connection due to administrator command")
        return real(**kwargs)

    monkeypatch.setattr(assignments, "assignment_succeed", connection_lost_once)
    monkeypatch.setattr("personas.commit.time.sleep", lambda seconds: None)

    assert commit(request, assignment, device) is True

    assert len(calls) == 2
    assert_every_row_has_its_file(settings, request, 2)


def test_a_commit_that_is_refused_for_good_removes_its_files_and_says_why(running, settings):
    request, assignment, device = running
    # Another attempt already stored image 1: the unique (request, index) constraint refuses ours.
    SampleImage.objects.create(
        persona=request.persona, request=request, index=1, image="elsewhere.png", seed=1, prompt="p", model="m"
    )

    with pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"):
        commit(request, assignment, device)

    assert media_files(settings) == []
    assert Assignment.objects.get(pk=assignment.pk).state == AssignmentState.RUNNING, "rolled back with the rows"


# --- 4. a connection that died during the call --------------------------------------------------


class OneCallGenerator:
    """Makes the images at once, after doing `during` (what happens while a real call runs)."""

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.during = during

    def generate(self, *, seeds: list[int], **kwargs: Any) -> GenerationResult:
        self.during()
        return GenerationResult(images=[placeholder_image(seed) for seed in seeds], calls=1)

    def free_memory(self) -> None:
        pass


def kill_this_connection() -> None:
    """What an idle-connection timeout, a pooler reset or a failover does to a worker's session."""
    import psycopg

    pid = connection.connection.info.backend_pid
    settings_dict = connection.settings_dict
    with psycopg.connect(
        host=settings_dict["HOST"] or "127.0.0.1",
        port=settings_dict["PORT"] or 5432,
        user=settings_dict["USER"],
        dbname=settings_dict["NAME"],
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_a_connection_killed_during_the_call_does_not_throw_the_images_away(queued, gpu, settings):
    if connection.vendor != "postgresql":
        pytest.skip("a server-side connection kill needs PostgreSQL (SQLite has no server)")
    (attempt,) = queued.assignments.all()
    context = WorkerContext(device=gpu, name="w1", host="testhost", generator=OneCallGenerator(kill_this_connection))

    result = sample_assignment_run(assignment_id=attempt.pk, context=context)

    assert result["committed"] is True
    assert_every_row_has_its_file(settings, queued, 2)
    assert Assignment.objects.get(pk=attempt.pk).state == AssignmentState.SUCCEEDED


# --- 2. storage faults --------------------------------------------------------------------------


def disk_full_on_second_file(monkeypatch) -> list[str]:
    """The folder storage's write of the second file fills the disk halfway through."""
    real = config.storage._write_part
    writes: list[str] = []

    def write(path: Path, chunks: Iterable[bytes]) -> None:
        writes.append(path.name)
        data = b"".join(chunks)
        if len(writes) == 2:
            real(path, [data[:10]])  # half a file, then the disk is full
            raise OSError(28, "No space left on device", str(path))
        real(path, [data])

    monkeypatch.setattr(config.storage, "_write_part", write)
    return writes


def test_a_full_disk_leaves_no_partial_file_and_names_the_file(running, settings, monkeypatch):
    request, assignment, device = running
    writes = disk_full_on_second_file(monkeypatch)

    with pytest.raises(
        # The second file written is the first image's thumbnail, stored right after its PNG.
        StorageFault,
        match=rf"^No space left on device: media/samples/persona-{request.persona_id}/r{request.pk}-i0-a\d+"
        r"\.thumb\.webp",
    ):
        commit(request, assignment, device)

    assert len(writes) == 2 and writes[0].endswith(".png.part") and writes[1].endswith(".thumb.webp.part")
    assert media_files(settings) == [], "neither the first PNG nor its thumbnail's .part file stays behind"
    assert SampleImage.objects.count() == 0


def test_a_storage_fault_puts_the_chunk_back_to_waiting_with_the_real_error(queued, gpu, settings, monkeypatch):
    from gpuscheduler.storage import store_admits

    disk_full_on_second_file(monkeypatch)
    (attempt,) = queued.assignments.all()
    context = WorkerContext(device=gpu, name="w1", host="testhost", generator=OneCallGenerator())

    result = sample_assignment_run(assignment_id=attempt.pk, context=context)

    assert "No space left on device" in str(result["storage_error"])
    waiting = Assignment.objects.get(pk=attempt.pk)
    assert (waiting.state, waiting.attempt, waiting.device_id) == (AssignmentState.QUEUED, 1, None)
    assert f"No space left on device: media/samples/persona-{queued.persona_id}/" in waiting.error
    assert queued.assignments.count() == 1, "no attempt was used up"
    assert SampleRequest.objects.get(pk=queued.pk).is_active
    admitted, why = store_admits(host="testhost")
    assert not admitted and "No space left on device" in why
    assert media_files(settings) == []


# --- 5. deletion ----------------------------------------------------------------------------------


def test_a_deletion_that_rolls_back_keeps_the_files(running, settings):
    request, assignment, device = running
    assert commit(request, assignment, device) is True
    images = list(SampleImage.objects.filter(request=request))

    with pytest.raises(RuntimeError), transaction.atomic():  # the admin's own transaction
        sample_images_delete(images=images)
        raise RuntimeError("a later step of the admin's delete failed")

    assert_every_row_has_its_file(settings, request, 2)

    with transaction.atomic():
        sample_images_delete(images=images)
    assert SampleImage.objects.count() == 0
    assert media_files(settings) == []


# --- 8. only true alarms ------------------------------------------------------------------------


def test_the_heartbeat_raises_no_alarm_for_an_attempt_that_has_just_committed(running, caplog):
    _request, assignment, device = running
    context = WorkerContext(device=device, name="w1", host="testhost", generator=None)
    heartbeat = Heartbeat(context, 1.0)
    with context.running(assignment, report=False):
        # The commit lands between the heartbeat reading the current attempt and renewing it.
        Assignment.objects.filter(pk=assignment.pk).update(state=AssignmentState.SUCCEEDED)
        with caplog.at_level(logging.WARNING, logger="gpuscheduler.heartbeat"):
            heartbeat.beat()
        assert context.alive(), "a committed attempt is not stopped"
    assert not [r for r in caplog.records if "stopping its work" in r.getMessage()]


def test_the_heartbeat_stops_an_attempt_the_reconciler_abandoned(running, caplog):
    _request, assignment, device = running
    context = WorkerContext(device=device, name="w1", host="testhost", generator=None)
    with context.running(assignment, report=False):
        Assignment.objects.filter(pk=assignment.pk).update(state=AssignmentState.ABANDONED)
        with caplog.at_level(logging.WARNING, logger="gpuscheduler.heartbeat"):
            Heartbeat(context, 1.0).beat()
        assert not context.alive()
    assert [r for r in caplog.records if "is abandoned in the database; stopping its work" in r.getMessage()]


# --- 4. the --wait loop -----------------------------------------------------------------------------


def test_the_wait_loop_outlives_a_killed_database_connection(queued, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("a server-side connection kill needs PostgreSQL (SQLite has no server)")
    from personas import runner

    SampleRequest.objects.filter(pk=queued.pk).count()  # the loop's connection is open
    killed: list[bool] = []

    def meanwhile(seconds: float) -> None:
        # Between two polls the session is killed; at the next pause the request ends.
        if not killed:
            kill_this_connection()
            killed.append(True)
        else:
            SampleRequest.objects.filter(pk=queued.pk).update(state=RequestState.CANCELLED)

    monkeypatch.setattr(runner.time, "sleep", meanwhile)
    stderr = io.StringIO()

    report = runner.requests_wait([queued], timeout=30, stderr=stderr, poll=0.01)

    assert killed
    assert report.finished and not report.timed_out
