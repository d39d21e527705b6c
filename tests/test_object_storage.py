"""Sample images in an S3 bucket (SAMPLES_STORAGE=s3), against an S3 emulator on 127.0.0.1 (moto's
server mode, the `s3_storage` fixture): real workers write there, the admin serves from there, the
deletion, the orphan sweep and verify_samples work there, and a bucket that fails puts the work back
to waiting with the bucket's own error. Nothing touches a local folder."""

from __future__ import annotations

import json
import os
import urllib.request
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction
from django.urls import reverse

from config.storage import samples_storage, samples_storage_settings, storage_where
from gpuscheduler import storage
from gpuscheduler.assignments import assignment_claim
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import Assignment, AssignmentState, MediaStore
from gpuscheduler.storage import store_admits, store_check
from personas.attempts import sample_assignment_run, sample_images_commit
from personas.imagegen import GenerationResult, placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import (
    sample_image_path,
    sample_images_delete,
    sample_request_refresh,
    sample_request_submit,
)
from tests.media import files_of
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)  # on_commit hooks run, as in a worker

HOST = "testhost"


def wait_request(request: SampleRequest, cluster, timeout: float = 60) -> SampleRequest:
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        timeout,
        lambda: f"request {request.pk} to succeed\n{cluster.logs()}",
    )
    return SampleRequest.objects.get(pk=request.pk)


def committed(persona, device, count: int = 2) -> SampleRequest:
    """A request whose one attempt a worker ran here and committed: its images in the bucket."""
    request = sample_request_submit(persona=persona, count=count, device=device, enqueue=False).request
    (attempt,) = request.assignments.all()
    claimed = assignment_claim(assignment_id=attempt.pk, device=device, worker_name="w1", host=HOST, timeout=60)
    assert claimed is not None
    images = [placeholder_image(request.seed_for(i)) for i in range(count)]
    assert sample_images_commit(
        assignment=claimed, request=request, images=images, device=device, calls=1, peak_memory=None
    )
    return request


class OneCallGenerator:
    def generate(self, *, seeds: list[int], **kwargs) -> GenerationResult:
        return GenerationResult(images=[placeholder_image(seed) for seed in seeds], calls=1)

    def free_memory(self) -> None:
        pass


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


# --- real workers -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_workers_write_images_to_the_bucket_and_the_admin_serves_them_with_nothing_on_local_disk(
    s3_storage, cluster, persona, client, user_factory, data_dir, monkeypatch, settings
):
    cluster.start_workers()
    request = wait_request(sample_request_submit(persona=persona, count=3).request, cluster)

    images = list(SampleImage.objects.filter(request=request).order_by("index"))
    assert [i.index for i in images] == [0, 1, 2]
    assert s3_storage.keys() == files_of(images), "every image and its thumbnail once, and nothing else"
    for image in images:
        assert s3_storage.get(image.image.name) == placeholder_image(image.seed).png
    assert list(data_dir.rglob("*.png*")) == [] and not (data_dir / "media").exists(), "no local file"
    store = MediaStore.objects.get(host=HOST)
    assert (store.healthy, store.path, store.free_bytes) == (
        True,
        f"s3://{s3_storage.name} at {s3_storage.endpoint}",
        None,
    )

    # The staff's view redirects to a short-lived signed URL of the bucket, which serves the PNG.
    client.force_login(user_factory(perms=("personas.view_persona",)))
    response = client.get(reverse("admin:personas_persona_image", args=[images[0].pk]))
    assert response.status_code == 302
    assert response["Cache-Control"] == "private, max-age=0, no-cache, no-store, must-revalidate", (
        "a fresh URL each time"
    )
    url = response["Location"]
    assert (
        url.startswith(f"{s3_storage.endpoint}/{s3_storage.name}/{images[0].image.name}?")
        and "X-Amz-Expires=300" in url
    )
    with urllib.request.urlopen(url, timeout=10) as fetched:  # the emulator on 127.0.0.1
        assert (fetched.status, fetched.headers["Content-Type"]) == (200, "image/png")
        assert fetched.read() == placeholder_image(images[0].seed).png

    # S3_SIGNED_URL_SECONDS=0 (a bucket the browsers cannot reach): the web server streams it itself.
    monkeypatch.setenv("S3_SIGNED_URL_SECONDS", "0")
    settings.STORAGES = {**settings.STORAGES, "samples": samples_storage_settings(media_dir=data_dir / "media")}
    response = client.get(reverse("admin:personas_persona_image", args=[images[1].pk]))
    assert (response.status_code, response["Content-Type"]) == (200, "image/png")
    assert response["Cache-Control"].startswith("private")
    assert b"".join(response.streaming_content) == placeholder_image(images[1].seed).png
    response.close()

    # Without the permission, nothing: not even a signed URL.
    client.force_login(user_factory(perms=()))
    assert client.get(reverse("admin:personas_persona_image", args=[images[0].pk])).status_code == 404


