"""The Generate sample images button, the persona change page and the image view."""

from __future__ import annotations

import pytest
from django.contrib.messages import constants, get_messages
from django.test import Client
from django.urls import reverse
from rq.job import Job

from config.storage import samples_storage
from gpuscheduler import queues
from gpuscheduler.models import Assignment, Health
from personas.imagegen import placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from tests.media import store

GENERATE = "admin:personas_persona_generate"


@pytest.fixture
def editor(user_factory):
    return user_factory(perms=("personas.view_persona", "personas.change_persona"))


@pytest.fixture
def editor_client(client, editor):
    client.force_login(editor)
    return client


@pytest.fixture
def two_gpus(device_factory):
    return [device_factory("H100"), device_factory("H100")]


def generate_url(persona) -> str:
    return reverse(GENERATE, args=[persona.pk])


def change_url(persona) -> str:
    return reverse("admin:personas_persona_change", args=[persona.pk])


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in get_messages(response.wsgi_request)]


def assert_nothing_written(persona) -> None:
    assert SampleRequest.objects.count() == 0
    assert Assignment.objects.count() == 0
    persona.refresh_from_db()
    assert persona.images_requested == 0


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    queues._connection.cache_clear()
    yield
    queues._connection.cache_clear()


# --- the happy path ---------------------------------------------------------------------------
# These tests commit for real (transactional_db): the view reports what reached Redis, which is
# only known once the request's transaction has committed, as it does in production.


def test_editor_queues_images_on_both_gpus_and_the_jobs_reach_redis(
    transactional_db, client, user_factory, persona_factory, device_factory, redis_db
):
    persona = persona_factory(name="Ada Lovelace", slug="ada-lovelace")
    editor = user_factory(perms=("personas.view_persona", "personas.change_persona"))
    first, second = device_factory("H100"), device_factory("H100")
    client.force_login(editor)

    response = client.post(generate_url(persona), {"count": "4", "device": ""})

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    assert messages_of(response) == [
        (constants.SUCCESS, f"Queued 4 images of Ada Lovelace: 2 on {first.label}, 2 on {second.label}.")
    ]
    request = SampleRequest.objects.get()
    assert (request.persona, request.count, request.state, request.requested_by) == (
        persona,
        4,
        RequestState.QUEUED,
        editor,
    )
    assert request.first_seed == persona.base_seed
    assignments = list(Assignment.objects.filter(request=request).order_by("first_index"))
    assert [(a.planned_device_id, a.first_index, a.image_count) for a in assignments] == [
        (first.pk, 0, 2),
        (second.pk, 2, 2),
    ]
    for assignment in assignments:
        assert assignment.queue_name == f"gpu.{assignment.planned_device_id}"
        assert assignment.enqueued_at is not None
        assert assignment.policy == "balanced" and assignment.reason
        assert queues.queue_job_ids(assignment.queue_name, redis_db) == {assignment.job_id}
        job = Job.fetch(assignment.job_id, connection=redis_db)
        assert (job.func_name, job.args) == ("personas.jobs.generate_samples", (assignment.pk,))


def test_an_explicit_device_pins_every_image_to_its_own_queue(
    transactional_db, client, user_factory, persona_factory, device_factory, redis_db
):
    persona = persona_factory()
    device_factory("H100")
    chosen = device_factory("T4", worker=True)
    client.force_login(user_factory(perms=("personas.change_persona",)))

    response = client.post(generate_url(persona), {"count": "3", "device": str(chosen.pk)})

    assert messages_of(response) == [(constants.SUCCESS, f"Queued 3 images of {persona.name}: 3 on {chosen.label}.")]
    (assignment,) = Assignment.objects.all()
    assert (assignment.planned_device, assignment.pinned, assignment.policy) == (chosen, True, "explicit")
    assert assignment.queue_name == f"gpu.{chosen.pk}.pinned"
    assert queues.queue_job_ids(assignment.queue_name, redis_db) == {assignment.job_id}
    assert SampleRequest.objects.get().device == chosen


def test_redis_down_saves_the_request_and_says_it_will_be_queued_later(
    transactional_db, client, user_factory, persona_factory, device_factory, redis_down
):
    persona = persona_factory()
    device_factory("H100")
    device_factory("H100")
    client.force_login(user_factory(perms=("personas.change_persona",)))

    response = client.post(generate_url(persona), {"count": "2", "device": ""})

    assert response.status_code == 302
    ((level, text),) = messages_of(response)
    assert level == constants.WARNING
    assert text.startswith(f"Saved 2 images of {persona.name}: ")
    assert "Redis is unavailable right now" in text
    assert "they will be queued automatically as soon as Redis answers again" in text
    request = SampleRequest.objects.get()
    assert request.state == RequestState.QUEUED
    assignments = Assignment.objects.filter(request=request)
    assert assignments.count() == 2
    assert all(a.enqueued_at is None for a in assignments)


