"""The papercuts of a newcomer's walk (issue 11, item 5): each as the newcomer would meet it."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from datetime import timedelta
from io import StringIO
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from gpuscheduler import simulated
from gpuscheduler.models import Assignment, AssignmentState, Snapshot
from gpuscheduler.simulated import SimulatedBackend, busy
from gpuscheduler.status import status_page
from personas import runner
from personas.models import RequestState, SampleImage, SampleRequest
from personas.selectors import request_progress
from personas.services import sample_request_submit

ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r"\[[#.]{30}\] \d+/\d+ images, \d+ request\(s\) active")


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


# --- regenerate_samples --wait ---------------------------------------------------------------------


@pytest.fixture
def images_arrive(monkeypatch, settings):
    """Instead of sleeping between polls, the wait finds one more image of the newest request each
    time (and a log record on the way), then the request succeeded: no workers needed."""

    def meanwhile(seconds: float) -> None:
        request = SampleRequest.objects.order_by("-pk").first()
        made = SampleImage.objects.filter(request=request).count()
        if made < request.count:
            SampleImage.objects.create(
                persona=request.persona,
                request=request,
                index=made,
                image=f"samples/x-{request.pk}-{made}.png",
                seed=made,
                prompt="p",
                model="m",
                device=Assignment.objects.filter(request=request).first().planned_device,
            )
            logging.getLogger("personas.test").warning("image %d of the request is in", made + 1)
        else:
            SampleRequest.objects.filter(pk=request.pk).update(state=RequestState.SUCCEEDED)

    monkeypatch.setattr(runner.time, "sleep", meanwhile)


def test_wait_progress_off_a_terminal_is_plain_lines_on_stdout(persona, device_factory, redis_db, images_arrive):
    device = device_factory("H100")
    out, err = StringIO(), StringIO()

    call_command("regenerate_samples", "--persona", persona.slug, "--count", "2", "--wait", stdout=out, stderr=err)

    lines = out.getvalue().splitlines()
    assert [line for line in lines if BAR.fullmatch(line)] == [
        f"[{'.' * 30}] 0/2 images, 1 request(s) active",
        f"[{'#' * 15}{'.' * 15}] 1/2 images, 1 request(s) active",
        f"[{'#' * 30}] 2/2 images, 1 request(s) active",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert "images, " not in err.getvalue(), "the bar is output, not an error"
    assert f"  {device.label}: 2 images ({device.uuid})" in lines


def test_wait_progress_on_a_terminal_redraws_one_line_and_logs_start_their_own(
    persona, device_factory, redis_db, images_arrive
):
    device_factory("H100")
    out = Terminal()

    call_command(
        "regenerate_samples", "--persona", persona.slug, "--count", "2", "--wait", stdout=out, stderr=StringIO()
    )

    text = out.getvalue()
    assert text.count("\r\x1b[K[") == 3, "drawn three times, each over the line before"
    # Each log record (on stderr) first ends the bar's line, so it never lands inside the bar;
    # the summary starts on a line of its own.
    drawn = text[text.index("\r") :]
    assert re.fullmatch(
        r"(\r\x1b\[K\[[#.]{30}\] \d/2 images, 1 request\(s\) active\n){3}2 of 2 images made, 0 failed, .*\n.*\n",
        drawn,
    ), repr(drawn)


def test_json_names_each_device_by_label_with_its_uuid_beside_it(persona, device_factory, redis_db, images_arrive):
    device = device_factory("T4")
    out = StringIO()

    call_command("regenerate_samples", "--persona", persona.slug, "--count", "2", "--wait", "--json", stdout=out)

    summary = json.loads(out.getvalue())
    assert summary["by_device"] == [{"label": device.label, "uuid": device.uuid, "images": 2}]
    assert {(i["device"], i["device_label"]) for i in summary["images"]} == {(device.uuid, device.label)}


# --- wording -----------------------------------------------------------------------------------------


def test_one_image_is_queued_as_one_image(transactional_db, admin_client, persona, device_factory, redis_db):
    device = device_factory("H100")
    response = admin_client.post(reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": "1"})
    (message,) = [m.message for m in get_messages(response.wsgi_request)]
    assert message == f"Queued 1 image of {persona.name}: 1 on {device.label}."


def test_placement_log_line_names_the_images_once(persona, device_factory, caplog):
    device_factory("H100")
    with caplog.at_level(logging.INFO, logger="gpuscheduler.placement"):
        request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    lines = [r.getMessage() for r in caplog.records if r.name == "gpuscheduler.placement"]
    assert any(line.startswith(f"request {request.pk}, images 1-2 (attempt 1) -> gpu.") for line in lines), lines
    assert not any("images images" in line for line in lines)


# --- the persona page ------------------------------------------------------------------------------------


def test_the_summary_runs_as_soon_as_an_attempt_runs(persona, device_factory):
    device_factory("H100")
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    # A worker has claimed the attempt and not yet marked the request started.
    Assignment.objects.filter(request=request).update(state=AssignmentState.RUNNING)
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED

    data = request_progress(request=SampleRequest.objects.get(pk=request.pk))

    assert (data["state"], data["state_label"]) == ("running", "Running")
    assert {a["state"] for a in data["attempts"]} == {"running"}


def test_progress_comes_before_the_form_and_cancel_knows_what_runs(admin_client, persona, device_factory):
    device_factory("H100")
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    Assignment.objects.filter(request=request).update(state=AssignmentState.RUNNING)

    page = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk])).content.decode()

    # Under the Generate button, before the form: where the admin looks after a press.
    assert (
        page.index('id="generate-samples-form"') < page.index('id="sample-progress"') < page.index('id="persona_form"')
    )
    assert page.index('id="persona_form"') < page.index('id="sample-gallery"')
    assert 'id="request-state">Running<' in page
    # samples.js asks before cancelling while jobs make images (the form stays a POST with its token).
    form = re.search(r'<form method="post" action="[^"]*/cancel/" id="cancel-request-form"[^>]*>', page)
    assert form is not None and 'data-running="1"' in form.group(0)
    script = (ROOT / "personas/static/personas/samples.js").read_text()
    assert 'addEventListener("submit", confirmCancel)' in script and "window.confirm(" in script


def test_default_sample_count_allows_only_one_to_the_maximum(admin_client, persona, settings):
    settings.SAMPLES = {**settings.SAMPLES, "MAX_PER_REQUEST": 16}
    url = reverse("admin:personas_persona_change", args=[persona.pk])
    page = admin_client.get(url).content.decode()
    field = re.search(r'<input type="number" name="default_sample_count"[^>]*>', page)
    assert field is not None
    assert 'min="1"' in field.group(0) and 'max="16"' in field.group(0)

    data = {
        "name": persona.name,
        "slug": persona.slug,
        "appearance_prompt": persona.appearance_prompt,
        "negative_prompt": "",
        "image_model": "",
        "default_sample_count": "-1",
        "base_seed": "0",
    }
    response = admin_client.post(url, data)
    errors = response.context["adminform"].form.errors["default_sample_count"]
    assert errors == ["The count must be from 1 to 16 (SAMPLES_MAX_PER_REQUEST); -1 is out of range."]


def test_admin_pages_name_the_product_and_carry_its_icon(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert "<title>Site administration | Persona samples</title>" in page
    assert re.search(r'id="site-name"><a href="/admin/">Persona samples</a>', page)
    assert re.search(r'<link rel="icon" href="[^"]*personas/favicon\.svg" type="image/svg\+xml">', page)
    assert (ROOT / "personas/static/personas/favicon.svg").read_text().startswith("<svg")


# --- the status page ----------------------------------------------------------------------------------


def test_recent_assignments_say_why_they_went_where_they_went(admin_client, persona, device_factory):
    device = device_factory("H100")
    sample_request_submit(persona=persona, count=1, enqueue=False)
    reason = Assignment.objects.get().reason
    assert reason

    page = admin_client.get(reverse("admin:gpuscheduler_gpustatuspage_changelist")).content.decode()

    assert "<th>Why there</th>" in page
    row = re.search(r'<tr class="assignment[^"]*" data-assignment="\d+">(.*?)</tr>', page, re.S)
    assert row is not None and device.label in row.group(1)
    assert f'<td class="gpu-reason">{escape(reason)}</td>' in row.group(1)


def test_charts_zoom_to_the_minutes_that_have_data_and_label_their_scale(device_factory):
    device = device_factory("H100")
    now = timezone.now()
    Snapshot.objects.bulk_create(
        Snapshot(device=device, taken_at=now - timedelta(seconds=s), utilization=50.0, health="healthy")
        for s in range(0, 170, 10)
    )

    page = status_page(now=now)

    assert page["window_seconds"] == 300
    assert [t["label"] for t in page["chart"]["ticks"]] == ["-5 min", "-4 min", "-3 min", "-2 min", "-1 min", "now"]
    assert [t["label"] for t in page["chart"]["y_ticks"]] == ["100", "50", "0"]
    assert "°C" in page["chart"]["y_label"]
    # The line starts 170 s before now: at 130 s into the 300 s window, not in the last 5 % of an hour.
    (card,) = page["devices"]
    first_x = float(card["chart"]["lines"]["utilization"].split(",")[0][1:])
    assert 200 < first_x < 300


def test_charts_keep_the_hour_when_the_hour_has_data(device_factory):
    device = device_factory("H100")
    now = timezone.now()
    Snapshot.objects.create(device=device, taken_at=now - timedelta(minutes=50), utilization=5.0, health="healthy")
    assert status_page(now=now)["window_seconds"] == 3600


def test_status_page_svg_shows_the_scale(admin_client, device_factory):
    device = device_factory("H100")
    Snapshot.objects.create(device=device, taken_at=timezone.now(), utilization=5.0, health="healthy")
    page = admin_client.get(reverse("admin:gpuscheduler_gpustatuspage_changelist")).content.decode()
    assert re.search(r'<text class="tick y-tick" x="2" y="[\d.]+">100</text>', page)
    assert "% busy · % memory · °C</text>" in page


def test_a_device_busy_with_short_calls_reads_busy_between_them(monkeypatch, settings):
    """The tiny model's calls take a fraction of a second; the monitor's reading nearly always
    fell between two, and a T4 working flat out showed 0 % and gpu_idle."""
    now = [1_000_000.0]
    monkeypatch.setattr(simulated, "time", SimpleNamespace(time=lambda: now[0]))
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MONITOR_INTERVAL": 2.0}
    backend = SimulatedBackend("T4:0.25", host="testhost")
    uuid = backend.devices()[0].uuid
    for _ in range(4):  # 0.3 s calls with 0.2 s between them
        with busy(uuid, 1):
            now[0] += 0.3
        now[0] += 0.2

    (reading,) = backend.read()

    assert reading.utilization == pytest.approx(60.0)
    assert "gpu_idle" not in reading.throttle_reasons
    now[0] += 5  # then nothing for longer than a sample period: idle
    (later,) = backend.read()
    assert (later.utilization, later.throttle_reasons) == (0.0, ("gpu_idle",))


# --- make run ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_later_make_run_names_the_admin_to_log_in_as():
    spec = importlib.util.spec_from_file_location("make_run", ROOT / "scripts" / "run.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = "Demo personas: 3 created.\nAdmin login: username 'admin', password 'x' (generated)"
    assert module.login_lines(first) == first.splitlines()

    get_user_model().objects.create_superuser(username="ops", email="", password="pw-123456")
    later = module.login_lines("A superuser exists already: log in with it (or `python manage.py changepassword`).")
    assert later[-1].startswith("Admin login: username 'ops', with the password printed on the first run")
    assert "manage.py changepassword ops" in later[-1]
