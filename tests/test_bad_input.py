"""Property-based: hostile input to the button, the persona form and the command never breaks anything."""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.messages import get_messages
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config.env import env_int
from config.numbers import is_ascii_int
from gpuscheduler.backends import DeviceInfo
from gpuscheduler.worker import build_context
from personas.attempts import sample_assignment_run
from personas.models import Persona, SampleImage, SampleRequest
from personas.services import sample_request_submit, validate_count
from tests.media import media_root

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
    media = media_root().resolve()
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


# --- numbers are ASCII digits: counts and ids anywhere -------------------------------------------

# Python's int() reads every one of these as a number; none is one here.
NOT_ASCII_COUNTS = ["٤", "\uff14", "\U0001d7d2", "1_6", "+4"]  # Arabic-Indic, full-width, bold 4
# The zero of every other set of decimal digits int() reads (Arabic-Indic, Devanagari, full width...).
OTHER_ZEROS = [chr(c) for c in range(0x80, sys.maxunicode + 1) if unicodedata.decimal(chr(c), None) == 0]


def in_digits(number: int, zero: str = "\u0660") -> str:
    """The number in another script's digits: Arabic-Indic unless another zero is given."""
    return "".join(chr(ord(zero) + int(d)) for d in str(number))


def test_the_digit_sets_under_test_are_numbers_to_python():
    assert len(OTHER_ZEROS) > 50
    assert [int(in_digits(123, zero)) for zero in OTHER_ZEROS] == [123] * len(OTHER_ZEROS)


@FAST
@given(number=st.integers(min_value=1, max_value=16), zero=st.sampled_from(OTHER_ZEROS))
def test_a_count_in_any_other_digits_is_never_read_as_a_number(number, zero):
    text = in_digits(number, zero)
    with pytest.raises(ValidationError, match="Write it with the digits 0-9, like 4"):
        validate_count(text)
    assert not is_ascii_int(text)
    assert validate_count(f" {number} ") == number


@pytest.mark.parametrize("count", NOT_ASCII_COUNTS)
def test_the_button_refuses_a_count_not_written_with_ascii_digits(admin_client, persona, device_factory, count):
    device_factory("H100", worker=True)
    response = admin_client.post(reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": count})
    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "Nothing was queued. Count: The count must be a whole number from 1 to 16. "
        f"Write it with the digits 0-9, like 4; got {count!r}."
    ]
    assert not SampleRequest.objects.exists()


@pytest.mark.parametrize("field", ["default_sample_count", "base_seed"])
@pytest.mark.parametrize("value", NOT_ASCII_COUNTS)
def test_the_persona_form_refuses_numbers_not_written_with_ascii_digits(admin_client, persona_factory, field, value):
    persona = persona_factory(default_sample_count=2, base_seed=7)
    data = {
        "name": persona.name,
        "slug": persona.slug,
        "appearance_prompt": persona.appearance_prompt,
        "default_sample_count": "2",
        "base_seed": "7",
        field: value,
    }
    response = admin_client.post(reverse("admin:personas_persona_change", args=[persona.pk]), data)
    assert response.status_code == 200
    assert f"The number must be written with the digits 0-9, like 4; got {value!r}." in html.unescape(
        response.content.decode()
    )
    persona.refresh_from_db()
    assert (persona.default_sample_count, persona.base_seed) == (2, 7)


@pytest.mark.parametrize("count", NOT_ASCII_COUNTS)
def test_regenerate_samples_refuses_a_count_not_written_with_ascii_digits(persona, device_factory, count):
    device_factory("H100")
    with pytest.raises(CommandError, match="Write it with the digits 0-9, like 4"):
        call_command("regenerate_samples", "--persona", persona.slug, "--count", count, "--dry-run")


@pytest.mark.parametrize(
    ("url_name", "method", "expected"),
    [
        ("change", "get", 302),  # the admin's "Persona with ID … doesn't exist" redirect
        ("history", "get", 302),
        ("delete", "get", 302),
        ("generate", "post", 404),
        ("progress", "get", 404),
    ],
)
def test_a_persona_id_in_other_digits_finds_no_persona_in_admin_urls(
    admin_client, persona, device_factory, url_name, method, expected
):
    device_factory("H100", worker=True)
    url = reverse(f"admin:personas_persona_{url_name}", args=[in_digits(persona.pk)])
    response = getattr(admin_client, method)(url, {"count": "2"} if method == "post" else {})
    assert response.status_code == expected
    if expected == 302:
        assert response["Location"] == reverse("admin:index")
    assert not SampleRequest.objects.exists()
    # The same URL with the ASCII id finds it: the refusal is about the digits, not the persona.
    assert admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).status_code == 200


