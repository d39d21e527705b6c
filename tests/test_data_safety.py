"""Never lose a saved image: real workers, real PostgreSQL and Redis, faults at the edges.

An ambiguous COMMIT (applied by the server, its reply cut by a proxy), a disk that fills while a
job runs, and a model that loads for longer than the lease.
"""

from __future__ import annotations

import time

import pytest
from django.conf import settings
from django.db import connection

from gpuscheduler import simulated
from gpuscheduler.models import Assignment, AssignmentState, Device
from gpuscheduler.selectors import worker_alive
from personas.models import RequestState, SampleRequest
from personas.services import sample_request_submit
from tests.pgproxy import PgCutProxy
from tests.processes import wait_for
from tests.test_faults import assert_exactly_once, running_attempt, sim_uuids, wait_request

pytestmark = pytest.mark.e2e


def test_an_ambiguous_commit_keeps_every_committed_image(cluster, persona_factory):
    if connection.vendor != "postgresql":
        pytest.skip("the COMMIT-cutting proxy speaks PostgreSQL's protocol (run with DATABASE_URL=postgresql://...)")
    db = connection.settings_dict
    proxy = PgCutProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    try:
        cluster.start_monitor()
        cluster.configure(DATABASE_URL=proxy.url(db["NAME"], db["USER"] or "postgres"))
        cluster.start_workers(expect=2)
        proxy.arm(3)
        requests = [sample_request_submit(persona=persona_factory(), count=2).request for _ in range(4)]

        for request in requests:
            request = wait_request(request, cluster, timeout=90)
            assert_exactly_once(request)
    finally:
        proxy.close()
    assert proxy.cuts == 3, "the proxy cut three COMMITs after the server had applied them"
    # Every attempt committed once: the cut commits were recognised as applied, not re-run.
    attempts = Assignment.objects.filter(request__in=requests)
    assert set(attempts.values_list("state", flat=True)) == {AssignmentState.SUCCEEDED}
    assert "kept" in cluster.logs(), "the worker says it kept the images of a commit whose reply was lost"


def test_a_disk_that_fills_during_a_job_sends_the_chunk_back_and_work_resumes_by_itself(cluster, persona):
    cluster.configure(SAMPLES_MODEL="simulated:1")
    uuid = sim_uuids()[0]
    cluster.start_worker(uuid)
    request = sample_request_submit(persona=persona, count=2).request
    attempt = running_attempt(request, cluster)

    simulated.set_storage_fault(settings.GPUSCHEDULER["HOST"], "enospc")
    try:
        waiting = wait_for(
            lambda: (
                Assignment.objects.filter(pk=attempt.pk, state=AssignmentState.QUEUED, error__contains="No space")
                .values_list("error", flat=True)
                .first()
            ),
            30,
            lambda: f"the attempt to go back to waiting with the real error\n{cluster.logs()}",
        )
        assert "No space left on device" in waiting
        assert "heartbeats" not in waiting
        time.sleep(3)  # the store stays full: nothing starts, nothing fails
        assert Assignment.objects.get(pk=attempt.pk).state == AssignmentState.QUEUED
        assert SampleRequest.objects.get(pk=request.pk).state == RequestState.RUNNING
    finally:
        simulated.set_storage_fault(settings.GPUSCHEDULER["HOST"], None)

    request = wait_request(request, cluster, timeout=60)
    assert_exactly_once(request)
    assert list(request.assignments.values_list("attempt", "state")) == [(1, AssignmentState.SUCCEEDED)], (
        "a full disk used up none of the request's attempts"
    )


def test_a_worker_holds_its_device_while_its_model_loads_for_longer_than_the_lease(cluster, persona):
    lease = float(settings.GPUSCHEDULER["LEASE_SECONDS"])
    uuid = sim_uuids()[0]
    simulated.set_faults(uuid, load_seconds=3 * lease)
    loader = cluster.start("gpuworker", "--device", uuid)
    device = wait_for(
        lambda: Device.objects.filter(uuid=uuid, worker_pid=loader.pid).first(), 30, lambda: cluster.logs()
    )

    # For longer than a lease, while the model loads, the device's worker stays alive...
    ends = time.monotonic() + 1.5 * lease
    while time.monotonic() < ends:
        device.refresh_from_db()
        assert worker_alive(device), f"the loading worker went missing ({device.worker_seen_at})\n{cluster.logs()}"
        assert device.worker_state == "starting"
        time.sleep(0.3)
    # ...so pinned work is accepted, and a second worker for the same device is refused.
    request = sample_request_submit(persona=persona, count=1, device=device).request
    intruder = cluster.start("gpuworker", "--device", uuid)
    assert intruder.wait(timeout=lease + 30) != 0
    assert Device.objects.get(pk=device.pk).worker_pid == loader.pid

    request = wait_request(request, cluster, timeout=60)
    assert_exactly_once(request)
    assert request.images.get().device_id == device.pk
