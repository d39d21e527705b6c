"""The image model admin (clear errors, one default, no deleting what is in use) and a persona's Model field."""

from __future__ import annotations

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client
from django.urls import reverse

from personas.image_models import default_model
from personas.models import ImageModel, Persona, SampleRequest


@pytest.fixture
def client(user_factory) -> Client:
    client = Client()
    client.force_login(user_factory(superuser=True))
    return client


@pytest.fixture
def model_factory(db):
    def make(name: str, **fields: object) -> ImageModel:
        return ImageModel.objects.create(name=name, **{"source": "tiny", **fields})

    return make


def model_form(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "sd-small",
        "source": "tiny",
        "enabled": "on",
        "width": "",
        "height": "",
        "steps": "20",
        "guidance_scale": "7.5",
        "scheduler": "",
        "dtype": "auto",
        "safety_checker": "on",
    }
    data.update(changes)
    return {name: value for name, value in data.items() if value is not None}


def add(client: Client, **changes: object) -> tuple[int, str]:
    response = client.post(reverse("admin:personas_imagemodel_add"), model_form(**changes))
    return response.status_code, response.content.decode()


def change(client: Client, model: ImageModel, **changes: object) -> tuple[int, str]:
    fields = {
        "name": model.name,
        "source": model.source,
        "enabled": "on" if model.enabled else None,
        "default": "on" if model.is_default else None,
        "steps": str(model.steps),
    }
    response = client.post(
        reverse("admin:personas_imagemodel_change", args=[model.pk]), model_form(**{**fields, **changes})
    )
    return response.status_code, response.content.decode()


# --- validation: each error names the problem and the fix; nothing is saved ------------------------


def test_a_valid_model_is_saved_with_its_safety_checker_as_chosen(client, db):
    status, _ = add(client, name="sd-small", width="512", height="384", scheduler="EulerDiscreteScheduler")

    assert status == 302
    saved = ImageModel.objects.get(name="sd-small")
    assert (saved.width, saved.height, saved.scheduler, saved.safety_checker) == (
        512,
        384,
        "EulerDiscreteScheduler",
        True,
    )
    assert add(client, name="no-checker", safety_checker=None)[0] == 302
    assert ImageModel.objects.get(name="no-checker").safety_checker is False


def test_a_local_folder_is_stored_as_its_absolute_path(client, tmp_path, monkeypatch):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    assert add(client, name="local", source="./sd15")[0] == 302
    assert ImageModel.objects.get(name="local").source == str(folder.resolve())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"source": "/no/such/folder"},
            "/no/such/folder does not exist on this machine: give the absolute path of a diffusers model folder",
        ),
        ({"source": "simulated:abc"}, "The seconds after &#x27;simulated:&#x27; must be a number from 0 to 3600"),
        ({"source": "simulated-h100:-1"}, "The seconds after &#x27;simulated-h100:&#x27; must be a number"),
        ({"source": "not a model!"}, "is not a model source: use &#x27;tiny&#x27;, &#x27;simulated:SECONDS&#x27;"),
        ({"source": "a/b/c"}, "is not a model source"),
        ({"source": "tiny\tx"}, "The source holds control characters: type it on one line."),
        ({"width": "100", "height": "512"}, "100 is not a size a diffusion model takes: give a multiple of 8 from 64"),
        ({"width": "32", "height": "32"}, "32 is not a size a diffusion model takes"),
        ({"width": "4096", "height": "512"}, "4096 is not a size a diffusion model takes"),
        ({"width": "512"}, "Give the height too, or leave both width and height empty for the model&#x27;s own size."),
        ({"height": "512"}, "Give the width too, or leave both width and height empty"),
        (
            {"scheduler": "MadeUpScheduler"},
            "MadeUpScheduler is not a scheduler diffusers ships: pick one from the list",
        ),
        ({"dtype": "int4"}, "int4 is not a dtype: pick auto, float16, bfloat16 or float32."),
        ({"name": "has space"}, "Use letters, digits, dots, hyphens and underscores, starting with a letter or digit"),
        ({"name": "-dash"}, "Use letters, digits, dots, hyphens and underscores"),
        ({"name": "at@sign"}, "Use letters, digits, dots, hyphens and underscores"),
        ({"steps": "0"}, "Ensure this value is greater than or equal to 1."),
        ({"default": "on", "enabled": None}, "A model made the default must be enabled: tick Enabled too"),
    ],
)
def test_each_bad_field_is_refused_with_what_to_do_and_nothing_is_saved(client, db, changes, message):
    before = list(ImageModel.objects.values_list("pk", "name", "is_default"))

    status, page = add(client, **changes)

    assert status == 200
    assert message in page, page.split('class="errornote"', 1)[-1][:2000]
    assert list(ImageModel.objects.values_list("pk", "name", "is_default")) == before