def test_a_device_id_in_other_digits_finds_no_device(admin_client, device_factory):
    device = device_factory("H100")
    response = admin_client.get(reverse("admin:gpuscheduler_device_change", args=[in_digits(device.pk)]))
    assert (response.status_code, response["Location"]) == (302, reverse("admin:index"))


@pytest.mark.parametrize(
    ("url_name", "query"),
    [
        ("personas_samplerequest_changelist", "persona__id__exact={persona}"),
        ("personas_samplerequest_changelist", "persona={persona}"),
        ("gpuscheduler_assignment_changelist", "device__id__exact={device}"),
        ("gpuscheduler_assignment_changelist", "device={device}"),
        ("personas_persona_changelist", "id__in=1,{persona}"),
        ("personas_persona_changelist", "p=٢"),
        ("personas_persona_changelist", "o=٢"),
        ("gpuscheduler_assignment_changelist", "queued_at__year=٢٠٢٦"),
    ],
)
def test_list_filters_in_other_digits_are_bad_lookups_not_matches(
    admin_client, persona, device_factory, url_name, query
):
    device = device_factory("H100")
    url = reverse(f"admin:{url_name}")
    response = admin_client.get(f"{url}?{query.format(persona=in_digits(persona.pk), device=in_digits(device.pk))}")
    assert (response.status_code, response["Location"]) == (302, f"{url}?e=1")


def test_a_filter_in_other_digits_with_the_error_flag_shows_the_error_page_not_the_matches(admin_client, persona):
    SampleRequest.objects.create(persona=persona, count=2, first_seed=0, model="tiny", steps=2, state="succeeded")
    url = reverse("admin:personas_samplerequest_changelist")
    response = admin_client.get(f"{url}?e=1&persona__id__exact={in_digits(persona.pk)}")
    assert response.status_code == 200
    assert "Database error" in response.content.decode()
    assert persona.name not in response.content.decode()


def test_the_gpu_status_page_ignores_a_device_filter_in_other_digits(admin_client, device_factory):
    device = device_factory("H100")
    url = reverse("admin:gpuscheduler_gpustatuspage_data")
    assert admin_client.get(url, {"device": str(device.pk)}).json()["filters"]["device"] == device.pk
    assert admin_client.get(url, {"device": in_digits(device.pk)}).json()["filters"]["device"] is None


def test_the_button_refuses_a_device_id_in_other_digits(admin_client, persona, device_factory):
    device = device_factory("H100", worker=True)
    url = reverse("admin:personas_persona_generate", args=[persona.pk])
    response = admin_client.post(url, {"count": "2", "device": in_digits(device.pk)})
    (message,) = [str(m) for m in get_messages(response.wsgi_request)]
    assert message.startswith("Nothing was queued. Device: That device does not exist")
    assert not SampleRequest.objects.exists()


def test_regenerate_samples_refuses_a_persona_id_in_other_digits(persona, device_factory):
    device_factory("H100")
    with pytest.raises(CommandError, match="Ids and indexes are written with the digits 0-9"):
        call_command("regenerate_samples", "--persona", in_digits(persona.pk), "--dry-run")


def test_regenerate_samples_refuses_a_device_index_in_other_digits(persona, device_factory):
    device = device_factory("H100", worker=True)
    with pytest.raises(CommandError, match=r"Unknown device .*Ids and indexes are written with the digits 0-9"):
        call_command("regenerate_samples", "--persona", persona.slug, "--device", in_digits(device.index), "--dry-run")
    call_command("regenerate_samples", "--persona", persona.slug, "--device", str(device.index), "--dry-run")


@pytest.mark.parametrize("value", [in_digits(16), in_digits(16, "\uff10"), "1_6", "+16"])
def test_settings_refuse_whole_numbers_not_written_with_ascii_digits(monkeypatch, value):
    monkeypatch.setenv("SAMPLES_MAX_PER_REQUEST", value)
    with pytest.raises(ImproperlyConfigured, match=re.escape("is not a whole number: set it to e.g. 16 (the digits")):
        env_int("SAMPLES_MAX_PER_REQUEST", 16)
