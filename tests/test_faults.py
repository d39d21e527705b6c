"""Nothing lost, nothing doubled: real worker processes, real Redis, injected faults.

Each test runs real `gpuworker` / `gpuworkers` / `gpumonitor` processes on simulated devices with
a short lease (GPU_LEASE_SECONDS=3, heartbeats every 0.5 s) so that recovery is quick to observe.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from gpuscheduler import simulated
from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState, Device, Health, Snapshot
from gpuscheduler.simulated import describe
from personas.models import RequestState, SampleImage, SampleRequest
from personas.services import sample_request_submit
from tests.media import stored_names
from tests.processes import wait_for

pytestmark = pytest.mark.e2e


def sim_uuids(spec: str = "sim*2") -> list[str]:
    return [info.uuid for info in describe(spec, settings.GPUSCHEDULER["HOST"])]


def wait_request(
    request: SampleRequest, cluster, timeout: float = 60, state: str = RequestState.SUCCEEDED
) -> SampleRequest:
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == state,
        timeout,
        lambda: f"request {request.pk} to be {state}\n{cluster.logs()}",
    )
    return SampleRequest.objects.get(pk=request.pk)


def assert_exactly_once(request: SampleRequest) -> None:
    """Every image of the request exists once, as a row and as a file with its thumbnail, and no other
    file of it exists."""
    images = list(SampleImage.objects.filter(request=request))
    assert sorted(i.index for i in images) == list(range(request.count))
    folder = f"samples/persona-{request.persona_id}"
    stored = [name for name in stored_names(folder) if name.startswith(f"{folder}/r{request.pk}-")]
    named = sorted(name for i in images for name in (i.image.name, i.thumbnail))
    assert stored == named, "no orphan or half-written file"
    assert all(i.thumbnail for i in images), "every image has its thumbnail"


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie is dead


def running_attempt(request: SampleRequest, cluster) -> Assignment:
    return wait_for(
        lambda: (
            Assignment.objects.filter(request=request, state=AssignmentState.RUNNING).select_related("device").first()
        ),
        30,
        lambda: f"an attempt of request {request.pk} to start\n{cluster.logs()}",
        interval=0.05,
    )


def first_attempt_on(target: str, other: str, persona, cluster, count: int = 1) -> tuple[SampleRequest, Assignment]:
    """Submit a request whose first attempt runs on `target`: `other` is kept too hot until then."""
    simulated.set_faults(other, over_temperature=True)
    wait_for(lambda: Device.objects.get(uuid=other).health == Health.UNHEALTHY, 10, "the other device to be excluded")
    request = sample_request_submit(persona=persona, count=count).request
    attempt = wait_for(
        lambda: Assignment.objects.filter(request=request, started_at__isnull=False).select_related("device").first(),
        30,
        lambda: f"the first attempt to start\n{cluster.logs()}",
        interval=0.05,
    )
    simulated.set_faults(other, over_temperature=None)
    assert attempt.device.uuid == target
    return request, attempt


# --- 1. a worker dies mid-job ---------------------------------------------------------------


@pytest.mark.parametrize("whole_group", [True, False], ids=["kill-worker-and-children", "kill-main-process-only"])
def test_worker_killed_mid_job_is_rerun_on_another_gpu(cluster, persona, whole_group):
    cluster.configure(SAMPLES_MODEL="simulated:4")
    first, second = sim_uuids()
    workers = {uuid: cluster.start_worker(uuid) for uuid in (first, second)}
    cluster.start_monitor()
    request = sample_request_submit(persona=persona, count=2).request

    victim = running_attempt(request, cluster)
    process = workers[victim.device.uuid]
    watchdogs = children_of(process.pid)
    assert watchdogs, "the worker runs a watchdog child"
    killed_at = time.time()
    if whole_group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL)

    # The watchdog notices its worker is gone and exits: nothing of the dead worker lives on.
    wait_for(lambda: not any(pid_alive(p) for p in watchdogs), 5, "the watchdog to exit with its worker")
    request = wait_request(request, cluster)
    assert_exactly_once(request)
    attempts = list(Assignment.objects.filter(request=request, first_index=victim.first_index).order_by("attempt"))
    assert [a.state for a in attempts] == [AssignmentState.ABANDONED, AssignmentState.SUCCEEDED]
    assert "stopped sending heartbeats" in attempts[0].error
    assert attempts[1].device_id != victim.device_id, "the retry ran on the surviving GPU"
    assert attempts[1].started_at.timestamp() - killed_at < 30


def test_gpuworkers_restarts_a_worker_whatever_its_exit_code(cluster):
    cluster.start_workers(expect=2)
    device = Device.objects.order_by("pk").first()
    for sig in (signal.SIGKILL, signal.SIGTERM):  # SIGTERM: a warm shutdown that exits with status 0
        old_pid = Device.objects.get(pk=device.pk).worker_pid
        os.kill(old_pid, sig)
        wait_for(
            lambda old=old_pid: (
                (d := Device.objects.get(pk=device.pk)).worker_pid not in (None, old) and d.worker_state == "idle"
            ),
            30,
            lambda: f"a new worker after {sig.name}\n{cluster.logs()}",
        )


# --- 2. a hung or partitioned first attempt never doubles images ------------------------------


def test_attempt_frozen_while_its_retry_runs_keeps_only_one_set_of_images(cluster, persona):
    # A 4 s call: it must still be running when it is frozen, a heartbeat after it was seen.
    cluster.configure(SAMPLES_MODEL="simulated:4")
    first, second = sim_uuids()
    workers = {uuid: cluster.start_worker(uuid) for uuid in (first, second)}
    cluster.start_monitor()
    request = sample_request_submit(persona=persona, count=1).request
    frozen = running_attempt(request, cluster)
    process = workers[frozen.device.uuid]
    # Freeze it between two database writes: on SQLite a process stopped inside a write holds
    # the database's write lock, and every other process waits for it (see the README: SQLite
    # serializes writers). Just after a heartbeat lands, the next write is half a second away.
    busy = wait_for(
        lambda: Device.objects.filter(pk=frozen.device_id, current_assignment=frozen).values("worker_seen_at").first(),
        10,
        lambda: f"the worker to report its attempt\n{cluster.logs()}",
        interval=0.02,
    )
    wait_for(
        lambda: Device.objects.get(pk=frozen.device_id).worker_seen_at != busy["worker_seen_at"],
        10,
        "the next heartbeat",
        interval=0.01,
    )

    os.killpg(process.pid, signal.SIGSTOP)  # hung or cut off: no heartbeats, but alive
    try:
        wait_for(
            lambda: Assignment.objects.filter(request=request, state=AssignmentState.SUCCEEDED).exists(),
            30,
            lambda: f"the retry to succeed while the first attempt is frozen\n{cluster.logs()}",
        )
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        thawed = timezone.now()
    # The first attempt wakes up, finds its lease gone and drops its work; its worker lives on.
    # (The reconciler already cleared current_assignment: wait for the thawed worker itself.)
    wait_for(
        lambda: Device.objects.filter(
            uuid=frozen.device.uuid, worker_seen_at__gt=thawed, worker_state="idle", current_assignment=None
        ).exists(),
        15,
        lambda: f"the thawed worker to give up the abandoned attempt\n{cluster.logs()}",
    )
    time.sleep(3)  # time enough to commit, if the lease check were missing
    assert process.poll() is None
    request = SampleRequest.objects.get(pk=request.pk)
    assert request.state == RequestState.SUCCEEDED
    assert_exactly_once(request)
    states = list(Assignment.objects.filter(request=request).order_by("attempt").values_list("state", flat=True))
    assert states == [AssignmentState.ABANDONED, AssignmentState.SUCCEEDED]


# --- 3. a device goes bad, and comes back ------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"lost": True}, "GpuIsLost"),
        ({"nvml_error": True}, "NVML error"),
        ({"over_temperature": True}, "temperature 97 C"),
    ],
    ids=["lost", "nvml-error", "over-temperature"],
)
def test_bad_device_is_marked_unhealthy_within_one_interval_and_recovers_after_a_canary(
    cluster, persona, fault, reason
):
    cluster.configure(GPU_MONITOR_INTERVAL="1")
    cluster.start_monitor()
    cluster.start_workers(expect=2)
    bad, good = Device.objects.order_by("index")

    before = Snapshot.objects.filter(device=bad).order_by("-pk").values_list("pk", flat=True).first() or 0
    simulated.set_faults(bad.uuid, **fault)
    readings = Snapshot.objects.filter(device=bad, pk__gt=before).order_by("pk")
    wait_for(lambda: readings.filter(health=Health.UNHEALTHY).exists(), 5, "a reading of it as unhealthy")
    # Within one monitor tick, counted in the monitor's readings, not the wall clock: the first
    # reading after the fault may have been taken just before it landed; the next one is unhealthy.
    after = list(readings.values_list("health", flat=True))
    assert Health.UNHEALTHY in after[:2], f"marked at the first reading of the fault: {after}"
    assert Device.objects.get(pk=bad.pk).health == Health.UNHEALTHY
    assert reason in Device.objects.get(pk=bad.pk).health_reason
    wait_for(lambda: Device.objects.get(pk=bad.pk).worker_state == "paused", 5, "its worker to pause")

    # New work avoids it; work that was already waiting on its queue runs elsewhere.
    request = sample_request_submit(persona=persona, count=2).request
    assert set(Assignment.objects.filter(request=request).values_list("planned_device", flat=True)) == {good.pk}
    request = wait_request(request, cluster)
    assert set(SampleImage.objects.filter(request=request).values_list("device", flat=True)) == {good.pk}

    out = _gpustatus()
    assert "unhealthy" in out and reason in out

    simulated.clear_faults(bad.uuid)
    wait_for(
        lambda: Device.objects.get(pk=bad.pk).health == Health.HEALTHY, 20, lambda: f"re-admission\n{cluster.logs()}"
    )
    canary = Assignment.objects.filter(kind=AssignmentKind.CANARY, device=bad).latest("id")
    assert canary.state == AssignmentState.SUCCEEDED
    assert "canary job passed" in Device.objects.get(pk=bad.pk).health_reason


def test_work_queued_on_a_device_that_turns_unhealthy_runs_on_another(cluster, persona):
    cluster.start_monitor()
    cluster.start_workers(expect=2)
    bad, good = Device.objects.order_by("index")
    simulated.set_faults(bad.uuid, lost=True)
    wait_for(lambda: Device.objects.get(pk=bad.pk).worker_state == "paused", 10, "the bad device's worker to pause")
    # Work placed on the device just before it went bad: put the chunk on its queue directly.
    from django.db import transaction

    from gpuscheduler import queues
    from gpuscheduler.assignments import assignments_place

    request = SampleRequest.objects.create(persona=persona, count=2, first_seed=5, model="simulated:0.2", steps=1)
    with transaction.atomic():
        (chunk,) = assignments_place(request_id=request.pk, count=2, pinned_device=None)
        Assignment.objects.filter(pk=chunk.pk).update(planned_device=bad, queue_name=queues.device_queue_name(bad.pk))
    queues.enqueue_assignments(list(Assignment.objects.filter(pk=chunk.pk)))

    request = wait_request(request, cluster)
    ran = Assignment.objects.get(pk=chunk.pk)
    assert ran.planned_device_id == bad.pk and ran.device_id == good.pk


def _gpustatus() -> str:
    from io import StringIO

    out = StringIO()
    call_command("gpustatus", stdout=out)
    return out.getvalue()


# --- 4. out of GPU memory ------------------------------------------------------------------------


def test_out_of_memory_is_retried_with_fewer_images_per_call_and_the_worker_survives(cluster, persona):
    cluster.configure(SAMPLES_MODEL="simulated:0.1", GPU_SIMULATED="sim*1")
    (uuid,) = sim_uuids("sim*1")
    simulated.set_faults(uuid, oom_above_batch=1)
    process = cluster.start_worker(uuid)
    request = wait_request(sample_request_submit(persona=persona, count=4).request, cluster)
    assert_exactly_once(request)
    (attempt,) = Assignment.objects.filter(request=request)
    assert attempt.state == AssignmentState.SUCCEEDED
    assert attempt.calls == 4, "4 -> 2 -> 1 images per call after two out-of-memory errors"
    assert "out of memory at 4 images per call" in attempt.error
    assert "out of memory at 2 images per call" in attempt.error
    assert process.poll() is None and Device.objects.get(uuid=uuid).worker_pid == process.pid


def test_out_of_memory_at_one_image_moves_the_work_to_a_device_with_room(cluster, persona):
    cluster.configure(SAMPLES_MODEL="simulated:0.1")
    small, large = sim_uuids()
    simulated.set_faults(small, oom_above_batch=0)  # not even one image fits
    for uuid in (small, large):
        cluster.start_worker(uuid)
    request, _ = first_attempt_on(small, large, persona, cluster)
    request = wait_request(request, cluster)
    attempts = list(Assignment.objects.filter(request=request).order_by("attempt").select_related("device"))
    assert [a.state for a in attempts] == [AssignmentState.RETRIED, AssignmentState.SUCCEEDED]
    assert attempts[0].device.uuid == small and "OutOfMemory" in attempts[0].error
    assert attempts[1].device.uuid == large
    assert_exactly_once(request)


# --- 5. hung jobs --------------------------------------------------------------------------------


def test_job_hung_in_python_times_out_and_is_retried_elsewhere(cluster, persona):
    cluster.configure(SAMPLES_MODEL="simulated:0.1", SAMPLES_JOB_TIMEOUT="5")
    stuck, fine = sim_uuids()
    simulated.set_faults(stuck, hang_seconds=600)
    workers = {uuid: cluster.start_worker(uuid) for uuid in (stuck, fine)}
    request, _ = first_attempt_on(stuck, fine, persona, cluster)
    request = wait_request(request, cluster, timeout=60)
    attempts = list(Assignment.objects.filter(request=request).order_by("attempt").select_related("device"))
    assert attempts[0].device.uuid == stuck and attempts[0].state == AssignmentState.RETRIED
    assert "JobTimeoutException" in attempts[0].error
    assert attempts[-1].device.uuid == fine and attempts[-1].state == AssignmentState.SUCCEEDED
    # The device is released: the same worker process is idle again, ready for work.
    wait_for(
        lambda: Device.objects.get(uuid=stuck).worker_state in ("idle", "paused"), 10, "the hung worker to be idle"
    )
    assert workers[stuck].poll() is None
    assert_exactly_once(request)


def test_job_hung_in_native_code_is_killed_by_the_watchdog_and_rerun(cluster, persona):
    cluster.configure(SAMPLES_MODEL="simulated:0.1", SAMPLES_JOB_TIMEOUT="5", GPU_WATCHDOG_GRACE="2")
    cluster.start_monitor()
    stuck, fine = sim_uuids()
    simulated.set_faults(stuck, hang_native=600)  # SIGALRM is blocked: rq's timeout cannot fire
    cluster.start_workers(expect=2)
    stuck_device = Device.objects.get(uuid=stuck)
    first_pid = stuck_device.worker_pid
    request, _ = first_attempt_on(stuck, fine, persona, cluster)
    request = wait_request(request, cluster, timeout=60)
    attempts = list(Assignment.objects.filter(request=request).order_by("attempt").select_related("device"))
    # Abandoned by its deadline, or by its heartbeats stopping once the watchdog killed the worker.
    assert attempts[0].state == AssignmentState.ABANDONED
    assert "deadline" in attempts[0].error or "stopped sending heartbeats" in attempts[0].error
    assert attempts[-1].state == AssignmentState.SUCCEEDED and attempts[-1].device.uuid == fine
    simulated.clear_faults(stuck)
    # The watchdog killed the stuck worker; gpuworkers started a new one for the same device.
    wait_for(
        lambda: Device.objects.get(pk=stuck_device.pk).worker_pid not in (None, first_pid),
        30,
        lambda: f"the stuck worker to be replaced\n{cluster.logs()}",
    )
    assert not pid_alive(first_pid)
    assert_exactly_once(request)


# --- 6. Redis stops, or forgets ------------------------------------------------------------------


def test_redis_stopping_for_ten_seconds_loses_and_doubles_nothing(private_redis, cluster, persona_factory):
    cluster.configure(SAMPLES_MODEL="simulated:0.5")
    cluster.start_monitor()
    cluster.start_workers(expect=2)
    requests = [sample_request_submit(persona=persona_factory(), count=3).request for _ in range(4)]
    wait_for(lambda: SampleImage.objects.exists(), 30, "the first image")
    private_redis.stop()
    time.sleep(10)
    private_redis.start()
    for request in requests:
        assert_exactly_once(wait_request(request, cluster, timeout=90))


def test_admin_button_with_redis_down_saves_the_request_and_the_reconciler_queues_it(
    private_redis, cluster, admin_client, persona
):
    cluster.configure(SAMPLES_MODEL="simulated:0.1")
    cluster.start_monitor()
    cluster.start_workers(expect=2)
    private_redis.stop()
    response = admin_client.post(
        reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": "2"}, follow=True
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "Redis is unavailable right now" in text
    request = SampleRequest.objects.get(persona=persona)
    assert not Assignment.objects.filter(request=request, enqueued_at__isnull=False).exists()
    private_redis.start()
    request = wait_request(request, cluster, timeout=60)
    assert_exactly_once(request)


def test_redis_losing_its_data_is_reconciled_from_the_database(private_redis, cluster, persona_factory):
    cluster.configure(SAMPLES_MODEL="simulated:0.5", GPU_SIMULATED="sim*1")
    cluster.start_monitor()
    cluster.start_workers(expect=1)
    requests = [sample_request_submit(persona=persona_factory(), count=2).request for _ in range(5)]
    wait_for(lambda: SampleImage.objects.exists(), 30, "the first image")
    private_redis.client().flushall()  # every queued job is gone from Redis
    for request in requests:
        assert_exactly_once(wait_request(request, cluster, timeout=90))
    assert SampleImage.objects.count() == 10
