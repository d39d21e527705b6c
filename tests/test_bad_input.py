"""Property-based: hostile input to the button, the persona form and the command never breaks anything."""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.urls import reverse
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gpuscheduler.backends import DeviceInfo
from gpuscheduler.worker import build_context
from personas.models import Persona, SampleImage, SampleRequest
from personas.services import sample_assignment_run, sample_request_submit

NASTY = st.sampled_from(
    [
        "../",
        "../../etc/passwd",
        "a\x00b",
        "\u202egnp.exe",
        "🙂🚀",
        "٣",
        "1e3",
        "0x10",
        " 4 ",
        "-1",
        "",
        "%00",
        "<script>",
    ]
)
# 10 kB of text: a short random piece repeated (Hypothesis draws at most a few kB itself).
HUGE = st.text(min_size=1, max_size=8, alphabet="ab🙂\u202e/.\x00").map(lambda piece: (piece * 10_240)[:10_240])
TEXT = st.one_of(NASTY, st.text(max_size=40), HUGE)
COUNTS = st.one_of(NASTY, st.integers(min_value=-(10**30), max_value=10**30).map(str), st.text(max_size=12))
SAFE_PATH = re.compile(r"^samples/persona-\d+/r\d+-i\d+-a\d+\.png$")
# Example counts and randomness come from the profile chosen in conftest.py (HYPOTHESIS_PROFILE).
FAST = hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FAST
@given(count=COUNTS, device=st.one_of(st.none(), TEXT))
def test_generate_button_answers_hostile_input_with_a_message_never_a_500(
    admin_client, persona, device_factory, count, device
):
    device_factory("H100")
    data = {"count": count} if device is None else {"count": count, "device": device}
    response = admin_client.post(reverse("admin:personas_persona_generate", args=[persona.pk]), data)
    assert response.status_code == 302
    assert SampleRequest.objects.filter(persona=persona).count() <= 1
    SampleRequest.objects.all().delete()


@FAST
@given(name=TEXT, slug=TEXT, prompt=TEXT, negative=TEXT)
@example(name="../../etc/passwd \u202e🙂", slug="evil-slug", prompt="a portrait ../ \u202e 🙂", negative="../")
@example(name="🚀" * 150, slug="rocket", prompt="x" * 2000, negative="%00 <script>")
@example(name=" 4 ", slug=" 4 ", prompt="\x11P", negative="-1")
def test_persona_form_rejects_or_stores_hostile_text_and_image_paths_stay_ours(
    admin_client, device_factory, name, slug, prompt, negative
):
    device = device_factory("H100")
    existing = set(Persona.objects.values_list("pk", flat=True))
    try:
        post_persona_and_check_it(admin_client, device, len(existing), name, slug, prompt, negative)
    finally:
        # Every example starts from the same database: an earlier example's slug must not turn
        # this one's success into "slug already exists" when Hypothesis replays a failure.
        Persona.objects.exclude(pk__in=existing).delete()


def post_persona_and_check_it(admin_client, device, before, name, slug, prompt, negative) -> None:
    response = admin_client.post(
        reverse("admin:personas_persona_add"),
        {
            "name": name,
            "slug": slug,
            "description": prompt,
            "appearance_prompt": prompt,
            "negative_prompt": negative,
            "default_sample_count": "1",
            "base_seed": "7",
        },
    )
    assert response.status_code in (200, 302)
    if response.status_code == 200:
        assert Persona.objects.count() == before, "a rejected form writes nothing"
        return
    persona = Persona.objects.latest("pk")
    assert persona.name == name.strip(), "Django's CharField strips surrounding whitespace and keeps the rest"
    assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", persona.slug)
    make_one_image(persona, device)
    media = Path(settings.MEDIA_ROOT).resolve()
    assert SampleImage.objects.filter(persona=persona).count() == 1
    for image in SampleImage.objects.filter(persona=persona):
        assert SAFE_PATH.fullmatch(image.image.name), image.image.name
        assert (media / image.image.name).resolve().is_relative_to(media)


def test_a_hostile_but_valid_persona_is_stored_and_its_image_path_is_ours(admin_client, device_factory):
    # The property above returns early for every rejected form: make sure the stored path is checked.
    name = "../../etc/passwd \u202e🙂"
    post_persona_and_check_it(admin_client, device_factory("H100"), 0, name, "evil-slug", "a portrait ../", "../")
    persona = Persona.objects.get(slug="evil-slug")
    assert persona.name == name
    assert SampleImage.objects.filter(persona=persona).count() == 1


def make_one_image(persona: Persona, device) -> None:
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated:0"}
    submitted = sample_request_submit(persona=persona, count=1, device=device, enqueue=False, require_worker=False)
    info = DeviceInfo(uuid=device.uuid, name=device.name, kind="simulated", index=device.index)
    context = build_context(info, None, attach_worker=False)
    for assignment in submitted.assignments:
        sample_assignment_run(assignment_id=assignment.pk, context=context)


@FAST
@given(persona_arg=TEXT, count=st.one_of(st.none(), COUNTS), device=st.one_of(st.none(), TEXT))
@example(persona_arg="a\x00b", count=None, device="x\x00y")
@example(persona_arg="¹", count="²", device="³")
def test_regenerate_samples_turns_hostile_options_into_command_errors(
    persona, device_factory, persona_arg, count, device
):
    device_factory("H100")
    args = ["--persona", persona_arg, "--dry-run"]
    if count is not None:
        args += ["--count", count]
    if device is not None:
        args += ["--device", device]
    try:
        call_command("regenerate_samples", *args, stdout=StringIO(), stderr=StringIO())
    except CommandError as exc:
        assert str(exc) and "Traceback" not in str(exc)
    else:
        # Accepted only where the options are good: the persona named and a count (if any) in range.
        assert persona_arg.strip() in (persona.slug, str(persona.pk)), persona_arg
    assert not SampleRequest.objects.exists(), "a dry run writes nothing, a refused one neither"


@pytest.mark.parametrize("value", ["0", "17", "-3", "abc", "1e3", "99999999999999999999999"])
def test_regenerate_samples_count_errors_say_what_is_allowed(persona, value):
    with pytest.raises(CommandError, match="from 1 to 16"):
        call_command("regenerate_samples", "--persona", persona.slug, "--count", value, "--dry-run")


@pytest.mark.parametrize(
    "url",
    [
        "/admin/personas/persona/",
        "/admin/personas/samplerequest/",
        "/admin/gpuscheduler/assignment/",
        "/admin/gpuscheduler/device/",
        "/admin/gpuscheduler/gpustatuspage/",
    ],
)
@pytest.mark.parametrize("value", ["%00", "a%00b", "..%2F..%2Fetc", "%E2%80%AEgnp", "9" * 30])
def test_admin_lists_answer_hostile_search_and_filters_without_a_500(admin_client, persona, url, value):
    response = admin_client.get(f"{url}?q={value}&device={value}&state={value}")
    assert response.status_code in (200, 302)
