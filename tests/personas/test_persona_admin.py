"""The persona change form (its default count fits one request) and deleting sample requests in the admin."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from personas.models import Persona, RequestState, SampleRequest


@pytest.fixture
def superuser_client(user_factory) -> Client:
    client = Client()
    client.force_login(user_factory(superuser=True))
    return client


def persona_form(persona: Persona, **changes: object) -> dict[str, object]:
    data = {
        "name": persona.name,
        "slug": persona.slug,
        "description": persona.description,
        "appearance_prompt": persona.appearance_prompt,
        "negative_prompt": persona.negative_prompt,
        "default_sample_count": persona.default_sample_count,
        "base_seed": persona.base_seed,
    }
    return {**data, **changes}


def request_for(persona: Persona, state: str) -> SampleRequest:
    return SampleRequest.objects.create(persona=persona, count=2, first_seed=0, model="tiny", steps=2, state=state)


# --- the persona change form ---------------------------------------------------------------------


def test_a_default_count_above_the_request_limit_is_refused_with_the_limit(superuser_client, persona):
    url = reverse("admin:personas_persona_change", args=[persona.pk])

    response = superuser_client.post(url, persona_form(persona, default_sample_count=20))

    assert response.status_code == 200
    assert "The count must be from 1 to 16 (SAMPLES_MAX_PER_REQUEST); 20 is out of range." in response.content.decode()
    persona.refresh_from_db()
    assert persona.default_sample_count == 4


def test_a_default_count_within_the_limit_is_saved(superuser_client, persona, settings):
    settings.SAMPLES = {**settings.SAMPLES, "MAX_PER_REQUEST": 8}
    url = reverse("admin:personas_persona_change", args=[persona.pk])

    assert superuser_client.post(url, persona_form(persona, default_sample_count=9)).status_code == 200
    assert superuser_client.post(url, persona_form(persona, default_sample_count=8)).status_code == 302

    persona.refresh_from_db()
    assert persona.default_sample_count == 8


def test_the_add_form_checks_the_default_count_too(superuser_client, persona):
    new = Persona(name="New", slug="new", appearance_prompt="a face", default_sample_count=4)

    response = superuser_client.post(reverse("admin:personas_persona_add"), persona_form(new, default_sample_count=17))

    assert response.status_code == 200
    assert "17 is out of range" in response.content.decode()
    assert not Persona.objects.filter(slug="new").exists()


def test_the_change_form_shows_the_limit_and_the_image_prompt_fieldset(superuser_client, persona):
    page = superuser_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    assert 'max="16"' in page.split('name="default_sample_count"', 1)[1].split(">", 1)[0]
    assert ">Image prompt</h2>" in page
    assert page.count(">Sample images</h2>") == 1, "only the samples panel below the form"


# --- deleting sample requests ----------------------------------------------------------------------


@pytest.mark.parametrize("state", [RequestState.QUEUED, RequestState.RUNNING])
def test_an_active_request_cannot_be_deleted(superuser_client, persona, state):
    active = request_for(persona, state)
    url = reverse("admin:personas_samplerequest_delete", args=[active.pk])

    assert superuser_client.get(url).status_code == 403
    assert superuser_client.post(url, {"post": "yes"}).status_code == 403

    assert SampleRequest.objects.filter(pk=active.pk).exists()


@pytest.mark.parametrize("state", [RequestState.SUCCEEDED, RequestState.FAILED, RequestState.CANCELLED])
def test_a_finished_request_can_be_deleted(superuser_client, persona, state):
    finished = request_for(persona, state)

    response = superuser_client.post(
        reverse("admin:personas_samplerequest_delete", args=[finished.pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert not SampleRequest.objects.filter(pk=finished.pk).exists()


def test_the_bulk_delete_refuses_a_selection_with_an_active_request(superuser_client, persona_factory):
    finished = request_for(persona_factory(), RequestState.SUCCEEDED)
    active = request_for(persona_factory(), RequestState.RUNNING)
    data = {"action": "delete_selected", "_selected_action": [finished.pk, active.pk]}
    changelist = reverse("admin:personas_samplerequest_changelist")

    confirm = superuser_client.post(changelist, data)
    refused = superuser_client.post(changelist, {**data, "post": "yes"})

    assert "queued or running (cancel it first)" in confirm.content.decode()
    assert refused.status_code == 403
    assert SampleRequest.objects.count() == 2


def test_a_persona_with_an_active_request_cannot_be_deleted(superuser_client, persona):
    request_for(persona, RequestState.QUEUED)
    url = reverse("admin:personas_persona_delete", args=[persona.pk])

    page = superuser_client.get(url).content.decode()
    response = superuser_client.post(url, {"post": "yes"})

    assert "sample request that is queued or running (cancel it first)" in page
    assert response.status_code == 403
    assert Persona.objects.filter(pk=persona.pk).exists()


def test_a_persona_whose_requests_have_ended_can_be_deleted(superuser_client, persona):
    request_for(persona, RequestState.SUCCEEDED)

    response = superuser_client.post(reverse("admin:personas_persona_delete", args=[persona.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not Persona.objects.filter(pk=persona.pk).exists()