def test_a_folder_without_model_index_json_is_refused(client, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")

    status, page = add(client, source=str(tmp_path))

    assert status == 200
    assert f"{tmp_path} has no model_index.json, so it is not a diffusers model: point the source at" in page
    assert not ImageModel.objects.filter(name="sd-small").exists()


def test_a_name_in_use_is_refused(client, model_factory):
    model_factory("sd-small")

    status, page = add(client)

    assert status == 200
    assert "Image model with this Name already exists." in page


def test_a_source_too_long_once_resolved_is_refused_not_a_database_error(client, tmp_path, monkeypatch):
    deep = tmp_path
    for _ in range(12):
        deep = deep / ("d" * 24)
    deep.mkdir(parents=True)
    (deep / "model_index.json").write_text("{}")
    monkeypatch.chdir(deep.parent)

    status, page = add(client, source=f"./{deep.name}")

    assert status == 200
    assert "over the 300 a model may have: move the model to a shorter path." in page


# --- the one default -----------------------------------------------------------------------------


def test_making_a_model_the_default_unsets_the_previous_default(client, model_factory):
    old = default_model()
    new = model_factory("new")

    status, _ = change(client, new, default="on")

    assert status == 302
    assert list(ImageModel.objects.filter(is_default=True).values_list("name", flat=True)) == ["new"]
    old.refresh_from_db()
    assert not old.is_default


def test_a_new_model_can_be_added_as_the_default(client, db):
    default_model()

    assert add(client, name="fresh", default="on")[0] == 302

    assert list(ImageModel.objects.filter(is_default=True).values_list("name", flat=True)) == ["fresh"]


def test_the_default_model_cannot_be_disabled(client, db):
    default = default_model()

    status, page = change(client, default, enabled=None)

    assert status == 200
    assert "The default model cannot be disabled: make another model the default first, then disable this one." in page
    default.refresh_from_db()
    assert default.enabled


def test_the_default_cannot_be_unticked_only_moved_to_another_model(client, db):
    default = default_model()

    status, page = change(client, default, default=None)

    assert status == 200
    assert "One model is always the default: to change it, open the model that should be the default" in page
    default.refresh_from_db()
    assert default.is_default


def test_a_model_in_use_may_be_disabled(client, model_factory, persona):
    used = model_factory("used")
    Persona.objects.filter(pk=persona.pk).update(image_model=used)

    assert change(client, used, enabled=None)[0] == 302

    used.refresh_from_db()
    assert not used.enabled


# --- deleting ------------------------------------------------------------------------------------


def test_the_default_model_cannot_be_deleted(client, db):
    default = default_model()
    url = reverse("admin:personas_imagemodel_delete", args=[default.pk])

    for response in (client.get(url, follow=True), client.post(url, {"post": "yes"}, follow=True)):
        assert response.status_code == 200
        assert (
            f"The model {default.name} is the default, so it cannot be deleted: make another model the default first"
            in response.content.decode()
        )
    assert ImageModel.objects.filter(pk=default.pk).exists()
    assert not LogEntry.objects.exists()


def test_a_model_used_by_personas_cannot_be_deleted(client, model_factory, persona_factory):
    used = model_factory("used")
    for name in ["Bo", "Al", "Cy", "Di"]:
        persona_factory(name=name, image_model=used)
    url = reverse("admin:personas_imagemodel_delete", args=[used.pk])

    response = client.post(url, {"post": "yes"}, follow=True)

    assert response.status_code == 200
    assert (
        "The model used is chosen by 4 persona(s) (Al, Bo, Cy and 1 more), so it cannot be deleted: choose another "
        "model for them first" in response.content.decode()
    )
    assert ImageModel.objects.filter(pk=used.pk).exists()


def test_a_model_nobody_uses_is_deleted_and_its_requests_keep_their_spec(client, model_factory, persona):
    unused = model_factory("unused")
    request = SampleRequest.objects.create(
        persona=persona,
        count=1,
        first_seed=0,
        model="unused@00000000",
        image_model=unused,
        model_spec={"name": "unused", "key": "unused@00000000"},
        steps=2,
    )

    response = client.post(reverse("admin:personas_imagemodel_delete", args=[unused.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not ImageModel.objects.filter(pk=unused.pk).exists()
    request.refresh_from_db()
    assert (request.image_model, request.model_spec["name"]) == (None, "unused")


def test_the_bulk_delete_refuses_the_default_and_models_in_use_and_deletes_nothing(client, model_factory, persona):
    default = default_model()
    used, unused = model_factory("used"), model_factory("unused")
    Persona.objects.filter(pk=persona.pk).update(image_model=used)
    changelist = reverse("admin:personas_imagemodel_changelist")
    data = {"action": "delete_selected", "_selected_action": [default.pk, used.pk, unused.pk], "post": "yes"}

    page = client.post(changelist, data).content.decode()

    assert f"The model {default.name} is the default, so it cannot be deleted" in page
    assert "Ada Lovelace" in page, "the persona that uses a model is listed as what stops the delete"
    assert ImageModel.objects.count() == 3
    assert not LogEntry.objects.exists()


def test_a_bulk_delete_that_meets_a_model_in_use_at_the_last_moment_deletes_nothing(
    client, model_factory, persona, monkeypatch
):
    first, second = model_factory("first"), model_factory("second")
    changelist = reverse("admin:personas_imagemodel_changelist")

    # A persona chooses `second` between the confirmation page's check and the delete.
    from personas import admin_models as personas_admin

    checked = personas_admin.ImageModelAdmin.get_deleted_objects

    def then_chosen(self, objs, request):
        result = checked(self, objs, request)
        Persona.objects.filter(pk=persona.pk).update(image_model=second)
        return result

    monkeypatch.setattr(personas_admin.ImageModelAdmin, "get_deleted_objects", then_chosen)
    data = {"action": "delete_selected", "_selected_action": [first.pk, second.pk], "post": "yes"}

    response = client.post(changelist, data, follow=True)

    assert response.status_code == 200
    assert "Nothing was deleted. The model second is chosen by 1 persona(s) (Ada Lovelace)" in response.content.decode()
    assert ImageModel.objects.filter(pk__in=[first.pk, second.pk]).count() == 2
    assert not LogEntry.objects.exists(), "no 'deleted' entries for a delete that did not happen"


# --- the list and the persona's Model field ------------------------------------------------------


def test_the_model_list_shows_size_steps_scheduler_safety_default_and_personas(client, model_factory, persona):
    default = default_model()
    small = model_factory("small", width=128, height=96, steps=9, scheduler="PNDMScheduler", safety_checker=False)
    Persona.objects.filter(pk=persona.pk).update(image_model=small)

    page = client.get(reverse("admin:personas_imagemodel_changelist")).content.decode()

    row = page.split(">small</a>", 1)[1].split("</tr>", 1)[0]
    for text in ["128x96", ">9<", "PNDMScheduler", 'alt="False"', ">1<"]:
        assert text in row, (text, row)
    default_row = page.split(f">{default.name}</a>", 1)[1].split("</tr>", 1)[0]
    assert "the model&#x27;s own" in default_row and ">0<" in default_row
    assert default_row.count('alt="True"') == 3, "safety checker, enabled and default"


def test_the_model_change_page_shows_its_key(client, model_factory):
    chosen = model_factory("keyed")

    page = client.get(reverse("admin:personas_imagemodel_change", args=[chosen.pk])).content.decode()

    assert "keyed@" in page


def test_a_persona_picks_its_model_and_empty_means_the_default(client, model_factory, persona):
    default = default_model()
    chosen = model_factory("chosen")
    model_factory("off", enabled=False)
    url = reverse("admin:personas_persona_change", args=[persona.pk])

    page = client.get(url).content.decode()
    field = page.split('name="image_model"', 1)[1].split("</select>", 1)[0]
    assert f"Default model ({default.name})" in field
    assert ">chosen<" in field and ">off (disabled)<" in field
    assert ">Model:<" in page

    data = {
        "name": persona.name,
        "slug": persona.slug,
        "appearance_prompt": persona.appearance_prompt,
        "default_sample_count": "4",
        "base_seed": "0",
        "image_model": str(chosen.pk),
    }
    assert client.post(url, data).status_code == 302
    persona.refresh_from_db()
    assert persona.image_model == chosen

    assert client.post(url, {**data, "image_model": ""}).status_code == 302
    persona.refresh_from_db()
    assert persona.image_model is None


def test_the_persona_list_shows_each_personas_model(client, model_factory, persona_factory):
    default = default_model()
    persona_factory(name="Own", image_model=model_factory("own-model"))
    persona_factory(name="Plain")

    page = client.get(reverse("admin:personas_persona_changelist")).content.decode()

    assert "own-model" in page.split(">Own</a>", 1)[1].split("</tr>", 1)[0]
    assert f"{default.name} (default)" in page.split(">Plain</a>", 1)[1].split("</tr>", 1)[0]


def test_a_disabled_persona_model_makes_the_button_say_so_and_write_nothing(
    client, model_factory, persona, device_factory
):
    device_factory("H100", worker=True)
    Persona.objects.filter(pk=persona.pk).update(image_model=model_factory("off", enabled=False))

    response = client.post(reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": "2"}, follow=True)

    assert response.status_code == 200
    assert (
        "Nothing was queued. The model off is disabled, so it takes no requests: enable it in Image models, or "
        "choose another model for Ada Lovelace." in response.content.decode()
    )
    assert SampleRequest.objects.count() == 0


def test_the_regenerate_action_queues_the_others_and_names_a_persona_whose_model_is_disabled(
    client, model_factory, persona_factory, device_factory
):
    device_factory("H100", worker=True)
    ok = persona_factory(name="Fine")
    off = persona_factory(name="Stuck", image_model=model_factory("off", enabled=False))

    response = client.post(
        reverse("admin:personas_persona_changelist"),
        {"action": "regenerate_samples", "_selected_action": [ok.pk, off.pk]},
        follow=True,
    )

    page = response.content.decode()
    assert "4 images of Fine: 4 on" in page  # saved; queued once the test's transaction would commit
    assert "Nothing was queued for Stuck. The model off is disabled" in page
    assert list(SampleRequest.objects.values_list("persona__name", flat=True)) == ["Fine"]


def test_a_user_who_may_not_delete_models_gets_no_delete_page(user_factory, db):
    viewer = Client()
    viewer.force_login(user_factory(perms=("personas.view_imagemodel",)))
    default = default_model()

    response = viewer.post(reverse("admin:personas_imagemodel_delete", args=[default.pk]), {"post": "yes"})

    assert response.status_code == 403
    assert ImageModel.objects.filter(pk=default.pk).exists()
