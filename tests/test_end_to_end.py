"""The whole path: admin button -> Redis -> real gpuworker processes -> PNG files and rows."""

from __future__ import annotations

import io

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from PIL import Image

from gpuscheduler.models import Assignment, AssignmentState, Device, Snapshot
from personas.image_models import default_model, spec_of
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.media import stored_bytes
from tests.processes import wait_for

pytestmark = pytest.mark.e2e


def test_generate_button_makes_four_tiny_model_images_on_both_gpus(cluster, admin_client, persona):
    cluster.configure(SAMPLES_MODEL="tiny", GPU_SIMULATED="H100*2")
    cluster.start_monitor()
    cluster.start_workers(expect=2)

    response = admin_client.post(
        reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": "4", "device": ""}
    )

    assert response.status_code == 302
    message = next(str(m) for m in get_messages(response.wsgi_request))
    assert message.startswith("Queued 4 images of Ada Lovelace: 2 on SIM 0 H100, 2 on SIM 1 H100"), message
    request = SampleRequest.objects.get(persona=persona)
    assert request.model == spec_of(default_model())["key"] and request.model_spec["source"] == "tiny"
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        120,
        lambda: f"the request to succeed\n{cluster.logs()}",
    )
    images = list(SampleImage.objects.filter(request=request).order_by("index"))
    assert [image.seed for image in images] == [persona.base_seed + k for k in range(4)]
    for image in images:
        data = stored_bytes(image.image.name)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as png:
            assert png.size == (64, 64) == (image.width, image.height)
        assert image.model == request.model, "each image records its request's model"
    succeeded = Assignment.objects.filter(request=request, state=AssignmentState.SUCCEEDED)
    assert sorted(a.image_count for a in succeeded) == [2, 2]
    assert {a.device_id for a in succeeded} == set(Device.objects.values_list("pk", flat=True))
    assert all(a.calls == 1 for a in succeeded), "each attempt makes its images in one pipeline call"
    assert {image.device_id for image in images} == {a.device_id for a in succeeded}
    wait_for(lambda: Snapshot.objects.values("device").distinct().count() == 2, 10, "snapshots of both devices")
    assert "recovery:" not in cluster.logs(), "the happy path needs no abandoning or re-enqueueing"


def test_a_slow_gpu_leaves_the_next_call_of_a_busy_fast_gpu_to_it(cluster, persona_factory):
    # fast makes an image in 0.5 s, slow in 5 s: the second request's image, queued behind the
    # first request's 2-second call on fast, is done sooner by waiting than by slow stealing it.
    cluster.configure(GPU_SIMULATED="fast,slow:0.1", SAMPLES_MODEL="simulated:0.5", SAMPLES_CALIBRATION="1")
    cluster.start_workers(expect=2)
    fast = Device.objects.get(name="fast")

    first = sample_request_submit(persona=persona_factory(), count=4).request
    second = sample_request_submit(persona=persona_factory(), count=1).request

    planned = Assignment.objects.filter(request__in=[first, second]).values_list("planned_device", flat=True)
    assert set(planned) == {fast.pk}, "placement counts the learned speeds: both requests go to fast"
    for request in (first, second):
        wait_for(
            lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
            60,
            lambda: f"request {request.pk} to succeed\n{cluster.logs()}",
        )
    ran_on = Assignment.objects.filter(request__in=[first, second]).values_list("device__name", "state")
    assert sorted(ran_on) == [("fast", AssignmentState.SUCCEEDED)] * 2, cluster.logs()
