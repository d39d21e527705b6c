"""Models as data: which model a request records, that it keeps it, and the one default model."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.urls import reverse

from personas import image_models
from personas.image_models import (
    ModelUnavailable,
    default_model,
    image_model_save,
    legacy_spec,
    model_for,
    model_key,
    spec_name,
    spec_of,
)
from personas.models import SCHEDULERS, ImageModel, SampleImage, SampleRequest
from personas.selectors import persona_gallery, request_progress
from personas.services import sample_request_submit


@pytest.fixture
def gpus(device_factory):
    return [device_factory("H100", worker=True), device_factory("H100", worker=True)]


@pytest.fixture
def model_factory(db):
    def make(name: str, **fields: object) -> ImageModel:
        return ImageModel.objects.create(name=name, **{"source": "tiny", "steps": 3, **fields})

    return make


def submit(persona, count: int = 2, **options):
    return sample_request_submit(persona=persona, count=count, enqueue=False, **options)


# --- what a request records ----------------------------------------------------------------------


def test_a_persona_without_a_model_records_the_default_model(persona, gpus):
    request = submit(persona).request

    default = default_model()
    assert request.image_model == default
    assert (request.model, request.model_spec, request.steps) == (
        spec_of(default)["key"],
        spec_of(default),
        default.steps,
    )


def test_a_persona_records_its_own_model_with_every_field_the_worker_needs(persona, gpus, model_factory):
    chosen = model_factory(
        "sd-small", width=128, height=96, steps=7, guidance_scale=5.5, scheduler="DDIMScheduler", safety_checker=False
    )
    persona.image_model = chosen
    persona.save()

    request = submit(persona).request

    assert request.image_model == chosen
    assert request.steps == 7
    assert request.model_spec == {
        "name": "sd-small",
        "source": "tiny",
        "dtype": "auto",
        "width": 128,
        "height": 96,
        "scheduler": "DDIMScheduler",
        "safety_checker": False,
        "steps": 7,
        "guidance_scale": 5.5,
        "key": request.model,
    }
    assert request.model == model_key(request.model_spec) and request.model.startswith("sd-small@")


def test_a_persona_switched_to_another_model_mid_request_keeps_the_requests_model(persona, gpus, model_factory):
    first, second = model_factory("first"), model_factory("second", width=128, height=128)
    persona.image_model = first
    persona.save()
    request = submit(persona).request
    recorded = (request.model, dict(request.model_spec), request.steps)

    persona.image_model = second
    persona.save()

    request.refresh_from_db()
    assert (request.model, request.model_spec, request.steps) == recorded
    assert request.image_model == first
    assert [a.request.model for a in request.assignments.select_related("request")] == [recorded[0]] * 2


def test_editing_or_deleting_the_model_row_leaves_the_requests_spec_as_it_was(persona, gpus, model_factory):
    chosen = model_factory("editable")
    persona.image_model = chosen
    persona.save()
    request = submit(persona).request
    recorded = (request.model, dict(request.model_spec))

    chosen.source, chosen.steps, chosen.width, chosen.height = "simulated:1", 40, 512, 512
    chosen.save()
    request.refresh_from_db()
    assert (request.model, request.model_spec) == recorded
    assert spec_of(chosen)["key"] != recorded[0], "an edited model is a new model to the workers"

    persona.image_model = None
    persona.save()
    chosen.delete()
    request.refresh_from_db()
    assert (request.model, request.model_spec, request.image_model) == (*recorded, None)


def test_a_web_process_naming_another_model_records_the_default_model_all_the_same(persona, gpus, settings):
    default = default_model()
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated:0.5", "STEPS": 9}

    request = submit(persona).request

    assert request.model_spec["source"] == default.source != "simulated:0.5"
    assert (request.model, request.steps) == (spec_of(default)["key"], default.steps)
    assert ImageModel.objects.count() == 1, "the settings made no second model"


def test_a_model_given_to_the_submit_is_used_instead_of_the_personas(persona, gpus, model_factory):
    persona.image_model = model_factory("own")
    persona.save()
    override = model_factory("override", steps=5)

    request = submit(persona, model=override).request

    assert (request.image_model, request.model_spec["name"], request.steps) == (override, "override", 5)


@pytest.mark.parametrize("whose", ["persona", "default", "override"])
def test_a_disabled_model_takes_no_request_and_nothing_is_written(persona, gpus, model_factory, whose):
    chosen = model_factory("off", enabled=False)
    options = {}
    if whose == "persona":
        persona.image_model = chosen
        persona.save()
    elif whose == "default":
        ImageModel.objects.filter(is_default=True).update(is_default=False)
        ImageModel.objects.filter(pk=chosen.pk).update(is_default=True)
    else:
        options["model"] = chosen

    with pytest.raises(ModelUnavailable, match="The model off is disabled, so it takes no requests: enable it"):
        submit(persona, **options)

    assert SampleRequest.objects.count() == 0
    persona.refresh_from_db()
    assert persona.images_requested == 0


def test_a_model_deleted_after_a_command_chose_it_is_unavailable(persona, model_factory):
    override = model_factory("gone")
    ImageModel.objects.filter(pk=override.pk).delete()

    with pytest.raises(ModelUnavailable, match=r"The model gone was deleted: choose another model\."):
        model_for(persona, override=override)


# --- the one default -------------------------------------------------------------------------------


def test_default_model_is_made_from_the_settings_when_no_model_is_the_default(db, settings):
    ImageModel.objects.all().delete()
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated:0.25", "STEPS": 6, "GUIDANCE": 3.0}

    made = default_model()

    assert (made.name, made.source, made.steps, made.guidance_scale, made.is_default) == (
        "simulated-0.25",
        "simulated:0.25",
        6,
        3.0,
        True,
    )
    assert default_model() == made and ImageModel.objects.count() == 1


def test_default_model_ends_with_one_default_when_another_process_made_one_meanwhile(db, monkeypatch):
    ImageModel.objects.all().delete()
    seed = image_models.seed_fields

    def another_process_first(config):
        # Between this process's look and its insert, another one makes (or chooses) the default.
        ImageModel.objects.create(name="theirs", source="tiny", is_default=True)
        return seed(config)

    monkeypatch.setattr(image_models, "seed_fields", another_process_first)

    chosen = default_model()

    assert chosen.name == "theirs"
    assert list(ImageModel.objects.values_list("name", "is_default")) == [("theirs", True)]


def test_two_threads_making_the_default_at_once_make_exactly_one(transactional_db):
    ImageModel.objects.all().delete()
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def make(i: int) -> None:
        try:
            barrier.wait()
            results[i] = default_model().pk
        except Exception as exc:  # reported to the test
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=make, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert ImageModel.objects.filter(is_default=True).count() == 1
    assert results == [ImageModel.objects.get(is_default=True).pk] * 2, results


def test_making_a_model_the_default_unsets_the_previous_one(db, model_factory):
    old = default_model()
    new = model_factory("new")

    new.is_default = True
    image_model_save(image_model=new)

    assert list(ImageModel.objects.filter(is_default=True)) == [new]
    old.refresh_from_db()
    assert not old.is_default


def test_two_threads_making_two_models_the_default_at_once_leave_exactly_one(transactional_db):
    first = default_model()
    models = [ImageModel.objects.create(name=f"m{i}", source="tiny") for i in range(2)]
    errors: list[Exception] = []

    def choose(i: int, barrier: threading.Barrier) -> None:
        try:
            barrier.wait()
            chosen = ImageModel.objects.get(pk=models[i].pk)
            chosen.is_default = True
            image_model_save(image_model=chosen)
        except Exception as exc:  # reported to the test
            errors.append(exc)
        finally:
            connection.close()

    # Several rounds: without the turn, PostgreSQL broke the one-default constraint in most rounds.
    for _ in range(4):
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=choose, args=(i, barrier)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert ImageModel.objects.filter(is_default=True).count() == 1
        assert ImageModel.objects.get(is_default=True).name in {"m0", "m1"}
        ImageModel.objects.filter(pk__in=[m.pk for m in models]).update(is_default=False)
        ImageModel.objects.filter(pk=first.pk).update(is_default=True)


# --- names, keys and the page ----------------------------------------------------------------------


def test_a_request_made_before_models_were_data_is_shown_by_its_model_string():
    assert spec_name({}, "tiny") == "tiny"
    assert spec_name({}, "sd15@1a2b3c4d") == "sd15"
    assert spec_name({"name": "renamed"}, "sd15@1a2b3c4d") == "renamed"
    assert legacy_spec("simulated:0.5", 4)["key"] == "simulated:0.5"


def test_every_key_field_changes_the_key_and_steps_do_not(db, model_factory):
    base = spec_of(model_factory("keyed"))
    for field, value in [
        ("source", "simulated:1"),
        ("dtype", "float16"),
        ("width", 128),
        ("height", 128),
        ("scheduler", "PNDMScheduler"),
        ("safety_checker", False),
    ]:
        assert model_key({**base, field: value}) != base["key"], field
    assert model_key({**base, "steps": 99, "guidance_scale": 1.0}) == base["key"]


def test_the_gallery_and_the_progress_show_the_model_each_request_recorded(persona, gpus, model_factory):
    persona.image_model = model_factory("small-one", width=128, height=128)
    persona.save()
    request = submit(persona, 1).request
    SampleImage.objects.create(
        persona=persona, request=request, index=0, image="x.png", seed=1, prompt="p", model=request.model
    )
    SampleImage.objects.create(persona=persona, index=0, image="y.png", seed=2, prompt="p", model="old@12345678")
    ImageModel.objects.filter(name="small-one").update(name="renamed-since")

    gallery = persona_gallery(persona=persona)
    progress = request_progress(request=request)

    shown = [image for group in gallery["sample_groups"] for image in group.images]
    assert sorted(image.model_name for image in shown) == ["old", "small-one"]
    assert progress["model"] == {"name": "small-one", "key": request.model}
    assert [image["model"] for image in progress["images"]] == ["small-one"]


def test_the_persona_page_shows_the_requests_model_and_each_images_caption(admin_client, persona, gpus, model_factory):
    persona.image_model = model_factory("captioned", width=128, height=128, steps=4)
    persona.save()
    request = submit(persona, 1).request
    SampleImage.objects.create(
        persona=persona, request=request, index=0, image="x.png", seed=1, prompt="p", model=request.model
    )

    page = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    line = page.split('id="request-model">', 1)[1].split("</p>", 1)[0]
    assert "Model: <strong>captioned</strong> · 128x128 · 4 steps" in line
    assert f"({request.model})" in line
    assert '<span class="model">captioned</span></figcaption>' in page


def test_every_scheduler_offered_exists_in_diffusers():
    # The web process never imports diffusers; the test process may.
    schedulers = pytest.importorskip("diffusers.schedulers")
    missing = [name for name in SCHEDULERS if not hasattr(schedulers, name)]
    assert missing == []