# --- who may press it --------------------------------------------------------------------------


def test_anonymous_users_are_sent_to_the_login_page(client, persona, two_gpus):
    response = client.post(generate_url(persona), {"count": "2"})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login") + "?next=")
    assert_nothing_written(persona)


def test_a_signed_in_user_who_is_not_staff_gets_403(client, user_factory, persona, two_gpus):
    client.force_login(user_factory(staff=False, perms=("personas.change_persona",)))
    response = client.post(generate_url(persona), {"count": "2"})
    assert response.status_code == 403
    assert_nothing_written(persona)


def test_staff_without_change_permission_gets_403(client, user_factory, persona, two_gpus):
    client.force_login(user_factory(perms=("personas.view_persona",)))
    response = client.post(generate_url(persona), {"count": "2"})
    assert response.status_code == 403
    assert_nothing_written(persona)


def test_get_is_refused_with_405(editor_client, persona, two_gpus):
    response = editor_client.get(generate_url(persona), {"count": "2"})
    assert response.status_code == 405
    assert_nothing_written(persona)


def test_a_post_without_csrf_token_is_refused(editor, persona, two_gpus):
    client = Client(enforce_csrf_checks=True)
    client.force_login(editor)
    response = client.post(generate_url(persona), {"count": "2"})
    assert response.status_code == 403
    assert_nothing_written(persona)


