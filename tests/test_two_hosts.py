"""Two machines, one cluster: real `gpumonitor` + `gpuworkers` sets with their own GPU_HOST and
DATA_DIR, one PostgreSQL, one Redis, one shared image store (a shared folder, or a bucket on the
S3 emulator). This test process plays host A's web server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from config.storage import SAMPLES_ALIAS
from gpuscheduler.models import Assignment, AssignmentState, Device
from gpuscheduler.page_reads import device_status
from personas.models import SampleImage
from personas.services import sample_request_submit
from tests.processes import skewed_clock, wait_for
from tests.test_faults import assert_exactly_once, wait_request

pytestmark = pytest.mark.e2e

HOSTS = ("host-a", "host-b")


@pytest.fixture
def postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("several machines share a PostgreSQL database (run with DATABASE_URL=postgresql://...)")


@pytest.fixture(params=["shared-folder", "s3"])
def shared_store(request, settings: Any, tmp_path: Path) -> dict[str, str]:
    """The environment that points a host at the one store every host uses."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_storage")  # this process, and children through os.environ
        return dict(bucket.env)
    shared = tmp_path / "shared-media"
    shared.mkdir()
    settings.STORAGES = {
        **settings.STORAGES,
        SAMPLES_ALIAS: {"BACKEND": "config.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(shared)}},
    }
    return {"MEDIA_DIR": str(shared)}


def start_host(cluster, tmp_path: Path, name: str, store: dict[str, str], **extra: str) -> list[Any]:
    """A machine of its own: its host id, its DATA_DIR (database and Redis are shared)."""
    data = tmp_path / name
    data.mkdir(exist_ok=True)
    env = {"GPU_HOST": name, "DATA_DIR": str(data), **store, **extra}
    return [cluster.start("gpumonitor", env=env), cluster.start("gpuworkers", env=env)]


def kill_mid_run(processes: list[Any], mid_run: Callable[[], bool], what: Callable[[], str]) -> None:
    """SIGKILL a host while `mid_run()` holds. The host is frozen (SIGSTOP) first and the
    condition read again: both of its devices start their calls together and end them together,
    so an attempt seen running a moment ago may have ended before an unfrozen kill lands."""
    for _ in range(20):
        wait_for(mid_run, 60, what, interval=0.05)
        for process in processes:
            os.killpg(process.pid, signal.SIGSTOP)
        time.sleep(1.0)  # a commit sent before the stop lands
        if mid_run():
            break
        for process in processes:
            os.killpg(process.pid, signal.SIGCONT)
    else:
        raise AssertionError(f"never froze the host mid-run: {what()}")
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)


def host_devices(name: str) -> list[int]:
    return list(Device.objects.filter(host=name).values_list("pk", flat=True))


def test_two_hosts_serve_every_image_from_either_and_survive_losing_one(
    postgresql, cluster, shared_store, persona_factory, admin_client, tmp_path
):
    cluster.configure(SAMPLES_MODEL="simulated:1", GPU_SIMULATED="sim*2")
    start_host(cluster, tmp_path, "host-a", shared_store)
    host_b = start_host(cluster, tmp_path, "host-b", shared_store)
    cluster.wait_workers(4, timeout=90)
    assert len(host_devices("host-a")) == len(host_devices("host-b")) == 2

    requests = [sample_request_submit(persona=persona_factory(), count=4).request for _ in range(6)]
    # Host B dies mid-run: after it made some images, with more of its own running.
    on_b = Assignment.objects.filter(device__host="host-b")
    kill_mid_run(
        host_b,
        lambda: on_b.filter(state=AssignmentState.SUCCEEDED).exists() and on_b.filter(state="running").exists(),
        lambda: f"host-b to make images and run more\n{cluster.logs()}",
    )

    for request in requests:
        assert_exactly_once(wait_request(request, cluster, timeout=120))
    images = list(SampleImage.objects.filter(request__in=requests).select_related("device"))
    assert len(images) == 24
    made_on_b = [image for image in images if image.device.host == "host-b"]
    assert made_on_b, "host-b made some images before it died"
    abandoned = Assignment.objects.filter(request__in=requests, state=AssignmentState.ABANDONED)
    assert abandoned.exists(), "host-b's running work was abandoned and re-run on host-a"

    # Host A's web server serves every image, whichever host made it.
    for image in images:
        response = admin_client.get(f"/admin/personas/persona/image/{image.pk}/")
        if response.status_code == 302:  # a bucket: a short-lived signed URL
            import urllib.request

            with urllib.request.urlopen(response["Location"]) as signed:  # the emulator on 127.0.0.1
                assert signed.status == 200
                body = signed.read()
        else:
            assert response.status_code == 200, (image.device.host, image.image.name)
            body = b"".join(response.streaming_content)
        assert body[:8] == b"\x89PNG\r\n\x1a\n"

    # And host B shows as dead on host A's pages.
    wait_for(
        lambda: {row["health"] for row in device_status() if row["host"] == "host-b"} == {"stale"},
        30,
        "host-b's devices to show stale",
    )


@pytest.mark.parametrize("offset", [-30, 30], ids=["b-30s-behind", "b-30s-ahead"])
def test_a_host_whose_clock_is_off_by_30_s_abandons_nothing_and_its_workers_count_live(
    postgresql, cluster, persona_factory, tmp_path, settings, offset
):
    cluster.configure(SAMPLES_MODEL="simulated:1", GPU_SIMULATED="sim*2")
    shared = tmp_path / "shared-media"
    shared.mkdir()
    settings.STORAGES = {
        **settings.STORAGES,
        SAMPLES_ALIAS: {"BACKEND": "config.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(shared)}},
    }
    store = {"MEDIA_DIR": str(shared)}
    start_host(cluster, tmp_path, "host-a", store)
    start_host(cluster, tmp_path, "host-b", store, **skewed_clock(offset))
    cluster.wait_workers(4, timeout=90)

    rows = [row for row in device_status() if row["host"] == "host-b"]
    assert len(rows) == 2
    assert {row["worker"]["state"] for row in rows} <= {"idle", "busy"}, rows
    assert {row["health"] for row in rows} == {"healthy"}, rows

    requests = [sample_request_submit(persona=persona_factory(), count=4).request for _ in range(6)]
    for request in requests:
        assert_exactly_once(wait_request(request, cluster, timeout=120))

    attempts = Assignment.objects.filter(request__in=requests)
    assert set(attempts.values_list("state", flat=True)) == {AssignmentState.SUCCEEDED}, "nothing abandoned"
    assert set(attempts.values_list("attempt", flat=True)) == {1}, "no retry"
    assert SampleImage.objects.filter(request__in=requests, device__host="host-b").exists(), "host-b took work"
