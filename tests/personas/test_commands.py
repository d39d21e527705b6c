"""The management commands through call_command: regenerate_samples, gpustatus, demo_data, gpumonitor."""

from __future__ import annotations

import json
import re
import signal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from gpuscheduler import queues, simulated
from gpuscheduler.models import Assignment, AssignmentState, Device, Health, Snapshot
from personas.image_models import default_model
from personas.imagegen import Generator
from personas.models import ImageModel, Persona, RequestState, SampleImage, SampleRequest
from tests.media import media_root, stored_bytes


def run(*args: str, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def sync_settings(settings, monkeypatch, db):
    """--sync on the two simulated test devices with the instant simulated model (the default
    model's: SAMPLES_MODEL only seeds a default model where there is none)."""
    settings.SAMPLES = {**settings.SAMPLES, "MODEL": "simulated:0"}
    ImageModel.objects.filter(pk=default_model().pk).update(source="simulated:0")
    # The in-process heartbeat thread must not beat during these short runs: its own database
    # connection would wait on the test's open transaction.
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "HEARTBEAT_INTERVAL": 60.0, "LEASE_SECONDS": 180.0}
    # --sync binds this process to its device through these variables: give them back afterwards.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return settings


def sim_uuid(settings: Any, index: int) -> str:
    return simulated.simulated_uuid(settings.GPUSCHEDULER["HOST"], index, "sim")


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    queues._connection.cache_clear()
    yield
    queues._connection.cache_clear()