def test_a_post_with_the_csrf_token_from_the_change_page_is_accepted(editor, persona, two_gpus):
    client = Client(enforce_csrf_checks=True)
    client.force_login(editor)
    client.get(change_url(persona))
    token = client.cookies["csrftoken"].value
    response = client.post(generate_url(persona), {"count": "2", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert SampleRequest.objects.count() == 1


def test_an_unknown_persona_is_404(editor_client, two_gpus):
    assert editor_client.post(reverse(GENERATE, args=[999999]), {"count": "2"}).status_code == 404


# --- what the form accepts --------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "-1", "17", "abc", "", "1e3", "2.5", "9" * 10240])
def test_a_bad_count_queues_nothing_and_says_why(editor_client, persona, two_gpus, count):
    response = editor_client.post(generate_url(persona), {"count": count, "device": ""})

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert text.startswith("Nothing was queued. Count: ")
    assert len(text) < 300, "the message never echoes a huge input"
    assert_nothing_written(persona)


def test_a_missing_count_queues_nothing(editor_client, persona, two_gpus):
    response = editor_client.post(generate_url(persona), {})
    assert messages_of(response) == [(constants.ERROR, "Nothing was queued. Count: This field is required.")]
    assert_nothing_written(persona)


def test_the_count_limit_follows_samples_max_per_request(editor_client, persona, two_gpus, settings):
    settings.SAMPLES = {**settings.SAMPLES, "MAX_PER_REQUEST": 2}
    response = editor_client.post(generate_url(persona), {"count": "3"})
    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert "from 1 to 2 (SAMPLES_MAX_PER_REQUEST); 3 is out of range" in text
    assert_nothing_written(persona)


@pytest.mark.parametrize("device", ["999999", "abc", "-1"])
def test_an_unknown_device_queues_nothing(editor_client, persona, two_gpus, device):
    response = editor_client.post(generate_url(persona), {"count": "2", "device": device})
    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert text.startswith("Nothing was queued. Device: ")
    assert_nothing_written(persona)


def test_a_second_press_while_the_first_is_active_is_already_queued(editor_client, persona, two_gpus):
    first = editor_client.post(generate_url(persona), {"count": "4"})
    assert first.status_code == 302

    second = editor_client.post(generate_url(persona), {"count": "2"})

    assert second.status_code == 302
    level, text = messages_of(second)[-1]  # the first press's message is still unread
    assert level == constants.WARNING
    assert text.startswith("Already queued: Ada Lovelace already has 4 images queued.")
    assert "Nothing new was queued." in text
    request = SampleRequest.objects.get()
    assert request.count == 4
    assert Assignment.objects.filter(request=request).count() == 2
    persona.refresh_from_db()
    assert persona.images_requested == 4


def test_a_new_press_is_accepted_once_the_previous_request_ended(editor_client, persona, two_gpus):
    editor_client.post(generate_url(persona), {"count": "4"})
    SampleRequest.objects.update(state=RequestState.SUCCEEDED)
    response = editor_client.post(generate_url(persona), {"count": "2"})
    assert f"2 images of {persona.name}" in messages_of(response)[-1][1]
    assert SampleRequest.objects.count() == 2
    newest = SampleRequest.objects.order_by("-id").first()
    assert (newest.count, newest.first_seed) == (2, persona.base_seed + 4)


def test_no_healthy_device_queues_nothing_and_says_which_and_why(editor_client, persona, device_factory):
    hot = device_factory(
        "H100", health=Health.UNHEALTHY, health_reason="temperature 97 C is at or above the 85 C limit"
    )

    response = editor_client.post(generate_url(persona), {"count": "2"})

    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert text == (
        f"Nothing was queued. No healthy device can take work now: {hot.label} is unhealthy "
        "(temperature 97 C is at or above the 85 C limit)."
    )
    assert_nothing_written(persona)


def test_no_registered_device_says_how_to_start_one(editor_client, persona):
    response = editor_client.post(generate_url(persona), {"count": "2"})
    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert "No device is registered yet" in text and "gpuworkers" in text
    assert_nothing_written(persona)


# --- the change page and the images --------------------------------------------------------------


@pytest.fixture
def stored_image(persona, two_gpus, settings):
    """One finished request with one image file in the samples storage."""
    device = two_gpus[0]
    request = SampleRequest.objects.create(
        persona=persona, count=1, state=RequestState.SUCCEEDED, first_seed=1234, model="simulated:0", steps=2
    )
    generated = placeholder_image(1234)
    name = f"samples/persona-{persona.pk}/r{request.pk}-i0-a1.png"
    assert store(name, generated.png) == name
    return SampleImage.objects.create(
        persona=persona,
        request=request,
        index=0,
        image=name,
        seed=1234,
        prompt=persona.appearance_prompt,
        width=64,
        height=64,
        model="simulated:0",
        steps=2,
        device=device,
    )


def test_the_change_page_shows_the_button_the_devices_and_the_gallery(editor_client, persona, two_gpus, stored_image):
    response = editor_client.get(change_url(persona))

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="generate-samples-form"' in html
    assert f'action="{generate_url(persona)}"' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert 'name="count"' in html and 'max="16"' in html
    for device in two_gpus:
        assert f'<option value="{device.pk}">{device.label}' in html
    assert 'id="sample-gallery"' in html
    assert reverse("admin:personas_persona_image", args=[stored_image.pk]) in html
    assert "seed 1234" in html


def test_the_change_page_has_no_button_for_a_viewer(client, user_factory, persona, two_gpus, stored_image):
    client.force_login(user_factory(perms=("personas.view_persona",)))
    response = client.get(change_url(persona))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="generate-samples-form"' not in html
    assert reverse("admin:personas_persona_image", args=[stored_image.pk]) in html


def test_the_change_page_shows_the_latest_request_and_its_attempts(editor_client, persona, two_gpus):
    editor_client.post(generate_url(persona), {"count": "2"})
    html = editor_client.get(change_url(persona)).content.decode()
    assert 'id="request-state">Queued<' in html
    assert html.count('class="attempt state-queued"') == 2


def test_a_viewer_gets_the_png(client, user_factory, stored_image):
    client.force_login(user_factory(perms=("personas.view_persona",)))
    response = client.get(reverse("admin:personas_persona_image", args=[stored_image.pk]))
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert b"".join(response.streaming_content) == placeholder_image(1234).png
    response.close()


def test_a_missing_image_is_404(editor_client, stored_image):
    assert editor_client.get(reverse("admin:personas_persona_image", args=[stored_image.pk + 1000])).status_code == 404


def test_an_image_whose_file_is_gone_is_404(editor_client, stored_image, settings):
    samples_storage().delete(stored_image.image.name)
    assert editor_client.get(reverse("admin:personas_persona_image", args=[stored_image.pk])).status_code == 404


def test_an_image_row_pointing_outside_media_is_404(editor_client, stored_image, settings, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG secret")
    SampleImage.objects.filter(pk=stored_image.pk).update(image="../../" + outside.name)
    assert editor_client.get(reverse("admin:personas_persona_image", args=[stored_image.pk])).status_code == 404


def test_staff_without_view_permission_cannot_see_an_image(client, user_factory, stored_image):
    client.force_login(user_factory(perms=()))
    assert client.get(reverse("admin:personas_persona_image", args=[stored_image.pk])).status_code == 404


def test_an_anonymous_user_cannot_see_an_image(client, stored_image):
    response = client.get(reverse("admin:personas_persona_image", args=[stored_image.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_an_explicit_device_without_a_running_worker_is_refused_and_nothing_is_written(
    transactional_db, client, user_factory, persona_factory, device_factory, redis_db
):
    persona = persona_factory()
    device_factory("H100", worker=True)
    orphan = device_factory("T4")  # registered, but no worker reads its pinned queue
    client.force_login(user_factory(perms=("personas.change_persona",)))

    response = client.post(generate_url(persona), {"count": "3", "device": str(orphan.pk)})

    ((level, text),) = messages_of(response)
    assert level == constants.ERROR
    assert f"{orphan.label} has no running worker" in text and "gpuworkers" in text
    assert not SampleRequest.objects.exists() and not Assignment.objects.exists()
