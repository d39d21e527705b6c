"""The status page and `gpustatus` show the cluster: one section per host with its monitor, media
store, workers and devices, and a host nothing was heard from marked stale."""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from gpuscheduler.cluster import host_status, monitor_beat
from gpuscheduler.models import Device, Host, MediaStore
from gpuscheduler.page_reads import device_status
from gpuscheduler.storage import store_status
from tests.processes import wait_for

DATA = "admin:gpuscheduler_gpustatuspage_data"
PAGE = "admin:gpuscheduler_gpustatuspage_changelist"


def _silent_for(device: Device, seconds: float) -> Device:
    then = timezone.now() - timedelta(seconds=seconds)
    Device.objects.filter(pk=device.pk).update(last_seen=then, worker_seen_at=then, created=then - timedelta(days=1))
    device.refresh_from_db()
    return device


@pytest.fixture
def two_hosts(device_factory):
    """testhost, live (monitor and two workers), and host-b, whose monitor and worker went silent 3 min ago."""
    a = [device_factory("H100", worker=True), device_factory("H100", worker=True)]
    b = _silent_for(device_factory("T4", worker=True, host="host-b"), 180)
    monitor_beat(host="testhost", pid=4242, started_at=timezone.now())
    monitor_beat(host="host-b", pid=5151, started_at=timezone.now() - timedelta(hours=1))
    Host.objects.filter(host="host-b").update(monitor_seen_at=timezone.now() - timedelta(seconds=180))
    MediaStore.objects.create(host="host-b", healthy=True, free_bytes=10 * 1024**3, checked_at=timezone.now())
    return a, b


@pytest.fixture
def viewer(client, user_factory):
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))
    return client


def test_hosts_are_listed_with_their_devices_monitor_and_workers(two_hosts):
    (a1, a2), b = two_hosts
    now = timezone.now()
    hosts = host_status(device_status(now), store_status(now), now)

    assert [h["host"] for h in hosts] == ["host-b", "testhost"]
    host_b, here = hosts
    assert (here["device_ids"], here["stale"]) == ([a1.pk, a2.pk], False)
    assert (here["monitor"]["state"], here["monitor"]["pid"]) == ("running", 4242)
    assert here["hostname"] == socket.gethostname()
    assert [w["state"] for w in here["workers"]] == ["idle", "idle"]
    assert (host_b["device_ids"], host_b["stale"], host_b["monitor"]["state"]) == ([b.pk], True, "silent")
    assert 179 <= host_b["silent_seconds"] < 185
    assert host_b["store"]["host"] == "host-b" and host_b["store"]["healthy"]
    assert [w["state"] for w in host_b["workers"]] == ["missing"]


def test_one_live_worker_keeps_a_host_without_a_monitor_live(device_factory):
    device_factory("H100", worker=True, host="host-c")  # workers only: no monitor has run there
    now = timezone.now()
    [host] = host_status(device_status(now), [], now)
    assert (host["host"], host["monitor"]["state"], host["stale"]) == ("host-c", "none", False)


def test_the_page_and_its_json_group_devices_by_host(two_hosts, viewer):
    (a1, a2), b = two_hosts
    data = viewer.get(reverse(DATA), {"fragments": "1"}).json()

    assert [(h["host"], h["device_ids"], h["stale"]) for h in data["hosts"]] == [
        ("host-b", [b.pk], True),
        ("testhost", [a1.pk, a2.pk], False),
    ]
    html = data["html"]["cards"]
    sections = re.split(r'<section class="gpu-host', html)[1:]
    assert len(sections) == 2
    assert sections[0].startswith(' gpu-host-stale" data-host="host-b"')
    assert f'id="gpu-card-{b.pk}"' in sections[0] and f'id="gpu-card-{a1.pk}"' not in sections[0]
    assert sections[1].startswith('" data-host="testhost"')
    assert f'id="gpu-card-{a1.pk}"' in sections[1] and f'id="gpu-card-{a2.pk}"' in sections[1]
    assert "monitor-running" in sections[1] and re.search(r"seen \d s ago", sections[1])
    assert re.search(r"silent for 3 min", sections[0])
    assert re.search(r"nothing heard from it for 3 min: no monitor, worker or reading", sections[0])
    assert "Media store:" in sections[0] and "10.0 GiB free" in sections[0]
    assert "heartbeat 3 min ago" in sections[0], "each worker with its last heartbeat"
    assert data["hosts"][1]["monitor"]["text"].startswith("seen ")

    page = viewer.get(reverse(PAGE)).content.decode()
    assert page.count('<section class="gpu-host') == 2


