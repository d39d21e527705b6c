"""A host's faults with real processes: a dead host (monitor and workers SIGKILLed) goes stale and
comes back with its workers; a full media store pauses its host's workers until it recovers.

Like tests/test_faults.py: simulated devices, GPU_LEASE_SECONDS=3 and 0.5 s intervals, so a device
is stale after 3 s without a reading or heartbeat (conf.stale_after).
"""

from __future__ import annotations

import json
import os
import signal
import time
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from gpuscheduler import queues, simulated, storage
from gpuscheduler.assignments import NoDeviceAvailable
from gpuscheduler.conf import stale_after
from gpuscheduler.models import Assignment, AssignmentState, Device, MediaStore, WorkerState
from gpuscheduler.page_reads import device_status
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.processes import wait_for

pytestmark = pytest.mark.e2e


def gpustatus_json() -> dict:
    out = StringIO()
    call_command("gpustatus", "--json", stdout=out)
    return json.loads(out.getvalue())


def wait_request(request: SampleRequest, cluster, timeout: float = 60) -> SampleRequest:
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        timeout,
        lambda: f"request {request.pk} to succeed\n{cluster.logs()}",
    )
    return SampleRequest.objects.get(pk=request.pk)


def test_a_dead_host_goes_stale_takes_no_work_and_is_healthy_again_when_its_workers_return(
    cluster, persona, client, user_factory
):
    monitor = cluster.start_monitor()
    workers = cluster.start_workers(expect=2)
    wait_for(lambda: all(row["health"] == "healthy" for row in device_status()), 10, "the devices to be healthy")

    for process in (monitor, workers):  # the whole host: each command with everything it started
        os.killpg(process.pid, signal.SIGKILL)
    killed = time.monotonic()

    wait_for(
        lambda: [row["health"] for row in device_status()] == ["stale", "stale"],
        stale_after().total_seconds() + 10,
        lambda: f"both devices to go stale: {device_status()}",
    )
    assert time.monotonic() - killed >= stale_after().total_seconds() - 1, "not before the limit"
    for row in gpustatus_json()["devices"]:
        assert row["health"] == "stale" and row["health_reason"].startswith("no reading or heartbeat for ")
        assert row["worker"]["state"] == "missing"
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))
    cards = client.get(reverse("admin:gpuscheduler_gpustatuspage_data")).json()["devices"]
    assert [(card["health"], card["worker"]["state"]) for card in cards] == [("stale", "missing")] * 2

    with pytest.raises(NoDeviceAvailable, match=r"is stale \(no reading or heartbeat for"):
        sample_request_submit(persona=persona, count=2)
    assert not SampleRequest.objects.exists()

    old_pids = set(Device.objects.values_list("worker_pid", flat=True))
    cluster.start("gpuworkers")
    wait_for(
        lambda: (
            [(row["health"], row["worker"]["state"]) for row in device_status()] == [("healthy", "idle")] * 2
            and not old_pids & set(Device.objects.values_list("worker_pid", flat=True))
        ),
        60,
        lambda: f"the restarted workers to bring the devices back\n{cluster.logs()}",
    )
    request = wait_request(sample_request_submit(persona=persona, count=2).request, cluster)
    assert SampleImage.objects.filter(request=request).count() == 2


def test_a_full_media_store_pauses_its_workers_without_a_monitor_and_work_resumes_when_it_recovers(cluster, persona):
    cluster.configure(GPU_SIMULATED="sim*1")
    host = settings.GPUSCHEDULER["HOST"]
    workers = cluster.start_workers(expect=1)
    device = Device.objects.get()
    pid = device.worker_pid
    # Work placed while the store was fine, reaching the queue only once the disk has filled.
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request

    simulated.set_storage_fault(host, "enospc")
    wait_for(
        lambda: (
            MediaStore.objects.filter(host=host, healthy=False).exists()
            and Device.objects.get(pk=device.pk).worker_state == WorkerState.PAUSED
        ),
        storage.STORE_CHECK_SECONDS + 10,
        lambda: f"the worker to read the full store and pause\n{cluster.logs()}",
    )
    reason = MediaStore.objects.get(host=host).reason
    assert reason.startswith("No space left on device (simulated): media/.storage-probe-")
    [store] = gpustatus_json()["storage"]
    assert (store["host"], store["healthy"], store["reason"]) == (host, False, reason)

    queues.enqueue_assignments(list(Assignment.objects.filter(request=request)))
    time.sleep(3)  # several admission checks of the paused worker
    assert set(Assignment.objects.filter(request=request).values_list("state", flat=True)) == {AssignmentState.QUEUED}
    assert not Assignment.objects.filter(request=request, started_at__isnull=False).exists()

    simulated.set_storage_fault(host, None)
    request = wait_request(request, cluster, timeout=storage.STORE_CHECK_SECONDS + 30)
    assert SampleImage.objects.filter(request=request).count() == 2
    assert MediaStore.objects.get(host=host).healthy
    assert Device.objects.get(pk=device.pk).worker_pid == pid and workers.poll() is None, "no restart"
