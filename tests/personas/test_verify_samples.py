"""The verify_samples command, and the repair and the orphan sweep with real worker and monitor processes."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from config.storage import samples_storage
from gpuscheduler.models import AssignmentState
from personas.imagegen import placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.media import media_root
from tests.personas.test_integrity import attempt_file, made, path_of, write
from tests.processes import wait_for


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


def verify(*args: str) -> tuple[str, str, int]:
    out, err = StringIO(), StringIO()
    try:
        call_command("verify_samples", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return out.getvalue(), err.getvalue(), code


def test_verify_samples_lists_every_problem_and_exits_1(persona, gpu, settings):
    request = made(persona, settings, 2)
    lost = SampleImage.objects.get(request=request, index=1)
    path_of(lost, settings).unlink()
    orphan, attempt = attempt_file(settings, persona, AssignmentState.ABANDONED)
    write(settings, "samples/notes.txt", b"x")

    out, err, code = verify()

    assert code == 1
    assert (
        f"missing: {lost.image.name} (ada-lovelace, request {request.pk}, index 1, seed {lost.seed}, "
        f"made on {gpu.host}): no such file"
    ) in out
    relative = orphan.relative_to(media_root())
    assert f"orphan: {relative}: attempt {attempt.pk} is abandoned [orphan]" in out
    assert "unknown: samples/notes.txt: not a name this system writes (left alone; look at it)" in out
    assert "3 problem(s) found: `python manage.py verify_samples --repair` repairs them." in out
    assert orphan.exists(), "without --repair nothing changes"
    assert err == ""


def test_verify_samples_on_a_sound_store_says_so_and_exits_0(persona, gpu, settings):
    made(persona, settings, 2)

    out, _, code = verify()

    assert code == 0
    assert out.splitlines() == ["2 images opened and checked; 4 files under samples/.", "No problems found."]


def test_verify_samples_json_has_one_object_with_every_finding(persona, gpu, settings):
    request = made(persona, settings, 2)
    lost = SampleImage.objects.get(request=request, index=0)
    path_of(lost, settings).unlink()
    orphan, attempt = attempt_file(settings, persona, AssignmentState.FAILED)

    out, _, code = verify("--json")

    report = json.loads(out)
    assert code == 1
    assert report["broken"] == [
        {
            "image": lost.pk,
            "persona": "ada-lovelace",
            "request": request.pk,
            "index": 0,
            "seed": lost.seed,
            "path": lost.image.name,
            "problem": "missing",
            "detail": "no such file",
            "host": gpu.host,
        }
    ]
    assert report["orphans"] == [
        {
            "path": str(orphan.relative_to(media_root())),
            "reason": f"attempt {attempt.pk} is failed",
            "attempt": attempt.pk,
        }
    ]
    assert (report["images_checked"], report["files_checked"], report["problems_left"]) == (2, 4, 2)
    assert (report["repair"], report["requeued"], report["removed"], report["skipped"]) == (False, [], [], [])
    assert (report["unknown"], report["recent"], report["in_progress"], report["contents_checked"]) == ([], 0, 0, True)


def test_verify_samples_repair_that_repaired_everything_exits_0(
    persona, gpu, settings, redis_db, django_capture_on_commit_callbacks
):
    request = made(persona, settings, 2)
    lost = SampleImage.objects.get(request=request, index=1)
    path_of(lost, settings).unlink()
    orphan, _ = attempt_file(settings, persona, AssignmentState.FAILED)

    with django_capture_on_commit_callbacks(execute=True):
        out, _, code = verify("--repair", "--json")

    report = json.loads(out)
    assert code == 0
    assert report["requeued"][0] | {"jobs": []} == {
        "request": request.pk,
        "persona": "ada-lovelace",
        "indexes": [1],
        "seeds": [lost.seed],
        "jobs": [],
    }
    assert report["removed"] == [str(orphan.relative_to(media_root()))]
    assert report["problems_left"] == 0 and not orphan.exists()


def test_verify_samples_repair_that_must_skip_says_why_and_exits_1(persona, gpu, settings):
    request = made(persona, settings, 1)
    path_of(SampleImage.objects.get(request=request), settings).unlink()
    active = sample_request_submit(persona=persona, count=1, enqueue=False).request

    out, err, code = verify("--repair")

    assert code == 1
    assert f"the persona has request {active.pk} queued; run --repair again once it ends" in err
    assert "1 problem(s) left after the repair." in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--force"], "--force applies only to --repair"),
        (["--grace", "-1"], "--grace must be a whole number of seconds from 0 to 86400, like 300; got -1."),
        (["--grace", "ten"], "got ten."),
        (["--grace", "٣"], "got ٣."),
        (["--grace", "1_0"], "got 1_0."),
        (["--grace", "86401"], "got 86401."),
        (["--grace", "\x00"], "got '\\x00'."),
    ],
)
def test_verify_samples_refuses_bad_options_with_a_clear_message(db, args, message):
    with pytest.raises(CommandError) as refused:
        call_command("verify_samples", *args, stdout=StringIO())
    assert message in str(refused.value)


def test_verify_samples_on_a_media_folder_it_cannot_read_says_so(db, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(samples_storage(), "listdir", refuse)

    with pytest.raises(CommandError) as refused:
        call_command("verify_samples", stdout=StringIO())
    assert str(refused.value).startswith(
        f"The media store {media_root()} cannot be read ([Errno 13] Permission denied"
    ), refused.value


# --- with real processes --------------------------------------------------------------------------------


def test_a_lost_and_a_damaged_image_are_made_again_by_a_worker_with_the_same_seeds(cluster, persona):
    cluster.start_workers()
    request = sample_request_submit(persona=persona, count=3).request
    succeeded = lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED  # noqa: E731
    wait_for(succeeded, 60, lambda: f"the request to succeed\n{cluster.logs()}")
    before = {image.index: image for image in SampleImage.objects.filter(request=request)}
    media = media_root()
    (media / before[1].image.name).unlink()
    (media / before[2].image.name).write_bytes(b"\x89PNG\r\n\x1a\nnot the rest")

    out, err, code = verify("--repair")

    assert code == 0, out + err
    assert f"re-queued request {request.pk} (ada-lovelace): indexes 1, 2" in out
    wait_for(succeeded, 60, lambda: f"the repaired request to succeed\n{cluster.logs()}")
    after = {image.index: image for image in SampleImage.objects.filter(request=request)}
    assert sorted(after) == [0, 1, 2]
    assert after[0].pk == before[0].pk, "the sound image was left alone"
    for index in (1, 2):
        assert after[index].seed == before[index].seed == request.seed_for(index)
        assert after[index].assignment_id != before[index].assignment_id
        assert (media / after[index].image.name).read_bytes() == placeholder_image(before[index].seed).png
    assert not (media / before[2].image.name).exists(), "the damaged file was removed"
    assert verify()[2] == 0


def test_gpumonitor_sweeps_orphans_by_database_state(cluster, persona, device_factory):
    device_factory("H100", worker=True)
    request = made(persona, cluster.settings, 1)
    orphan, _ = attempt_file(cluster.settings, persona, AssignmentState.ABANDONED)
    running, _ = attempt_file(cluster.settings, persona, AssignmentState.RUNNING)

    cluster.start_monitor()

    wait_for(lambda: not orphan.exists(), 30, lambda: f"the monitor to remove the orphan\n{cluster.logs()}")
    assert running.exists(), "a running attempt's file is in progress"
    assert path_of(SampleImage.objects.get(request=request), cluster.settings).exists()