def test_gpustatus_groups_its_table_by_host_and_json_has_hosts(two_hosts):
    (a1, a2), b = two_hosts
    out = StringIO()
    call_command("gpustatus", stdout=out)
    assert "cost: 1.000 s per image; best at 1 (no calls timed yet: a guess)" in out.getvalue()
    # Indented lines say more of the device above them (its cost, why it is not healthy).
    lines = [line for line in out.getvalue().splitlines() if not line.startswith(" ")]
    b_line = next(i for i, line in enumerate(lines) if line.startswith("host host-b"))
    here_line = next(i for i, line in enumerate(lines) if line.startswith("host testhost"))
    assert re.search(
        r"monitor silent for 3 min; 0 of 1 workers live; STALE: nothing heard from it for 3 min", lines[b_line]
    )
    assert lines[b_line + 1].startswith(b.label)
    assert "monitor seen" in lines[here_line] and "(pid 4242); 2 of 2 workers live" in lines[here_line]
    assert lines[here_line + 1].startswith(a1.label) and lines[here_line + 2].startswith(a2.label)

    out = StringIO()
    call_command("gpustatus", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert [(h["host"], h["stale"], h["device_ids"]) for h in data["hosts"]] == [
        ("host-b", True, [b.pk]),
        ("testhost", False, [a1.pk, a2.pk]),
    ]
    assert {"devices", "storage"} <= set(data)


def test_gpumonitor_once_writes_its_hosts_heartbeat(db):
    call_command("gpumonitor", "--once", stdout=StringIO())
    host = Host.objects.get(host="testhost")
    assert (host.monitor_pid, host.hostname) == (os.getpid(), socket.gethostname())
    assert host.monitor_seen_at is not None and host.monitor_started_at is not None


def test_the_monitor_loop_beats_every_tick(cluster):
    cluster.configure(GPU_MONITOR_INTERVAL="0.2")
    process = cluster.start_monitor()
    first = wait_for(
        lambda: (
            Host.objects.filter(host="testhost", monitor_pid=process.pid)
            .values_list("monitor_seen_at", flat=True)
            .first()
        ),
        60,
        cluster.logs,
    )
    later = wait_for(
        lambda: (
            Host.objects.filter(host="testhost", monitor_seen_at__gt=first)
            .values_list("monitor_seen_at", flat=True)
            .first()
        ),
        30,
        cluster.logs,
    )
    host = Host.objects.get(host="testhost")
    assert later > first and host.monitor_started_at <= first


def test_a_host_gone_for_good_drops_off_with_its_store(device_factory, viewer):
    from gpuscheduler.cluster import devices_retire

    device_factory("H100", worker=True)
    gone = device_factory("T4", host="old-name")
    long_ago = timezone.now() - timedelta(hours=30)
    Device.objects.filter(pk=gone.pk).update(last_seen=long_ago, created=long_ago)
    monitor_beat(host="old-name", pid=1, started_at=long_ago)
    Host.objects.filter(host="old-name").update(monitor_seen_at=long_ago)
    MediaStore.objects.create(host="old-name", healthy=False, reason="No space left on device", checked_at=long_ago)
    devices_retire()

    data = viewer.get(reverse(DATA), {"fragments": "1"}).json()
    assert [h["host"] for h in data["hosts"]] == ["testhost"]
    assert [s["host"] for s in data["storage"]] == []
    assert "old-name" not in data["html"]["cards"] and "old-name" not in data["html"]["storage"]
