"""Stale is not healthy: a device nobody has heard of for a few intervals shows `stale` with its age,
takes no new work, and its queue drains to live devices. Derived when read; no process has to write."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from gpuscheduler.assignments import NoDeviceAvailable, assignments_place
from gpuscheduler.backends import Reading
from gpuscheduler.conf import stale_after
from gpuscheduler.models import Assignment, Device, Health, WorkerState
from gpuscheduler.page_reads import device_status
from gpuscheduler.placement_reads import device_views, steal_sources
from gpuscheduler.policies import age_text, stale_seconds
from gpuscheduler.services import device_observe
from personas.models import SampleRequest
from personas.services import sample_request_submit

pytestmark = pytest.mark.django_db

T0 = timezone.now()
LIMIT = timedelta(seconds=10)


def silent_for(device: Device, seconds: float, *, worker: bool = True) -> Device:
    """Make the device's last reading (and its worker's last heartbeat) `seconds` old."""
    then = timezone.now() - timedelta(seconds=seconds)
    fields = {"worker_seen_at": then} if worker else {}
    Device.objects.filter(pk=device.pk).update(last_seen=then, created=then - timedelta(days=1), **fields)
    device.refresh_from_db()
    return device


# --- the rule -------------------------------------------------------------------------------------


def test_a_device_unheard_of_for_longer_than_the_limit_is_stale_with_its_age():
    old = T0 - timedelta(seconds=130)
    assert stale_seconds(last_seen=old, worker_seen_at=old, created=old, now=T0, after=LIMIT) == 130.0
    assert age_text(130.4) == "2 min 10 s"


def test_a_recent_reading_or_a_recent_heartbeat_alone_keeps_a_device_live():
    old, recent = T0 - timedelta(seconds=130), T0 - timedelta(seconds=3)
    assert stale_seconds(last_seen=recent, worker_seen_at=old, created=old, now=T0, after=LIMIT) is None
    assert stale_seconds(last_seen=old, worker_seen_at=recent, created=old, now=T0, after=LIMIT) is None
    assert stale_seconds(last_seen=None, worker_seen_at=recent, created=old, now=T0, after=LIMIT) is None


def test_a_device_never_read_counts_from_its_registration():
    assert stale_seconds(last_seen=None, worker_seen_at=None, created=T0, now=T0, after=LIMIT) is None
    created = T0 - timedelta(seconds=11)
    assert stale_seconds(last_seen=None, worker_seen_at=None, created=created, now=T0, after=LIMIT) == 11.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (59.9, "59 s"),
        (60, "1 min"),
        (130, "2 min 10 s"),
        (3600, "1 h"),
        (3900, "1 h 5 min"),
        (90000, "1 d 1 h"),
    ],
)
def test_ages_read_to_the_second_where_that_still_matters(seconds, text):
    assert age_text(seconds) == text


def test_the_limit_is_three_intervals_and_never_shorter_than_the_lease(settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MONITOR_INTERVAL": 2.0, "HEARTBEAT_INTERVAL": 2.0}
    settings.GPUSCHEDULER["LEASE_SECONDS"] = 10.0
    assert stale_after() == timedelta(seconds=10)
    settings.GPUSCHEDULER["MONITOR_INTERVAL"] = 5.0
    assert stale_after() == timedelta(seconds=15)


# --- what it shows ---------------------------------------------------------------------------------


@pytest.fixture
def dead_host_gpu(device_factory, persona):
    """A device whose monitor and busy worker were killed 130 s ago, with a job still marked on it."""
    device = device_factory("H100", worker=True, worker_state=WorkerState.BUSY, health_reason="canary passed")
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    job = Assignment.objects.get(request=request)
    Device.objects.filter(pk=device.pk).update(current_assignment=job)
    return silent_for(device, 130)


def test_device_status_shows_a_silent_device_as_stale_with_its_age_and_its_worker_missing(dead_host_gpu):
    now = timezone.now()
    [row] = device_status(now)
    assert row["health"] == "stale"
    assert re.fullmatch(r"no reading or heartbeat for 2 min 1[01] s", row["health_reason"])
    assert (row["recorded_health"], row["recorded_health_reason"]) == ("healthy", "canary passed")
    assert 130 <= row["stale_seconds"] < 132
    assert row["worker"]["state"] == "missing", "a dead worker is not busy"
    assert re.fullmatch(r"no heartbeat for 2 min 1[01] s", row["worker"]["missing_reason"])
    assert row["current_job"] is None


def test_gpustatus_says_stale_with_the_age_in_the_table_and_in_json(dead_host_gpu):
    out = StringIO()
    call_command("gpustatus", stdout=out)
    table = out.getvalue()
    row = next(line for line in table.splitlines() if line.startswith(dead_host_gpu.label))
    assert " stale " in row and " missing 13" in row and "busy" not in row
    assert re.search(r"why: no reading or heartbeat for 2 min 1[01] s \(last recorded: healthy\)", table)

    out = StringIO()
    call_command("gpustatus", "--json", stdout=out)
    [device] = json.loads(out.getvalue())["devices"]
    assert device["health"] == "stale" and device["worker"]["state"] == "missing"


def test_the_status_page_card_says_stale_with_the_age(dead_host_gpu, client, user_factory):
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))
    data = client.get(reverse("admin:gpuscheduler_gpustatuspage_data"), {"fragments": "1"}).json()
    [card] = data["devices"]
    assert card["health"] == "stale"
    assert 'class="gpu-card health-stale worker-missing"' in data["html"]["cards"]
    assert re.search(r'<span class="badge health-stale">stale</span> <span class="gpu-reason gpu-stale">'
                     r"no reading or heartbeat for 2 min 1[01] s", data["html"]["cards"])  # fmt: skip


def test_a_live_device_is_not_stale(device_factory):
    device_factory("H100", worker=True)
    device_factory("H100")  # read by the monitor a moment ago, no worker
    assert [row["health"] for row in device_status()] == ["healthy", "healthy"]


# --- no new work, and its queue drains -------------------------------------------------------------


def test_placement_passes_a_stale_device_by(dead_host_gpu, device_factory, persona_factory):
    live = device_factory("H100", worker=True)
    assert [(v.id, v.healthy) for v in device_views()] == [(dead_host_gpu.pk, False), (live.pk, True)]
    request = sample_request_submit(persona=persona_factory(), count=4, enqueue=False).request
    assert set(Assignment.objects.filter(request=request).values_list("planned_device", flat=True)) == {live.pk}


def test_when_only_stale_devices_are_left_placement_says_they_are_stale(dead_host_gpu, persona_factory):
    request = SampleRequest.objects.create(persona=persona_factory(), count=1, first_seed=1, model="tiny", steps=1)
    with pytest.raises(NoDeviceAvailable) as error, transaction.atomic():
        assignments_place(request_id=request.pk, count=1)
    assert re.search(
        rf"{dead_host_gpu.label} is stale \(no reading or heartbeat for 2 min 1\d s: "
        r"are `gpumonitor` and `gpuworkers` running on testhost\?\)",
        str(error.value),
    )


def test_work_pinned_to_a_stale_device_is_refused_with_the_reason(dead_host_gpu, persona_factory):
    request = SampleRequest.objects.create(persona=persona_factory(), count=1, first_seed=1, model="tiny", steps=1)
    refused = pytest.raises(NoDeviceAvailable, match=r"is stale \(no reading or heartbeat for .*takes no work now")
    with refused, transaction.atomic():
        assignments_place(request_id=request.pk, count=1, pinned_device=dead_host_gpu)


def test_a_live_worker_steals_the_queue_of_a_stale_device(dead_host_gpu, device_factory):
    live = device_factory("slow", worker=True, speed=0.01)
    assert Assignment.objects.filter(planned_device=dead_host_gpu, state="queued").exists()
    assert steal_sources(live.pk) == {dead_host_gpu.pk}


# --- what counts as hearing of a device ------------------------------------------------------------


def test_a_workers_own_reading_counts_as_a_reading(device_factory):
    device = silent_for(device_factory("H100"), 130, worker=False)
    assert device_status()[0]["health"] == "stale"
    reading = Reading(uuid=device.uuid, ok=True, memory_used=0, memory_total=80 * 1024**3, temperature=40.0)
    assert device_observe(device=device, reading=reading) == Health.HEALTHY
    assert device_status()[0]["health"] == "healthy", "a host with workers and no monitor is not stale"


def test_a_worker_whose_process_is_gone_shows_missing_at_once_on_its_own_host(device_factory):
    gone = subprocess.Popen(["true"])
    gone.wait()
    device_factory("H100", worker=True, worker_pid=gone.pid, worker_state=WorkerState.BUSY)
    [row] = device_status()
    assert row["worker"]["state"] == "missing"
    assert row["worker"]["missing_reason"] == f"process {gone.pid} is gone"
    assert row["health"] == "healthy", "its heartbeat is recent: the device is not stale yet"


def test_the_device_list_in_the_admin_shows_stale_and_missing_not_healthy_and_busy(dead_host_gpu, admin_client):
    html = admin_client.get(reverse("admin:gpuscheduler_device_changelist")).content.decode()
    assert re.search(r"stale \(no reading or heartbeat for 2 min 1[01] s; last recorded healthy\)", html)
    assert '<td class="field-worker">missing</td>' in html
    assert ">busy<" not in html
