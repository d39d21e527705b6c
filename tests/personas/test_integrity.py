"""verify_samples and the orphan sweep: committed images without a good file, files without a row."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from gpuscheduler import queues
from gpuscheduler.models import Assignment, AssignmentState, Health
from personas import integrity
from personas.imagegen import placeholder_image
from personas.integrity import samples_sweep, samples_verify
from personas.models import RequestState, SampleImage, SampleRequest
from personas.repair import samples_repair
from personas.services import sample_image_path, sample_request_refresh, sample_request_submit
from personas.thumbnails import thumbnail_name
from tests.media import local_path, media_root, store

HOUR_AGO = time.time() - 3600


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


def aged(path: Path) -> Path:
    """Make a file look written an hour ago: older than the grace."""
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def write(settings, name: str, data: bytes) -> Path:
    """A file put in the samples storage an hour ago; its local path (these tests age files in place)."""
    assert store(name, data) == name
    return aged(local_path(name))


def made(persona, settings, count: int = 4, *, thumbnails: bool = True) -> SampleRequest:
    """A request whose attempts all succeeded: a PNG file, its thumbnail and a row per image, as a
    worker leaves them (without thumbnails: as a worker left them before thumbnails existed)."""
    request = sample_request_submit(persona=persona, count=count, enqueue=False).request
    for attempt in request.assignments.all():
        Assignment.objects.filter(pk=attempt.pk).update(state=AssignmentState.SUCCEEDED, device=attempt.planned_device)
        for index in attempt.indexes:
            name = image_name(request, index, attempt.pk)
            picture = placeholder_image(request.seed_for(index))
            write(settings, name, picture.png)
            if thumbnails:
                write(settings, thumbnail_name(name), picture.thumbnail)
            SampleImage.objects.create(
                thumbnail=thumbnail_name(name) if thumbnails else "",
                persona=persona,
                request=request,
                assignment=attempt,
                index=index,
                image=name,
                seed=request.seed_for(index),
                prompt=persona.appearance_prompt,
                model=request.model,
                device=attempt.planned_device,
            )
    sample_request_refresh(request_id=request.pk)
    request.refresh_from_db()
    assert request.state == RequestState.SUCCEEDED
    return request


def image_name(request: SampleRequest, index: int, attempt_id: int) -> str:
    return sample_image_path(
        persona_id=request.persona_id, request_id=request.pk, index=index, assignment_id=attempt_id
    )


def attempt_file(settings, persona, state: str, *, suffix: str = "") -> tuple[Path, Assignment]:
    """The file an attempt of a one-image request in `state` wrote (and never committed)."""
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    (attempt,) = request.assignments.all()
    Assignment.objects.filter(pk=attempt.pk).update(state=state)
    sample_request_refresh(request_id=request.pk)
    path = write(settings, image_name(request, 0, attempt.pk) + suffix, placeholder_image(1).png)
    return path, attempt


def path_of(image: SampleImage, settings) -> Path:
    return local_path(image.image.name)


# --- verifying ---------------------------------------------------------------------------------------


def test_a_store_where_every_row_has_its_good_file_has_no_problems(persona, gpu, settings):
    made(persona, settings, 4)

    report = samples_verify()

    assert (report.images_checked, report.files_checked) == (4, 8)  # each PNG and its thumbnail
    assert report.thumbnails_missing == 0
    assert report.broken == report.orphans == report.unknown == []
    assert report.problems_left == 0


def test_a_committed_image_whose_file_is_gone_is_reported_with_persona_request_index_and_seed(persona, gpu, settings):
    request = made(persona, settings, 3)
    lost = SampleImage.objects.get(request=request, index=1)
    path_of(lost, settings).unlink()

    report = samples_verify()

    (broken,) = report.broken
    assert (broken.image, broken.persona, broken.request, broken.index, broken.seed) == (
        lost.pk,
        "ada-lovelace",
        request.pk,
        1,
        request.seed_for(1),
    )
    assert (broken.path, broken.problem, broken.host) == (lost.image.name, "missing", gpu.host)
    assert report.orphans == [] and report.problems_left == 1


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda png: b"", "empty file"),
        (lambda png: b"GIF89a" + png[6:], "not a PNG file"),
        (lambda png: png[: len(png) // 2], "damaged PNG"),
        (lambda png: png[:33] + bytes(len(png) - 33), "damaged PNG"),
    ],
    ids=["empty", "not-png", "truncated", "zeroed"],
)
def test_an_unreadable_file_is_reported_with_what_is_wrong(persona, gpu, settings, damage, detail):
    request = made(persona, settings, 2)
    image = SampleImage.objects.get(request=request, index=0)
    path = path_of(image, settings)
    path.write_bytes(damage(path.read_bytes()))
    aged(path)

    (broken,) = samples_verify().broken

    assert (broken.image, broken.problem) == (image.pk, "unreadable")
    assert broken.detail.startswith(detail), broken.detail
    assert samples_verify(check_contents=False).broken == [], "the cheap pass only checks that files exist"


@pytest.mark.parametrize(
    "state",
    [AssignmentState.ABANDONED, AssignmentState.FAILED, AssignmentState.RETRIED, AssignmentState.CANCELLED],
)
def test_the_file_of_an_attempt_that_ended_without_success_is_an_orphan_and_repair_removes_it(
    persona, gpu, settings, state
):
    path, attempt = attempt_file(settings, persona, state)
    part, _ = attempt_file(settings, persona, state, suffix=".part")

    report = samples_repair()

    assert sorted(o.path for o in report.orphans) == sorted(report.removed)
    assert {o.reason for o in report.orphans} >= {f"attempt {attempt.pk} is {state}"}
    assert not path.exists() and not part.exists()
    assert report.problems_left == 0


@pytest.mark.parametrize("state", [AssignmentState.RUNNING, AssignmentState.QUEUED])
def test_the_files_of_an_attempt_in_progress_are_kept(persona, gpu, settings, state):
    path, _ = attempt_file(settings, persona, state)
    part = path.with_name(path.name + ".part")
    part.write_bytes(b"half a png")
    aged(part)

    report = samples_repair()

    assert report.orphans == [] and report.in_progress == 2
    assert path.exists() and part.exists()


def test_the_file_of_a_succeeded_attempt_whose_row_was_deleted_is_an_orphan(persona, gpu, settings):
    request = made(persona, settings, 2)
    gone = SampleImage.objects.get(request=request, index=1)
    kept = SampleImage.objects.get(request=request, index=0)
    SampleImage.objects.filter(pk=gone.pk).delete()  # and the removal of its file never happened

    report = samples_repair()

    # The PNG and its thumbnail: the row named both.
    assert sorted(orphan.path for orphan in report.orphans) == [gone.image.name, gone.thumbnail]
    for orphan in report.orphans:
        assert orphan.reason == f"attempt {gone.assignment_id} succeeded but no image row names this file"
    assert not path_of(gone, settings).exists()
    assert not (media_root() / gone.thumbnail).exists()
    assert path_of(kept, settings).exists(), "the committed image of the same attempt stays"


def test_the_file_of_an_attempt_that_no_longer_exists_is_an_orphan(persona, gpu, settings):
    path, attempt = attempt_file(settings, persona, AssignmentState.FAILED)
    SampleRequest.objects.filter(pk=attempt.request_id).delete()  # takes its attempts with it
    attempt_file(settings, persona, AssignmentState.RUNNING)  # a newer attempt exists

    (orphan,) = samples_repair().orphans

    assert orphan.reason == f"attempt {attempt.pk} no longer exists"
    assert not path.exists()


def test_a_file_naming_an_attempt_newer_than_the_database_is_never_removed(persona, gpu, settings):
    # A wrong DATABASE_URL (or a restore from an older backup) must not empty the media folder.
    path, attempt = attempt_file(settings, persona, AssignmentState.FAILED)
    newer = write(settings, f"samples/persona-{persona.pk}/r1-i0-a{attempt.pk + 1}.png", b"png")

    report = samples_repair()

    assert [o.path for o in report.orphans] == [f"samples/persona-{persona.pk}/{path.name}"]
    (unknown,) = report.unknown
    assert unknown.reason == f"names attempt {attempt.pk + 1}, newer than any in this database"
    assert newer.exists() and not path.exists()


def test_a_file_whose_ids_disagree_with_its_attempt_is_left_alone(persona_factory, gpu, settings):
    owner, other = persona_factory(), persona_factory()
    path, _ = attempt_file(settings, owner, AssignmentState.FAILED)
    wrong_persona = write(settings, f"samples/persona-{other.pk}/{path.name}", b"png")
    wrong_index = write(settings, str(path.relative_to(media_root())).replace("-i0-", "-i5-"), b"png")

    report = samples_repair()

    assert sorted(u.path for u in report.unknown) == sorted(
        str(p.relative_to(media_root())) for p in (wrong_persona, wrong_index)
    )
    assert wrong_persona.exists() and wrong_index.exists()
    assert not path.exists()


def test_names_this_system_does_not_write_are_reported_and_never_touched(persona, gpu, settings):
    made(persona, settings, 1)
    strays = [
        write(settings, "samples/notes.txt", b"x"),
        write(settings, f"samples/persona-{persona.pk}/portrait.png", b"x"),
        write(settings, f"samples/persona-{persona.pk}/deeper/r1-i0-a1.png", b"x"),
        write(settings, "samples/persona-x/r1-i0-a1.png", b"x"),
    ]

    report = samples_repair()

    assert sorted(u.path for u in report.unknown) == sorted(str(p.relative_to(media_root())) for p in strays)
    assert all(p.exists() for p in strays)
    assert report.problems_left == 4, "a file nobody accounts for needs a person"


def test_an_attempt_that_commits_while_the_store_is_read_keeps_its_files(persona, gpu, settings, monkeypatch):
    # Its files were written long ago (the commit waited out a database failover): only the order
    # of the reads (attempts, then rows) keeps them.
    path, attempt = attempt_file(settings, persona, AssignmentState.RUNNING)
    name = str(path.relative_to(media_root()))
    listing = integrity._walk

    def walk_while_the_worker_commits(folder):
        yield from listing(folder)
        if folder != "samples":
            return  # the listing recurses through this function
        Assignment.objects.filter(pk=attempt.pk).update(state=AssignmentState.SUCCEEDED)
        SampleImage.objects.create(
            persona=persona, request_id=attempt.request_id, assignment=attempt, index=0, image=name, seed=1, prompt="p"
        )

    monkeypatch.setattr(integrity, "_walk", walk_while_the_worker_commits)

    report = samples_repair()

    assert report.orphans == [] and path.exists()


def test_files_changed_within_the_grace_are_never_judged(persona, gpu, settings):
    path, _ = attempt_file(settings, persona, AssignmentState.ABANDONED)
    os.utime(path)  # written just now: its writer may still be about to commit

    report = samples_repair()

    assert report.orphans == [] and report.recent == 1
    assert path.exists()
    assert samples_repair(grace_seconds=0).removed == [str(path.relative_to(media_root()))]


def test_a_row_naming_a_path_outside_the_media_folder_is_reported_and_nothing_there_is_touched(
    persona, gpu, settings, tmp_path, repair, redis_db
):
    request = made(persona, settings, 1)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    SampleImage.objects.filter(request=request).update(image="../../outside.png")

    (broken,) = samples_verify().broken

    assert (broken.problem, broken.detail) == ("unreadable", "the name points outside the media folder")
    (requeued,) = repair().requeued  # a proper image, under a proper name, replaces it
    assert requeued.indexes == [0]
    assert outside.read_bytes() == b"not ours"


# --- repairing ---------------------------------------------------------------------------------------


@pytest.fixture
def repair(django_capture_on_commit_callbacks):
    """samples_repair, with what it does once its transactions commit (enqueue, remove files) done."""

    def run(**options):
        with django_capture_on_commit_callbacks(execute=True):
            return samples_repair(**options)

    return run


def test_repair_requeues_lost_and_damaged_images_with_the_same_seeds(persona, gpu, settings, redis_db, repair):
    request = made(persona, settings, 4)
    lost, damaged = (SampleImage.objects.get(request=request, index=i) for i in (1, 2))
    first_attempt = lost.assignment_id
    path_of(lost, settings).unlink()
    path_of(damaged, settings).write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    report = repair()

    (requeued,) = report.requeued
    assert (requeued.request, requeued.indexes, requeued.seeds) == (
        request.pk,
        [1, 2],
        [lost.seed, damaged.seed],
    )
    assert report.problems_left == 0
    assert sorted(SampleImage.objects.filter(request=request).values_list("index", flat=True)) == [0, 3]
    assert not path_of(damaged, settings).exists(), "the damaged file goes once the repair commits"
    (attempt,) = Assignment.objects.filter(state=AssignmentState.QUEUED)
    assert (attempt.request_id, attempt.first_index, attempt.image_count) == (request.pk, 1, 2)
    assert attempt.attempt == 1 and attempt.job_id == requeued.jobs[0], "no earlier attempt started at image 1"
    assert attempt.job_id in queues.queue_job_ids(attempt.queue_name, redis_db)
    request.refresh_from_db()
    assert (request.state, request.finished_at, request.error) == (RequestState.QUEUED, None, "")
    assert Assignment.objects.get(pk=first_attempt).state == AssignmentState.SUCCEEDED


def test_a_repaired_chunk_comes_after_every_earlier_attempt_of_that_chunk(persona, gpu, settings, redis_db, repair):
    request = made(persona, settings, 2)
    path_of(SampleImage.objects.get(request=request, index=0), settings).unlink()

    repair()

    repair = Assignment.objects.get(state=AssignmentState.QUEUED)
    assert (repair.first_index, repair.image_count, repair.attempt) == (0, 1, 2)
    # The request's state follows each chunk's latest attempt: now the repair.
    Assignment.objects.filter(pk=repair.pk).update(state=AssignmentState.FAILED, error="boom")
    sample_request_refresh(request_id=request.pk)
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.FAILED


def test_lost_images_are_requeued_in_contiguous_runs_of_at_most_one_batch(persona, gpu, settings, redis_db, repair):
    settings.SAMPLES = {**settings.SAMPLES, "MAX_BATCH": 2}
    request = made(persona, settings, 8)
    for index in (0, 1, 2, 5, 7):
        path_of(SampleImage.objects.get(request=request, index=index), settings).unlink()

    repair()

    queued = Assignment.objects.filter(state=AssignmentState.QUEUED).order_by("first_index")
    assert [(a.first_index, a.image_count) for a in queued] == [(0, 2), (2, 1), (5, 1), (7, 1)]


def test_repair_skips_a_persona_that_has_another_request_active(persona, gpu, settings, redis_db, repair):
    request = made(persona, settings, 2)
    path_of(SampleImage.objects.get(request=request, index=0), settings).unlink()
    active = sample_request_submit(persona=persona, count=1, enqueue=False).request

    report = repair()

    assert report.requeued == [] and report.problems_left == 1
    (reason,) = report.skipped
    assert f"the persona has request {active.pk} queued; run --repair again once it ends" in reason
    assert SampleImage.objects.filter(request=request).count() == 2, "nothing was deleted"


def test_repair_says_so_when_no_device_can_take_work(persona, gpu, settings, redis_db, repair):
    request = made(persona, settings, 2)
    lost = SampleImage.objects.get(request=request, index=0)
    path_of(lost, settings).unlink()
    type(gpu).objects.filter(pk=gpu.pk).update(health=Health.UNHEALTHY, health_reason="too hot")

    report = repair()

    (reason,) = report.skipped
    assert reason.startswith(f"not re-queued (requests {request.pk}): No healthy device can take work now")
    assert SampleImage.objects.filter(pk=lost.pk).exists(), "the row stays until the image can be re-made"
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED
    assert report.problems_left == 1


def test_repair_requeues_nothing_when_most_images_look_lost_unless_forced(persona, gpu, settings, redis_db, repair):
    request = made(persona, settings, 12)
    for image in SampleImage.objects.filter(request=request):
        path_of(image, settings).unlink()  # an unmounted share looks just like this

    held = repair()

    assert held.requeued == [] and "not mounted" in held.skipped[0]
    assert SampleImage.objects.filter(request=request).count() == 12
    forced = repair(force=True)
    assert forced.requeued[0].indexes == list(range(12))


# --- the periodic sweep ------------------------------------------------------------------------------


def test_the_sweep_removes_orphans_and_logs_lost_images_but_requeues_nothing(persona, gpu, settings, caplog):
    request = made(persona, settings, 2)
    lost = SampleImage.objects.get(request=request, index=0)
    path_of(lost, settings).unlink()
    orphan, _ = attempt_file(settings, persona, AssignmentState.ABANDONED)

    with caplog.at_level(logging.ERROR, logger="personas.integrity"):
        report = samples_sweep()

    assert not orphan.exists() and len(report.removed) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"sample image {lost.pk} of ada-lovelace (request {request.pk}, index 0, seed {lost.seed}) is missing: "
        f"{lost.image.name} (no such file); `python manage.py verify_samples --repair` re-makes it"
    ]
    assert not Assignment.objects.filter(state=AssignmentState.QUEUED).exists()
    assert SampleImage.objects.filter(pk=lost.pk).exists()