@pytest.mark.e2e
def test_a_bucket_that_disappears_pauses_the_workers_with_its_error_and_work_resumes_when_it_is_back(
    s3_storage, cluster, persona
):
    cluster.configure(GPU_SIMULATED="sim*1")
    cluster.start_workers(expect=1)
    s3_storage.remove()
    request = sample_request_submit(persona=persona, count=2).request

    # Whichever comes first, the worker's probe or its write of the images, the store is out of
    # service with the bucket's error and the chunk waits (put back with that error, if it had started).
    wait_for(
        lambda: (
            MediaStore.objects.filter(host=HOST, healthy=False, reason__contains="NoSuchBucket").exists()
            and set(Assignment.objects.filter(request=request).values_list("state", flat=True))
            == {AssignmentState.QUEUED}
        ),
        storage.STORE_CHECK_SECONDS + 15,
        lambda: f"the store to read the missing bucket\n{cluster.logs()}",
    )
    assert f"s3://{s3_storage.name}" in MediaStore.objects.get(host=HOST).reason
    for attempt in Assignment.objects.filter(request=request).exclude(error=""):
        assert "NoSuchBucket" in attempt.error
    assert SampleImage.objects.count() == 0

    s3_storage.client.create_bucket(Bucket=s3_storage.name)
    request = wait_request(request, cluster, timeout=storage.STORE_CHECK_SECONDS + 30)
    images = SampleImage.objects.filter(request=request)
    assert s3_storage.keys() == files_of(images) and len(images) == 2
    assert Assignment.objects.filter(request=request).count() == 1, "no attempt was used up"


# --- in this process, against the emulator ------------------------------------------------------------


def test_deleting_images_removes_their_objects_once_the_deletion_commits(s3_storage, persona, gpu):
    request = committed(persona, gpu)
    images = list(SampleImage.objects.filter(request=request))
    names = files_of(images)
    assert s3_storage.keys() == names

    with pytest.raises(RuntimeError), transaction.atomic():  # the admin's own transaction
        sample_images_delete(images=images)
        raise RuntimeError("a later step of the admin's delete failed")
    assert s3_storage.keys() == names, "rolled back: the objects stay with their rows"

    with transaction.atomic():
        sample_images_delete(images=images)
        assert s3_storage.keys() == names, "not before the commit"
    assert SampleImage.objects.count() == 0
    assert s3_storage.keys() == []


