"""Hosts whose clocks are off by 30 s lose no work, double nothing and count as live: real worker and
monitor processes, some started with tests.settings_skewed (a wall clock shifted by
TEST_CLOCK_OFFSET_SECONDS), one test database and one Redis.

Every lease, heartbeat and "seen at" is the database's time (gpuscheduler/clock.py). Before that,
a worker 30 s behind never counted as live (its heartbeats looked 30 s old) and a reconciler 30 s
ahead abandoned every other host's running attempts. The cluster's lease is 3 s, so 30 s of skew is
ten leases either way.
"""

from __future__ import annotations

import time

import pytest
from django.conf import settings

from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device
from gpuscheduler.page_reads import device_status
from gpuscheduler.selectors import live_worker, worker_alive
from gpuscheduler.simulated import describe
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.processes import skewed_clock, wait_for

pytestmark = pytest.mark.e2e

REQUESTS, IMAGES = 6, 2


def sim_uuids() -> list[str]:
    return [info.uuid for info in describe("sim*2", settings.GPUSCHEDULER["HOST"])]


def clock_env(offset: int) -> dict[str, str] | None:
    return skewed_clock(offset) if offset else None


def live_and_fresh(seen: list[tuple[str, str, str]]) -> bool:
    """Every device live (not stale) with a live worker (idle or busy, not missing); what was seen is kept."""
    rows = device_status()
    seen.extend((row["uuid"], row["health"], row["worker"]["state"]) for row in rows)
    return len(rows) == 2 and all(
        row["health"] != "stale" and row["worker"]["state"] in ("idle", "busy") for row in rows
    )


@pytest.mark.parametrize(
    ("worker_offsets", "monitor_offset"),
    # Workers behind and ahead with the monitor right; then the monitor, which wins most turns
    # at reconciling, on a host whose clock runs ahead.
    [((-30, 30), 0), ((0, 0), 30)],
    ids=["workers-behind-and-ahead", "monitor-ahead"],
)
def test_hosts_whose_clocks_are_30_s_off_abandon_nothing_retry_nothing_and_their_workers_count_live(
    cluster, persona_factory, worker_offsets, monitor_offset
):
    cluster.configure(SAMPLES_MODEL="simulated:1")
    uuids = sim_uuids()
    for uuid, offset in zip(uuids, worker_offsets, strict=True):
        cluster.start_worker(uuid, env=clock_env(offset))
    cluster.start_monitor(env=clock_env(monitor_offset))
    seen: list[tuple[str, str, str]] = []
    wait_for(lambda: live_and_fresh(seen), 15, lambda: f"both workers to count live: {seen[-2:]}\n{cluster.logs()}")
    assert Device.objects.filter(live_worker()).count() == 2
    assert all(worker_alive(device) for device in Device.objects.all())

    requests = [sample_request_submit(persona=persona_factory(), count=IMAGES).request for _ in range(REQUESTS)]
    # While the work runs (and idle workers and the monitor take turns at reconciling), the status
    # page of this host, whose clock is right, never shows a worker missing or a device stale.
    seen.clear()
    wait_for(
        lambda: (
            live_and_fresh(seen)
            and all(
                state == RequestState.SUCCEEDED
                for state in SampleRequest.objects.filter(pk__in=[r.pk for r in requests]).values_list(
                    "state", flat=True
                )
            )
        ),
        90,
        lambda: f"every request to succeed\n{cluster.logs()}",
        interval=0.2,
    )
    assert not [s for s in seen if s[1] == "stale" or s[2] not in ("idle", "busy")], "never stale, never missing"

    attempts = list(Assignment.objects.filter(kind=AssignmentKind.SAMPLES).select_related("device"))
    assert {(a.state, a.attempt) for a in attempts} == {(AssignmentState.SUCCEEDED, 1)}, [
        (a.job_id, a.state, a.attempt, a.error) for a in attempts
    ]
    assert {a.device.uuid for a in attempts} == set(uuids), "both devices took work"
    images = list(SampleImage.objects.values_list("request_id", "index"))
    assert sorted(images) == sorted((r.pk, i) for r in requests for i in range(IMAGES)), "each image exactly once"
    time.sleep(4)  # past the 3 s lease with nothing to do: the heartbeats alone keep the workers live
    seen.clear()
    assert live_and_fresh(seen), seen


def test_an_idle_worker_whose_clock_runs_ahead_reconciles_without_abandoning_another_hosts_work(cluster, persona):
    """With no monitor, idle workers reconcile: the one 30 s ahead stays idle (the work is pinned to
    the other device) and takes every turn while the other one is busy."""
    cluster.configure(SAMPLES_MODEL="simulated:2")
    right, ahead = sim_uuids()
    cluster.start_worker(right)
    cluster.start_worker(ahead, env=skewed_clock(30))
    device = Device.objects.get(uuid=right)

    request = sample_request_submit(persona=persona, count=2, device=device).request
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        60,
        lambda: f"the request to succeed\n{cluster.logs()}",
    )
    attempts = list(Assignment.objects.filter(request=request).values_list("state", "attempt", "device__uuid", "error"))
    assert attempts == [(AssignmentState.SUCCEEDED, 1, right, "")]
