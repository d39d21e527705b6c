"""The persona page's live progress JSON, the Cancel button and the Regenerate sample images action."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from gpuscheduler import queues
from gpuscheduler.assignments import assignment_claim
from gpuscheduler.models import Assignment, AssignmentState
from personas.attempts import sample_images_commit
from personas.imagegen import placeholder_image
from personas.models import RequestSource, RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.media import stored_names

VIEW = ("personas.view_persona",)
CHANGE = ("personas.view_persona", "personas.change_persona")


@pytest.fixture
def two_gpus(device_factory):
    return [device_factory("H100"), device_factory("H100")]


def progress_url(persona):
    return reverse("admin:personas_persona_progress", args=[persona.pk])


def cancel_url(request):
    return reverse("admin:personas_persona_cancel", args=[request.persona_id, request.pk])


def messages_of(response):
    return [str(m) for m in get_messages(response.wsgi_request)]


def make_first_chunk(request):
    """Run the request's first chunk the way a worker does: claim it, then commit its images."""
    assignment = Assignment.objects.filter(request=request).order_by("first_index").first()
    assignment = assignment_claim(
        assignment_id=assignment.pk, device=assignment.planned_device, worker_name="w", host="testhost", timeout=60
    )
    seeds = [request.seed_for(assignment.first_index + k) for k in range(assignment.image_count)]
    request = SampleRequest.objects.select_related("persona").get(pk=request.pk)
    assert sample_images_commit(
        assignment=assignment,
        request=request,
        images=[placeholder_image(seed) for seed in seeds],
        device=assignment.planned_device,
        calls=1,
        peak_memory=None,
    )
    return assignment


# --- progress JSON ------------------------------------------------------------------------------


def test_progress_json_sends_anonymous_users_to_the_login_page(client, persona):
    response = client.get(progress_url(persona))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_progress_json_is_forbidden_to_signed_in_users_who_are_not_staff(client, persona, user_factory):
    client.force_login(user_factory(staff=False, perms=VIEW))

    assert client.get(progress_url(persona)).status_code == 403


def test_progress_json_is_forbidden_to_staff_without_the_view_permission(client, persona, user_factory):
    client.force_login(user_factory(perms=("personas.view_samplerequest",)))

    assert client.get(progress_url(persona)).status_code == 403


def test_progress_json_shows_images_done_of_asked_with_their_devices_and_every_attempt(
    client, persona, two_gpus, user_factory
):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    make_first_chunk(request)
    client.force_login(user_factory(perms=VIEW))

    data = client.get(progress_url(persona)).json()

    assert (data["id"], data["state"], data["active"]) == (request.pk, "running", True)
    assert (data["done"], data["asked"], data["running"]) == (2, 4, 0)
    assert [(i["index"], i["seed"], i["device"]) for i in data["images"]] == [
        (0, persona.base_seed, two_gpus[0].label),
        (1, persona.base_seed + 1, two_gpus[0].label),
    ]
    assert data["by_device"] == [{"device": two_gpus[0].label, "images": 2}]
    assert [(a["images"], a["state"], a["planned"], a["device"]) for a in data["attempts"]] == [
        ("images 1-2", "succeeded", two_gpus[0].label, two_gpus[0].label),
        ("images 3-4", "queued", two_gpus[1].label, ""),
    ]
    assert client.get(data["images"][0]["url"]).status_code == 200


def test_progress_json_of_a_persona_without_requests_is_inactive(client, persona, user_factory):
    client.force_login(user_factory(perms=VIEW))

    assert client.get(progress_url(persona)).json() == {
        "id": None,
        "persona": persona.pk,
        "active": False,
        "images": [],
        "attempts": [],
    }