def test_verify_samples_finds_a_missing_object_and_an_orphan_object_and_repairs_them(
    s3_storage, persona, gpu, redis_db
):
    request = committed(persona, gpu)
    lost = SampleImage.objects.get(request=request, index=1)
    s3_storage.delete(lost.image.name)
    dead = sample_request_submit(persona=persona, count=1, enqueue=False).request
    (attempt,) = dead.assignments.all()
    Assignment.objects.filter(pk=attempt.pk).update(state=AssignmentState.ABANDONED)
    sample_request_refresh(request_id=dead.pk)
    orphan = sample_image_path(persona_id=persona.pk, request_id=dead.pk, index=0, assignment_id=attempt.pk)
    s3_storage.put(orphan, placeholder_image(1).png)
    s3_storage.put(".storage-probe-otherhost-12", b"x")  # a host's probe, beside samples/: not an orphan

    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("verify_samples", "--json", "--grace", "0", stdout=out)
    report = json.loads(out.getvalue())
    assert [(b["path"], b["problem"], b["detail"]) for b in report["broken"]] == [
        (lost.image.name, "missing", "no such file")
    ]
    assert [o["path"] for o in report["orphans"]] == [orphan]
    assert report["unknown"] == [] and (report["images_checked"], report["files_checked"]) == (2, 4)

    out = StringIO()
    call_command("verify_samples", "--repair", "--json", "--grace", "0", stdout=out)
    repaired = json.loads(out.getvalue())
    assert repaired["removed"] == [orphan] and repaired["problems_left"] == 0
    assert [r["indexes"] for r in repaired["requeued"]] == [[1]]
    keys = s3_storage.keys()
    assert orphan not in keys and ".storage-probe-otherhost-12" in keys


def test_a_bucket_error_puts_the_chunk_back_to_waiting_with_the_real_error(s3_storage, persona, gpu):
    request = sample_request_submit(persona=persona, count=2, device=gpu, enqueue=False).request
    (attempt,) = request.assignments.all()
    s3_storage.remove()
    context = WorkerContext(device=gpu, name="w1", host=HOST, generator=OneCallGenerator())

    result = sample_assignment_run(assignment_id=attempt.pk, context=context)

    assert "NoSuchBucket" in str(result["storage_error"])
    waiting = Assignment.objects.get(pk=attempt.pk)
    assert (waiting.state, waiting.attempt, waiting.device_id) == (AssignmentState.QUEUED, 1, None)
    assert "media store: An error occurred (NoSuchBucket) when calling the PutObject operation" in waiting.error
    assert f": s3://{s3_storage.name}/samples/persona-{persona.pk}/r{request.pk}-i0-a{attempt.pk}.png" in waiting.error
    assert request.assignments.count() == 1, "no attempt was used up"
    assert SampleImage.objects.count() == 0
    admitted, why = store_admits(host=HOST)
    assert not admitted and "NoSuchBucket" in why


def test_an_unreachable_endpoint_puts_the_chunk_back_to_waiting(s3_storage, persona, gpu, monkeypatch, settings):
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    settings.STORAGES = {**settings.STORAGES, "samples": samples_storage_settings(media_dir=settings.MEDIA_ROOT)}
    request = sample_request_submit(persona=persona, count=1, device=gpu, enqueue=False).request
    (attempt,) = request.assignments.all()

    result = sample_assignment_run(
        assignment_id=attempt.pk,
        context=WorkerContext(device=gpu, name="w1", host=HOST, generator=OneCallGenerator()),
    )

    assert "Could not connect to the endpoint URL" in str(result["storage_error"])
    waiting = Assignment.objects.get(pk=attempt.pk)
    assert waiting.state == AssignmentState.QUEUED and f"127.0.0.1:{port}" in waiting.error


def test_the_store_probe_writes_through_the_bucket_and_leaves_nothing(s3_storage):
    row = store_check(host=HOST)
    assert (row.healthy, row.path, row.free_bytes, row.total_bytes) == (
        True,
        storage_where(samples_storage()),
        None,
        None,
    )
    assert s3_storage.keys() == [], "the probe object is removed"

    s3_storage.remove()
    row = store_check(host=HOST)
    assert not row.healthy and "NoSuchBucket" in row.reason
    assert row.reason.endswith(f": s3://{s3_storage.name}/.storage-probe-{HOST}-{os.getpid()}")


def test_regenerate_samples_json_names_each_image_in_the_bucket_without_a_local_path(s3_storage, persona, gpu):
    from personas.runner import WaitReport

    request = committed(persona, gpu)
    summary = WaitReport.from_requests([request], finished=True).as_dict(seconds=1.0)
    assert [(image["name"], image["path"]) for image in summary["images"]] == [
        (image.image.name, None) for image in SampleImage.objects.filter(request=request).order_by("index")
    ]