@pytest.fixture
def keep_signal_handlers():
    """gpumonitor installs SIGTERM/SIGINT handlers; the test process keeps its own."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# --- regenerate_samples --sync ----------------------------------------------------------------


def test_sync_json_makes_the_images_in_this_process_and_reports_them(sync_settings, persona):
    out, err = run("regenerate_samples", "--persona", "ada-lovelace", "--count", "3", "--sync", "--json")

    summary = json.loads(out)
    assert (summary["requested"], summary["succeeded"], summary["failed"]) == (3, 3, 0)
    assert isinstance(summary["seconds"], float) and 0 <= summary["seconds"] < 60
    ((label, device_uuid, made),) = [(row["label"], row["uuid"], row["images"]) for row in summary["by_device"]]
    assert made == 3
    assert label == Device.objects.get(uuid=device_uuid).label
    assert device_uuid in {sim_uuid(sync_settings, 0), sim_uuid(sync_settings, 1)}
    assert [image["seed"] for image in summary["images"]] == [persona.base_seed + k for k in range(3)]
    for image in summary["images"]:
        assert image["persona"] == "ada-lovelace"
        assert image["device"] == device_uuid
        # The name in the samples storage, and (a folder storage) the file's local path.
        assert image["name"].startswith(f"samples/persona-{persona.pk}/")
        assert stored_bytes(image["name"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(image["path"]) == media_root() / image["name"]
    assert "--sync: generating on" in err
    request = SampleRequest.objects.get()
    assert request.state == RequestState.SUCCEEDED
    assert SampleImage.objects.filter(request=request).count() == 3


def test_sync_without_json_prints_a_summary(sync_settings, persona_factory):
    persona_factory(slug="first", default_sample_count=2)
    persona_factory(slug="second", default_sample_count=1)

    out, _ = run("regenerate_samples", "--all", "--sync")

    assert "3 of 3 images made, 0 failed" in out
    assert re.search(r"  SIM \d sim: 3 images \(SIM-\S+\)", out)
    assert SampleImage.objects.count() == 3


def test_sync_on_a_named_device_uses_that_device(sync_settings, persona):
    second = sim_uuid(sync_settings, 1)
    out, _ = run(
        "regenerate_samples", "--persona", str(persona.pk), "--count", "2", "--sync", "--device", second, "--json"
    )
    label = Device.objects.get(uuid=second).label
    assert json.loads(out)["by_device"] == [{"label": label, "uuid": second, "images": 2}]


def test_a_failed_image_makes_the_command_exit_with_status_1(sync_settings, persona):
    sync_settings.SAMPLES = {**sync_settings.SAMPLES, "MAX_ATTEMPTS": 1}
    uuid = sim_uuid(sync_settings, 0)
    simulated.set_faults(uuid, fail="x")
    out = StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command(
            "regenerate_samples",
            "--persona",
            "ada-lovelace",
            "--count",
            "2",
            "--sync",
            "--device",
            uuid,
            "--json",
            stdout=out,
            stderr=StringIO(),
        )

    assert exit_info.value.code == 1
    summary = json.loads(out.getvalue())
    assert (summary["requested"], summary["succeeded"], summary["failed"]) == (2, 0, 2)
    assert SampleRequest.objects.get().state == RequestState.FAILED
    assert "simulated failure: x" in Assignment.objects.get(state=AssignmentState.FAILED).error


def test_a_failed_attempt_is_retried_in_the_sync_run(sync_settings, persona, monkeypatch):
    # The first attempt fails on a device that then recovers: the retry runs and the images are made.
    sync_settings.SAMPLES = {**sync_settings.SAMPLES, "MAX_ATTEMPTS": 2}
    uuid = sim_uuid(sync_settings, 0)
    simulated.set_faults(uuid, fail="flaky")
    real_generate = Generator.generate

    def generate_once_broken(self, **kwargs):
        try:
            return real_generate(self, **kwargs)
        finally:
            simulated.clear_faults(uuid)

    monkeypatch.setattr(Generator, "generate", generate_once_broken)
    out, _ = run(
        "regenerate_samples", "--persona", "ada-lovelace", "--count", "2", "--sync", "--device", uuid, "--json"
    )

    assert json.loads(out)["succeeded"] == 2
    assert sorted(Assignment.objects.values_list("attempt", "state")) == [
        (1, AssignmentState.RETRIED),
        (2, AssignmentState.SUCCEEDED),
    ]


# --- regenerate_samples without --sync ------------------------------------------------------


def test_dry_run_shows_the_plan_and_writes_nothing(persona, device_factory):
    first, second = device_factory("H100"), device_factory("H100")

    out, _ = run("regenerate_samples", "--persona", "ada-lovelace", "--count", "4", "--dry-run")

    assert f"ada-lovelace: 2 images -> {first.uuid}" in out
    assert f"ada-lovelace: 2 images -> {second.uuid}" in out
    assert "Dry run: nothing was written or queued." in out
    assert SampleRequest.objects.count() == 0
    assert Assignment.objects.count() == 0
    persona.refresh_from_db()
    assert persona.images_requested == 0


def test_dry_run_json_lists_the_plan(persona_factory, device_factory):
    persona_factory(slug="one")
    persona_factory(slug="two")
    device = device_factory("H100")

    out, _ = run("regenerate_samples", "--all", "--count", "2", "--dry-run", "--json")

    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["requested"] == 4
    assert [(row["persona"], row["images"], row["device"]) for row in plan["plan"]] == [
        ("one", 2, device.uuid),
        ("two", 2, device.uuid),
    ]
    assert SampleRequest.objects.count() == 0


def test_queued_requests_are_reported_without_waiting(
    persona, device_factory, redis_db, django_capture_on_commit_callbacks
):
    device = device_factory("H100")
    with django_capture_on_commit_callbacks(execute=True):
        out, _ = run("regenerate_samples", "--persona", "ada-lovelace", "--count", "2", "--json")

    summary = json.loads(out)
    assert (summary["requested"], summary["succeeded"], summary["pending"]) == (2, 0, 2)
    (assignment,) = Assignment.objects.all()
    assert queues.queue_job_ids(assignment.queue_name, redis_db) == {assignment.job_id}
    assert assignment.planned_device == device


def test_an_active_request_is_skipped_and_the_exit_status_is_1(persona, device_factory, redis_db):
    device_factory("H100")
    run("regenerate_samples", "--persona", "ada-lovelace", "--count", "2")
    with pytest.raises(SystemExit) as exit_info:
        run("regenerate_samples", "--persona", "ada-lovelace", "--count", "2")
    assert exit_info.value.code == 1
    assert SampleRequest.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--persona", "nobody"], "Unknown persona nobody: give a persona id or slug"),
        (["--persona", "999999"], "Unknown persona 999999"),
        ([], "Name the personas with --persona ID_OR_SLUG (repeatable), or use --all."),
        (["--all", "--persona", "ada-lovelace"], "Use --persona or --all, not both."),
        (["--persona", "ada-lovelace", "--count", "0"], "--count: The count must be from 1 to 16"),
        (["--persona", "ada-lovelace", "--count", "abc"], "--count: The count must be a whole number from 1 to 16."),
        (["--persona", "ada-lovelace", "--count", "99999"], "--count: The count must be from 1 to 16"),
        (["--persona", "ada-lovelace", "--device", "no-such-gpu"], "Unknown device 'no-such-gpu'"),
        (["--persona", "ada-lovelace", "--device", "no-such-gpu", "--dry-run"], "Unknown device 'no-such-gpu'"),
        (["--persona", "ada-lovelace", "--device", "no-such-gpu", "--sync"], "No single device of this host matches"),
        (["--persona", "ada-lovelace", "--wait", "--timeout", "0"], "--timeout must be between 0 and 604800 seconds."),
        (["--persona", "ada-lovelace", "--timeout", "60"], "--timeout applies only to --wait"),
        (["--persona", "ada-lovelace", "--sync", "--timeout", "60"], "--timeout applies only to --wait"),
        (["--persona", "ada-lovelace", "--dry-run", "--timeout", "60"], "--timeout applies only to --wait"),
    ],
)
def test_bad_arguments_are_command_errors(persona, device_factory, args, message):
    device_factory("H100")
    with pytest.raises(CommandError) as error:
        run("regenerate_samples", *args)
    assert message in str(error.value)
    assert SampleRequest.objects.count() == 0


def test_a_huge_unknown_persona_name_is_not_echoed_in_full(persona):
    with pytest.raises(CommandError) as error:
        run("regenerate_samples", "--persona", "x" * 5000)
    assert len(str(error.value)) < 300


def test_all_without_personas_says_how_to_make_some(db):
    with pytest.raises(CommandError, match="There are no personas"):
        run("regenerate_samples", "--all")


def test_no_healthy_device_skips_every_persona_with_the_reason_and_exits_1(persona, device_factory, redis_db):
    device_factory("H100", health=Health.UNHEALTHY, health_reason="NVML error: lost")
    out, err = StringIO(), StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command(
            "regenerate_samples", "--persona", "ada-lovelace", "--count", "1", "--json", stdout=out, stderr=err
        )

    assert exit_info.value.code == 1
    (skipped,) = json.loads(out.getvalue())["skipped"]
    assert skipped.startswith("Ada Lovelace was not queued: No healthy device can take work now")
    assert "NVML error: lost" in skipped
    assert "No healthy device can take work now" in err.getvalue()
    assert SampleRequest.objects.count() == 0


def test_when_devices_fail_midway_the_queued_personas_are_reported_and_the_rest_skipped(
    persona_factory, device_factory, redis_db, monkeypatch
):
    from personas.management.commands import regenerate_samples

    for slug in ("one", "two", "three"):
        persona_factory(slug=slug, name=slug.title())
    device = device_factory("H100")
    submit = regenerate_samples.sample_request_submit

    def submit_then_overheat(**kwargs: Any) -> Any:
        submitted = submit(**kwargs)
        Device.objects.filter(pk=device.pk).update(health=Health.UNHEALTHY, health_reason="92 C")
        return submitted

    monkeypatch.setattr(regenerate_samples, "sample_request_submit", submit_then_overheat)
    out, err = StringIO(), StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command("regenerate_samples", "--all", "--count", "2", "--json", stdout=out, stderr=err)

    assert exit_info.value.code == 1
    summary = json.loads(out.getvalue())
    assert [(r["persona"], r["count"], r["state"]) for r in summary["requests"]] == [("one", 2, "queued")]
    assert summary["requested"] == 2
    assert [s.split(":", 1)[0] for s in summary["skipped"]] == ["Two was not queued", "Three was not queued"]
    assert all("92 C" in s for s in summary["skipped"])
    assert "not queued (Two, Three): No healthy device can take work now" in err.getvalue()
    assert SampleRequest.objects.count() == 1


def test_when_devices_fail_midway_the_text_report_still_lists_what_was_queued(
    persona_factory, device_factory, redis_db, monkeypatch
):
    from personas.management.commands import regenerate_samples

    persona_factory(slug="one", name="One")
    persona_factory(slug="two", name="Two")
    device = device_factory("H100")
    submit = regenerate_samples.sample_request_submit

    def submit_then_lose_the_device(**kwargs: Any) -> Any:
        submitted = submit(**kwargs)
        Device.objects.filter(pk=device.pk).update(health=Health.UNHEALTHY, health_reason="GPU is lost")
        return submitted

    monkeypatch.setattr(regenerate_samples, "sample_request_submit", submit_then_lose_the_device)
    out, err = StringIO(), StringIO()

    with pytest.raises(SystemExit):
        call_command("regenerate_samples", "--all", "--count", "2", stdout=out, stderr=err)

    assert out.getvalue().startswith("queued 2 images of One")
    assert "not queued (Two)" in err.getvalue()


def test_redis_down_is_a_command_error_that_suggests_sync(persona, device_factory, redis_down):
    device_factory("H100")
    with pytest.raises(CommandError) as error:
        run("regenerate_samples", "--persona", "ada-lovelace", "--count", "1")
    assert "Redis does not answer" in str(error.value)
    assert "--sync" in str(error.value)
    assert SampleRequest.objects.count() == 0


# --- gpustatus ----------------------------------------------------------------------------------


@pytest.fixture
def status_devices(device_factory):
    healthy = device_factory("H100", memory_total=80 * 1024**3)
    lost = device_factory("H100", health=Health.UNHEALTHY, health_reason="NVML error: NVMLError_GpuIsLost: GPU is lost")
    Snapshot.objects.create(
        device=healthy,
        taken_at=timezone.now(),
        memory_used=12 * 1024**3,
        memory_total=80 * 1024**3,
        utilization=55.0,
        temperature=61.0,
        power_watts=250.0,
        throttle_reasons="sw_power_cap",
        health=Health.HEALTHY,
    )
    return healthy, lost


def test_gpustatus_prints_a_table_with_readings_and_unhealthy_reasons(status_devices):
    healthy, lost = status_devices
    out, _ = run("gpustatus")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "UUID", "HEALTH", "MEMORY"]
    row = next(line for line in lines if line.startswith(healthy.label))
    assert "healthy" in row and "12.0/80 GiB" in row and "55%" in row and "61C" in row and "250W" in row
    assert "missing" in row, "no worker is attached"
    assert any(line.startswith(lost.label) and "unhealthy" in line for line in lines)
    assert "why: NVML error: NVMLError_GpuIsLost: GPU is lost" in out


def test_gpustatus_json_lists_every_device_with_its_latest_snapshot(status_devices):
    healthy, lost = status_devices
    out, _ = run("gpustatus", "--json")
    devices = {row["uuid"]: row for row in json.loads(out)["devices"]}
    assert set(devices) == {healthy.uuid, lost.uuid}
    snap = devices[healthy.uuid]["snapshot"]
    assert (snap["memory_used"], snap["utilization"], snap["throttle_reasons"]) == (
        12 * 1024**3,
        55.0,
        ["sw_power_cap"],
    )
    assert devices[lost.uuid]["snapshot"] is None
    assert (devices[lost.uuid]["health"], devices[lost.uuid]["health_reason"]) == (
        "unhealthy",
        "NVML error: NVMLError_GpuIsLost: GPU is lost",
    )
    assert devices[healthy.uuid]["worker"]["state"] == "missing"
    assert devices[healthy.uuid]["current_job"] is None


def test_gpustatus_without_devices_says_how_to_register_them(db):
    out, _ = run("gpustatus")
    assert "No device is registered yet" in out


# --- demo_data ------------------------------------------------------------------------------------


def test_demo_data_creates_personas_once_and_a_superuser_with_the_given_password(db, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "correct horse battery")
    out, _ = run("demo_data")
    assert "Demo personas: 4 created, 0 already there." in out
    assert "'admin'" in out
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff
    assert admin.check_password("correct horse battery")

    out, _ = run("demo_data", "--username", "other")

    assert "Demo personas: 0 created, 4 already there." in out
    assert "A superuser exists already" in out
    assert Persona.objects.count() == 4
    assert get_user_model().objects.filter(is_superuser=True).count() == 1


def test_demo_data_generates_and_prints_a_password_when_none_is_given(db, monkeypatch):
    monkeypatch.delenv("DEMO_ADMIN_PASSWORD", raising=False)
    out, _ = run("demo_data")
    match = re.search(r"username 'admin', password '([^']+)' \(generated\)", out)
    assert match, out
    assert len(match.group(1)) >= 12
    assert get_user_model().objects.get(username="admin").check_password(match.group(1))


def test_demo_data_refuses_a_short_password(db, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "short")
    with pytest.raises(CommandError, match="at least 8 characters"):
        run("demo_data")
    assert not get_user_model().objects.exists()


def test_demo_data_keeps_an_edited_persona(db, monkeypatch):
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "correct horse battery")
    run("demo_data")
    Persona.objects.filter(slug="ada-lovelace").update(name="Ada, edited")
    run("demo_data")
    assert Persona.objects.get(slug="ada-lovelace").name == "Ada, edited"


# --- gpumonitor ---------------------------------------------------------------------------------
# gpumonitor closes stale connections before every tick, as a long-running process must; inside
# a test transaction that would close the test's own connection, so these tests commit for real.


def test_gpumonitor_once_stores_one_snapshot_per_device(transactional_db, settings, keep_signal_handlers):
    out, _ = run("gpumonitor", "--once")

    devices = list(Device.objects.filter(host=settings.GPUSCHEDULER["HOST"]))
    assert sorted(d.uuid for d in devices) == sorted([sim_uuid(settings, 0), sim_uuid(settings, 1)])
    assert sorted(Snapshot.objects.values_list("device__uuid", flat=True)) == sorted(d.uuid for d in devices)
    for device in devices:
        assert f"{device.label}: healthy" in out


def test_gpumonitor_once_records_a_lost_simulated_gpu_as_unhealthy(transactional_db, settings, keep_signal_handlers):
    simulated.set_faults(sim_uuid(settings, 1), lost=True)
    out, _ = run("gpumonitor", "--once")
    lost = Device.objects.get(uuid=sim_uuid(settings, 1))
    assert lost.health == Health.UNHEALTHY
    assert "GpuIsLost" in Snapshot.objects.get(device=lost).error
    assert Device.objects.get(uuid=sim_uuid(settings, 0)).health == Health.HEALTHY
    assert f"{lost.label}: unhealthy NVMLError_GpuIsLost" in out


def test_gpumonitor_refuses_a_bad_interval(db):
    with pytest.raises(CommandError, match=r"--interval 0\.0 is out of range"):
        run("gpumonitor", "--once", "--interval", "0")