def test_change_page_of_an_active_request_polls_and_offers_cancel(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request

    page = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    assert f'data-progress-url="{progress_url(persona)}"' in page
    assert 'data-active="1"' in page
    assert "personas/samples.js" in page
    assert f'action="{cancel_url(request)}"' in page
    # The cancel form comes before the change form (with the progress, under the Generate button)
    # and ends before it starts: it does not sit inside it.
    cancel_form = page.index('id="cancel-request-form"')
    assert cancel_form < page.index("</form>", cancel_form) < page.index('id="persona_form"')


def test_change_page_of_a_finished_request_neither_polls_nor_offers_cancel(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    SampleRequest.objects.filter(pk=request.pk).update(state=RequestState.SUCCEEDED)

    page = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    assert "Succeeded" in page
    assert 'data-active="1"' not in page
    assert "cancel-request-form" not in page


def test_change_page_keeps_following_a_cancelled_request_while_a_job_still_runs(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    first = Assignment.objects.filter(request=request).order_by("first_index").first()
    assignment_claim(assignment_id=first.pk, device=first.planned_device, worker_name="w", host="h", timeout=60)
    admin_client.post(cancel_url(request))

    page = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    assert "Cancelled" in page
    assert 'data-active="1"' in page, "the running job's images are still to come"
    assert "cancel-request-form" not in page


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_removes_queued_jobs_from_redis_and_keeps_the_images_already_made(
    admin_client, persona, two_gpus, redis_db, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        request = sample_request_submit(persona=persona, count=4).request
    first = make_first_chunk(request)
    waiting = Assignment.objects.get(request=request, state=AssignmentState.QUEUED)
    assert waiting.job_id in queues.queue_job_ids(waiting.queue_name, redis_db)
    files = [image.image.name for image in SampleImage.objects.filter(request=request)]

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(cancel_url(request))

    assert response.status_code == 302
    assert messages_of(response) == [
        "Cancelled the request for 4 images of Ada Lovelace: 1 queued job(s) cancelled on every device; "
        "the 2 image(s) already made are kept."
    ]
    request.refresh_from_db()
    assert request.state == RequestState.CANCELLED
    assert Assignment.objects.get(pk=waiting.pk).state == AssignmentState.CANCELLED
    assert Assignment.objects.get(pk=first.pk).state == AssignmentState.SUCCEEDED
    assert waiting.job_id not in queues.queue_job_ids(waiting.queue_name, redis_db)
    assert SampleImage.objects.filter(request=request).count() == 2
    assert len(files) == 2 and all(name in stored_names() for name in files)


def test_cancel_says_a_running_job_finishes_and_keeps_its_images(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    first = Assignment.objects.filter(request=request).order_by("first_index").first()
    assignment_claim(assignment_id=first.pk, device=first.planned_device, worker_name="w", host="h", timeout=60)

    response = admin_client.post(cancel_url(request))

    assert messages_of(response) == [
        "Cancelled the request for 4 images of Ada Lovelace: 1 queued job(s) cancelled on every device; "
        "the 0 image(s) already made are kept. 1 running job(s) will finish and keep their images."
    ]
    assert Assignment.objects.get(pk=first.pk).state == AssignmentState.RUNNING


def test_cancel_answers_get_with_method_not_allowed(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request

    assert admin_client.get(cancel_url(request)).status_code == 405
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED


def test_cancel_is_forbidden_to_staff_without_the_change_permission(client, persona, two_gpus, user_factory):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    client.force_login(user_factory(perms=VIEW))

    assert client.post(cancel_url(request)).status_code == 403
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED


def test_cancel_without_a_csrf_token_is_refused(persona, two_gpus, admin_user):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)

    assert client.post(cancel_url(request)).status_code == 403
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED


def test_cancel_of_another_personas_request_is_not_found(admin_client, persona_factory, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    other = persona_factory()

    response = admin_client.post(reverse("admin:personas_persona_cancel", args=[other.pk, request.pk]))

    assert response.status_code == 404
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED


def test_cancel_of_a_finished_request_says_so_and_changes_nothing(admin_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    SampleRequest.objects.filter(pk=request.pk).update(state=RequestState.SUCCEEDED)
    Assignment.objects.filter(request=request).update(state=AssignmentState.SUCCEEDED)

    response = admin_client.post(cancel_url(request))

    assert response.status_code == 302
    assert messages_of(response) == ["Nothing was cancelled: the request for 2 images is already succeeded."]
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED
    assert set(Assignment.objects.filter(request=request).values_list("state", flat=True)) == {"succeeded"}


# --- the admin action ---------------------------------------------------------------------------


def run_action(client, *personas):
    return client.post(
        reverse("admin:personas_persona_changelist"),
        {"action": "regenerate_samples", "_selected_action": [p.pk for p in personas]},
    )


def test_regenerate_action_queues_one_request_per_selected_persona_and_says_where(
    transactional_db, admin_client, persona_factory, two_gpus, redis_db
):
    ada = persona_factory(name="Ada", default_sample_count=4)
    bob = persona_factory(name="Bob", default_sample_count=2)
    carol = persona_factory(name="Carol")

    response = run_action(admin_client, ada, bob)

    assert response.status_code == 302
    requests = SampleRequest.objects.order_by("persona__name")
    assert [(r.persona.name, r.count, r.source) for r in requests] == [
        ("Ada", 4, RequestSource.ACTION),
        ("Bob", 2, RequestSource.ACTION),
    ]
    assert not carol.requests.exists()
    a, b = (d.label for d in two_gpus)
    assert messages_of(response) == [
        f"Queued 4 images of Ada: 2 on {a}, 2 on {b}; 2 images of Bob: 1 on {a}, 1 on {b} "
        f"(6 images in all: 3 on {a}, 3 on {b})."
    ]
    queued = {jid for d in two_gpus for jid in queues.queue_job_ids(queues.device_queue_name(d.pk), redis_db)}
    assert queued == set(Assignment.objects.values_list("job_id", flat=True))


def test_regenerate_action_reports_personas_that_are_already_queued(admin_client, persona_factory, two_gpus):
    ada = persona_factory(name="Ada", default_sample_count=4)
    bob = persona_factory(name="Bob", default_sample_count=2)
    sample_request_submit(persona=ada, count=3, enqueue=False)

    response = run_action(admin_client, ada, bob)

    assert SampleRequest.objects.filter(persona=ada).count() == 1
    assert SampleRequest.objects.filter(persona=bob).count() == 1
    assert "Already queued, nothing new was queued for them: Ada already has 3 images queued." in messages_of(response)


def test_regenerate_action_reports_when_no_device_can_take_work(admin_client, persona_factory):
    ada = persona_factory(name="Ada")
    bob = persona_factory(name="Bob")

    response = run_action(admin_client, ada, bob)

    assert not SampleRequest.objects.exists()
    assert messages_of(response) == [
        "Nothing was queued for Ada, Bob. No device is registered yet: "
        "start `python manage.py gpuworkers` (or `gpumonitor`) first."
    ]


def test_regenerate_action_says_when_redis_is_down(transactional_db, admin_client, persona, two_gpus, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    queues._connection.cache_clear()
    try:
        response = run_action(admin_client, persona)
    finally:
        queues._connection.cache_clear()

    (message,) = messages_of(response)
    assert message.startswith("Saved 4 images of Ada Lovelace")
    assert "Redis is unavailable right now" in message
    assert SampleRequest.objects.get(persona=persona).state == RequestState.QUEUED


def test_regenerate_action_is_not_offered_to_staff_without_the_change_permission(
    client, persona, two_gpus, user_factory
):
    client.force_login(user_factory(perms=VIEW))

    page = client.get(reverse("admin:personas_persona_changelist"))
    refused = run_action(client, persona)

    assert page.status_code == 200
    assert 'value="regenerate_samples"' not in page.content.decode()
    assert refused.status_code == 200, "the list is shown again: there is no action to run"
    assert not SampleRequest.objects.exists()


def test_regenerate_action_is_offered_to_staff_with_the_change_permission(client, persona, user_factory):
    client.force_login(user_factory(perms=CHANGE))

    page = client.get(reverse("admin:personas_persona_changelist"))

    assert 'value="regenerate_samples"' in page.content.decode()
