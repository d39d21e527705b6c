"""Who may change what: every state-changing URL, every kind of caller; and what a job carries."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
from django.test import Client
from django.urls import reverse
from rq.job import Job

from gpuscheduler.models import Assignment
from personas.models import RequestState, SampleRequest
from personas.services import sample_request_submit

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def world(persona_factory, device_factory, redis_db):
    """One persona free to generate, one with a running request to cancel, and two devices."""
    device_factory("H100")
    device_factory("H100")
    idle = persona_factory()
    busy = persona_factory()
    active = sample_request_submit(persona=busy, count=2).request
    return {"idle": idle, "busy": busy, "active": active, "redis": redis_db}


def state_changing_urls(world) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        "generate": (reverse("admin:personas_persona_generate", args=[world["idle"].pk]), {"count": "2"}),
        "cancel": (
            reverse("admin:personas_persona_cancel", args=[world["busy"].pk, world["active"].pk]),
            {},
        ),
    }


def snapshot_of_writes(world) -> tuple:
    redis = world["redis"]
    queued = sorted((key, redis.llen(key)) for key in redis.scan_iter("rq:queue:*"))
    return (
        SampleRequest.objects.count(),
        Assignment.objects.count(),
        SampleRequest.objects.get(pk=world["active"].pk).state,
        tuple(queued),
    )


def client_for(kind: str, user_factory: Callable) -> Client:
    if kind == "anonymous":
        return Client()
    if kind == "no-csrf":
        client = Client(enforce_csrf_checks=True)
        client.force_login(user_factory(perms=("personas.change_persona", "personas.view_persona")))
        return client
    client = Client()
    if kind == "non-staff":
        client.force_login(user_factory(staff=False, perms=("personas.change_persona", "personas.view_persona")))
    elif kind == "staff-without-change":
        client.force_login(user_factory(perms=("personas.view_persona",)))
    elif kind == "allowed-but-get":
        client.force_login(user_factory(perms=("personas.change_persona", "personas.view_persona")))
    return client


@pytest.mark.parametrize("url_name", ["generate", "cancel"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("anonymous", "login"),
        ("non-staff", 403),
        ("staff-without-change", 403),
        ("no-csrf", 403),
        ("allowed-but-get", 405),
    ],
)
def test_state_changing_urls_refuse_callers_and_write_nothing(world, user_factory, url_name, kind, expected):
    url, data = state_changing_urls(world)[url_name]
    client = client_for(kind, user_factory)
    before = snapshot_of_writes(world)

    response = client.get(url) if kind == "allowed-but-get" else client.post(url, data)

    if expected == "login":
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    else:
        assert response.status_code == expected
    assert snapshot_of_writes(world) == before, "nothing enqueued or written"


def test_the_regenerate_action_is_refused_without_change_permission_or_csrf(world, user_factory):
    changelist = reverse("admin:personas_persona_changelist")
    data = {"action": "regenerate_samples", "_selected_action": [str(world["idle"].pk)]}
    before = snapshot_of_writes(world)

    anonymous = Client().post(changelist, data)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("admin:login"))
    viewer = client_for("staff-without-change", user_factory)
    response = viewer.post(changelist, data, follow=True)
    assert response.status_code == 200
    assert "regenerate_samples" not in response.content.decode(), "the action is not offered to a viewer"
    assert client_for("no-csrf", user_factory).post(changelist, data).status_code == 403

    assert snapshot_of_writes(world) == before


def test_an_allowed_press_queues_jobs_that_carry_only_an_id(world, user_factory):
    client = client_for("allowed-but-get", user_factory)
    url, data = state_changing_urls(world)["generate"]

    assert client.post(url, data).status_code == 302

    request = SampleRequest.objects.get(persona=world["idle"])
    assert request.state == RequestState.QUEUED
    redis = world["redis"]
    assignments = list(Assignment.objects.filter(request=request))
    assert len(assignments) == request.count == 2, "a 2-image press on linear devices is one job per device"
    for assignment in assignments:
        job = Job.fetch(assignment.job_id, connection=redis)
        assert job.func_name == "personas.jobs.generate_samples"
        assert job.args == (assignment.pk,) and type(job.args[0]) is int
        assert job.kwargs == {}
        payload = zlib.decompress(redis.hget(f"rq:job:{assignment.job_id}", "data"))
        assert b"personas.jobs" in payload, "the payload was read"
        assert b"personas.models" not in payload and b"django" not in payload, "no model instance is pickled"
