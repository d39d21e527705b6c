"""Models in the commands: regenerate_samples --model and the model in --json; demo_data's two models."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from personas.image_models import default_model, spec_of
from personas.management.commands.regenerate_samples import with_models
from personas.models import ImageModel, Persona, SampleImage, SampleRequest
from personas.runner import WaitReport


def run(*args: str, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def model_factory(db):
    def make(name: str, **fields: object) -> ImageModel:
        return ImageModel.objects.create(name=name, **{"source": "tiny", "steps": 3, **fields})

    return make


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


# --- regenerate_samples --model ------------------------------------------------------------------


def test_model_overrides_each_personas_own_for_this_run_only(persona_factory, model_factory, gpu, redis_db):
    own = model_factory("own")
    first = persona_factory(slug="first", image_model=own)
    persona_factory(slug="second")
    override = model_factory("override", width=128, height=128, steps=5)

    out, _ = run("regenerate_samples", "--all", "--count", "1", "--model", "override", "--json")

    summary = json.loads(out)
    key = spec_of(override)["key"]
    assert [row["model"] for row in summary["requests"]] == [{"name": "override", "key": key}] * 2
    assert [(r.image_model, r.model, r.steps) for r in SampleRequest.objects.order_by("pk")] == [(override, key, 5)] * 2
    first.refresh_from_db()
    assert first.image_model == own, "the persona keeps its own model"


def test_without_model_each_request_is_reported_with_its_personas_model(persona_factory, model_factory, gpu, redis_db):
    persona_factory(slug="own", image_model=model_factory("own"))
    persona_factory(slug="plain")
    default = default_model()

    out, _ = run("regenerate_samples", "--all", "--count", "1", "--json")

    rows = {row["persona"]: row["model"] for row in json.loads(out)["requests"]}
    assert rows == {
        "own": {"name": "own", "key": spec_of(ImageModel.objects.get(name="own"))["key"]},
        "plain": {"name": default.name, "key": spec_of(default)["key"]},
    }


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({}, "--model: Unknown model nope: name one of the enabled models ("),
        ({"enabled": False}, "--model: The model nope is disabled, so it takes no requests: enable it in Image models"),
    ],
)
def test_an_unknown_or_disabled_model_is_a_command_error_and_nothing_is_queued(
    persona, model_factory, gpu, setup, message
):
    if setup:
        model_factory("nope", **setup)

    for extra in ([], ["--sync"], ["--dry-run"]):
        with pytest.raises(CommandError) as error:
            run("regenerate_samples", "--persona", persona.slug, "--model", "nope", *extra)
        assert message in str(error.value)
    assert SampleRequest.objects.count() == 0


def test_a_persona_whose_model_is_disabled_is_skipped_with_the_reason_and_the_rest_are_queued(
    persona_factory, model_factory, gpu, redis_db
):
    persona_factory(slug="fine")
    persona_factory(slug="stuck", name="Stuck", image_model=model_factory("off", enabled=False))
    err = StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command("regenerate_samples", "--all", "--count", "1", "--json", stdout=StringIO(), stderr=err)

    assert exit_info.value.code == 1
    assert "not queued (Stuck): The model off is disabled, so it takes no requests" in err.getvalue()
    assert list(SampleRequest.objects.values_list("persona__slug", flat=True)) == ["fine"]


def test_the_dry_run_plans_with_the_model_and_writes_nothing(persona, model_factory, gpu):
    model_factory("override")

    out, _ = run("regenerate_samples", "--persona", persona.slug, "--count", "2", "--model", "override", "--dry-run")

    assert f"ada-lovelace: 2 images -> {gpu.uuid}" in out and out.splitlines()[0].endswith("; model override")
    assert SampleRequest.objects.count() == 0


def test_json_reports_each_images_model_by_the_name_its_request_recorded(persona, model_factory, gpu, redis_db):
    chosen = model_factory("pictured")
    persona.image_model = chosen
    persona.save()
    run("regenerate_samples", "--persona", persona.slug, "--count", "2", "--json")
    request = SampleRequest.objects.get()
    for index in range(2):
        SampleImage.objects.create(
            persona=persona,
            request=request,
            index=index,
            image=f"{index}.png",
            seed=index,
            prompt="p",
            model=request.model,
        )
    chosen.name = "renamed-since"
    chosen.save()

    report = WaitReport.from_requests([request], finished=True)
    summary = with_models(report.as_dict(seconds=1.0), report)

    assert [image["model"] for image in summary["images"]] == [{"name": "pictured", "key": request.model}] * 2
    assert summary["requests"][0]["model"] == {"name": "pictured", "key": request.model}


@pytest.fixture
def sync_run(db, settings, monkeypatch):
    """--sync in this process, on a simulated test device, with the instant simulated default model."""
    ImageModel.objects.filter(pk=default_model().pk).update(source="simulated:0")
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "HEARTBEAT_INTERVAL": 60.0, "LEASE_SECONDS": 180.0}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def test_sync_json_reports_the_model_of_each_image(persona, sync_run):
    default = default_model()

    out, _ = run("regenerate_samples", "--persona", persona.slug, "--count", "2", "--sync", "--json")

    summary = json.loads(out)
    key = spec_of(default)["key"]
    assert summary["succeeded"] == 2
    assert [image["model"] for image in summary["images"]] == [{"name": default.name, "key": key}] * 2
    assert set(SampleImage.objects.values_list("model", flat=True)) == {key}


def test_sync_makes_the_images_with_the_model_named_for_this_run(persona, model_factory, sync_run):
    override = model_factory("override", source="simulated:0", width=64, height=64)

    out, _ = run(
        "regenerate_samples", "--persona", persona.slug, "--count", "2", "--sync", "--json", "--model", "override"
    )

    key = spec_of(override)["key"]
    assert [image["model"] for image in json.loads(out)["images"]] == [{"name": "override", "key": key}] * 2
    assert set(SampleImage.objects.values_list("model", flat=True)) == {key}


def test_sync_skips_a_persona_whose_model_is_disabled_and_makes_the_others(persona_factory, model_factory, sync_run):
    persona_factory(slug="fine")
    persona_factory(slug="stuck", name="Stuck", image_model=model_factory("off", enabled=False))
    out, err = StringIO(), StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command("regenerate_samples", "--all", "--count", "1", "--sync", "--json", stdout=out, stderr=err)

    assert exit_info.value.code == 1
    summary = json.loads(out.getvalue())
    assert (summary["succeeded"], [r["persona"] for r in summary["requests"]]) == (1, ["fine"])
    assert summary["skipped"] == [
        "Stuck was not queued: The model off is disabled, so it takes no requests: enable it in Image models, or "
        "choose another model for Stuck."
    ]


# --- demo_data -----------------------------------------------------------------------------------


def test_demo_data_makes_the_default_and_a_second_model_and_gives_one_persona_the_second(db, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "correct horse battery")
    default = default_model()

    out, _ = run("demo_data")

    second = ImageModel.objects.get(name="tiny-128")
    assert (second.source, second.width, second.height, second.is_default, second.enabled) == (
        "tiny",
        128,
        128,
        False,
        True,
    )
    assert spec_of(second)["key"] != spec_of(default)["key"]
    assert f"Image models: {default.name} (the default), tiny-128 (created)." in out
    assert Persona.objects.get(slug="captain-nova").image_model == second
    assert Persona.objects.filter(image_model__isnull=True).count() == 3


def test_demo_data_twice_changes_nothing_and_keeps_a_personas_edited_model(db, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "correct horse battery")
    run("demo_data")
    Persona.objects.filter(slug="captain-nova").update(image_model=None)
    before = list(ImageModel.objects.order_by("pk").values_list("pk", "name", "is_default"))

    out, _ = run("demo_data")

    assert "tiny-128 (already there)" in out
    assert list(ImageModel.objects.order_by("pk").values_list("pk", "name", "is_default")) == before
    assert Persona.objects.get(slug="captain-nova").image_model is None


def test_demo_data_seeds_the_default_from_the_settings_when_there_is_none(db, monkeypatch, settings):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "correct horse battery")
    ImageModel.objects.all().delete()
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "tiny", "STEPS": 3}

    run("demo_data")

    assert list(ImageModel.objects.order_by("name").values_list("name", "source", "is_default", "steps")) == [
        ("tiny", "tiny", True, 3),
        ("tiny-128", "tiny", False, 3),
    ]
