"""Stable identity: GPUs keyed by UUID alone, a stable host id for the rest, PIDs checked only on
their own host, and retirement of devices nothing was heard of for a long time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Collection
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone

from config.env import env_host_id
from gpuscheduler.assignments import NoDeviceAvailable, assignments_place
from gpuscheduler.backends import CpuBackend, DeviceInfo, Reading
from gpuscheduler.cluster import devices_retire, monitor_beat
from gpuscheduler.models import Assignment, Device, DeviceKind, Host, WorkerState
from gpuscheduler.page_reads import device_status
from gpuscheduler.placement_reads import device_views
from gpuscheduler.services import devices_sync, snapshots_record, worker_attach
from gpuscheduler.simulated import SimulatedBackend
from personas.models import SampleRequest
from personas.services import sample_request_submit

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


class FakeCudaBackend:
    """Two CUDA GPUs as NVML reports them: their UUIDs are the same whatever the host is called."""

    name = "fake-nvml"

    def __init__(self, uuids: tuple[str, ...] = ("GPU-11111111-aaaa", "GPU-22222222-bbbb")) -> None:
        self.uuids = uuids

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(uuid=uuid, name="NVIDIA H100 80GB HBM3", kind=DeviceKind.CUDA, index=i, memory_total=80 * GIB)
            for i, uuid in enumerate(self.uuids)
        ]

    def read(self, uuids: Collection[str] | None = None) -> list[Reading]:
        return [
            Reading(uuid=uuid, ok=True, memory_used=GIB, memory_total=80 * GIB, temperature=40.0)
            for uuid in self.uuids
            if uuids is None or uuid in uuids
        ]

    def close(self) -> None:
        pass


# --- the host id --------------------------------------------------------------------------------------


def test_without_gpu_host_an_id_is_made_once_and_kept_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_HOST", raising=False)
    first = env_host_id("GPU_HOST", data_dir=tmp_path)
    assert (tmp_path / "host_id").read_text().strip() == first
    assert env_host_id("GPU_HOST", data_dir=tmp_path) == first, "a restart keeps the id"
    other = tmp_path / "other-machine"
    other.mkdir()
    assert env_host_id("GPU_HOST", data_dir=other) != first, "another DATA_DIR is another machine"


def test_gpu_host_wins_and_a_bad_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_HOST", "gpu-box.example")
    assert env_host_id("GPU_HOST", data_dir=tmp_path) == "gpu-box.example"
    assert not (tmp_path / "host_id").exists()
    for bad in ("two words", "-leading", "x" * 65, "slash/ed"):
        monkeypatch.setenv("GPU_HOST", bad)
        with pytest.raises(ImproperlyConfigured, match=r"GPU_HOST=.* is not a host id"):
            env_host_id("GPU_HOST", data_dir=tmp_path)


def test_the_settings_default_host_id_survives_a_restart_with_a_new_hostname(tmp_path):
    def host_in_a_fresh_process() -> str:
        code = "from config import settings as s; print(s.GPUSCHEDULER['HOST'])"
        environment = {k: v for k, v in os.environ.items() if k != "GPU_HOST"}
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**environment, "DATA_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()

    first = host_in_a_fresh_process()
    # A container restarted with a new hostname keeps its DATA_DIR volume, and so its id.
    assert host_in_a_fresh_process() == first
    assert (tmp_path / "host_id").read_text().strip() == first


# --- devices keyed by UUID ------------------------------------------------------------------------------


def test_a_gpu_whose_host_was_renamed_reattaches_to_its_row(db):
    backend = FakeCudaBackend()
    before = {d.uuid: d.pk for d in devices_sync(backend=backend, host="gpu-box-old")}

    after = devices_sync(backend=backend, host="gpu-box-new")

    assert {d.uuid: d.pk for d in after} == before
    assert Device.objects.count() == 2
    assert set(Device.objects.values_list("host", flat=True)) == {"gpu-box-new"}


def test_a_renamed_host_keeps_its_gpus_history(db):
    backend = FakeCudaBackend()
    snapshots_record(backend=backend, host="gpu-box-old")
    snapshots_record(backend=backend, host="gpu-box-new")
    assert Device.objects.count() == 2
    for device in Device.objects.all():
        assert device.snapshots.count() == 2, "both readings are on the one row"


def test_simulated_and_cpu_devices_of_two_hosts_get_distinct_rows(db):
    for host in ("host-a", "host-b"):
        devices_sync(backend=SimulatedBackend("sim*2", host=host), host=host)
        devices_sync(backend=CpuBackend(host=host), host=host)

    rows = list(Device.objects.order_by("host", "kind", "index").values_list("host", "kind", "uuid"))
    assert len(rows) == 6 and len({uuid for _, _, uuid in rows}) == 6
    assert [(h, k) for h, k, _ in rows] == [
        ("host-a", "cpu"),
        ("host-a", "simulated"),
        ("host-a", "simulated"),
        ("host-b", "cpu"),
        ("host-b", "simulated"),
        ("host-b", "simulated"),
    ]
    assert ("host-a", "cpu", "CPU-host-a") in rows


# --- PIDs are looked for only on their own host ------------------------------------------------------


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_worker_on_another_host_is_judged_by_its_heartbeat_not_by_a_local_pid(device_factory):
    # The GPU's row names this host now (its host was renamed), but its worker ran on the old one,
    # whose PID means nothing here, even though that machine has the same name as this one: it stays
    # busy until its heartbeat stops.
    monitor_beat(host="gpu-box-old", pid=1, started_at=timezone.now())
    assert Host.objects.get(host="gpu-box-old").hostname == socket.gethostname()
    device_factory(
        "H100", worker=True, worker_host="gpu-box-old", worker_pid=_dead_pid(), worker_state=WorkerState.BUSY
    )
    [row] = device_status()
    assert (row["worker"]["state"], row["worker"]["missing_reason"]) == ("busy", "")


def test_a_second_worker_does_not_take_over_from_a_live_one_on_another_host(device_factory):
    device = device_factory("H100", worker=True, worker_host="gpu-box-old", worker_pid=_dead_pid())
    why = worker_attach(device=device, name="testhost.new", pid=os.getpid(), host="testhost")
    assert why is not None and "holds" in why
    assert Device.objects.get(pk=device.pk).worker_host == "gpu-box-old"


def test_a_dead_worker_on_this_host_is_replaced_at_once(device_factory):
    device = device_factory("H100", worker=True, worker_pid=_dead_pid())
    assert worker_attach(device=device, name="testhost.new", pid=os.getpid(), host="testhost") is None
    device.refresh_from_db()
    assert (device.worker_name, device.worker_host) == ("testhost.new", "testhost")


# --- retirement ---------------------------------------------------------------------------------------


def _silent_for(device: Device, hours: float) -> Device:
    then = timezone.now() - timedelta(hours=hours)
    Device.objects.filter(pk=device.pk).update(last_seen=then, worker_seen_at=then, created=then)
    device.refresh_from_db()
    return device


@pytest.fixture
def gone_gpu(device_factory):
    """A device nothing was heard of for 25 hours (GPU_RETIRE_AFTER_HOURS is 24)."""
    return _silent_for(device_factory("H100", worker=True), 25)


def test_a_device_unheard_of_for_a_day_is_retired_and_hidden(gone_gpu, device_factory, client, user_factory):
    live = device_factory("H100", worker=True)
    recent = _silent_for(device_factory("T4"), 23)

    assert devices_retire() == 1

    assert Device.objects.get(pk=gone_gpu.pk).retired_at is not None, "kept for history"
    assert Device.objects.get(pk=recent.pk).retired_at is None
    assert [v.id for v in device_views()] == [live.pk, recent.pk], "no placement, no stealing"
    assert [r["id"] for r in device_status()] == [live.pk, recent.pk]
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))
    data = client.get(reverse("admin:gpuscheduler_gpustatuspage_data"), {"fragments": "1"}).json()
    assert [d["id"] for d in data["devices"]] == [live.pk, recent.pk]
    assert f'id="gpu-card-{gone_gpu.pk}"' not in data["html"]["cards"]
    out = StringIO()
    call_command("gpustatus", "--json", stdout=out)
    assert gone_gpu.pk not in [d["id"] for d in json.loads(out.getvalue())["devices"]]


def test_a_retired_device_seen_again_is_back(gone_gpu):
    devices_retire()
    backend = FakeCudaBackend(uuids=(gone_gpu.uuid,))

    snapshots_record(backend=backend, host="testhost")

    assert Device.objects.get(pk=gone_gpu.pk).retired_at is None
    assert [r["id"] for r in device_status()] == [gone_gpu.pk]


def test_a_worker_that_attaches_to_a_retired_device_brings_it_back(gone_gpu):
    devices_retire()
    Device.objects.filter(pk=gone_gpu.pk).update(worker_name="")
    assert worker_attach(device=gone_gpu, name="testhost.w", pid=os.getpid(), host="testhost") is None
    assert Device.objects.get(pk=gone_gpu.pk).retired_at is None


def test_a_device_with_work_on_it_is_not_retired(gone_gpu, persona):
    sample_request_submit(persona=persona, count=1, device=gone_gpu, enqueue=False, require_worker=False)
    assert Assignment.objects.filter(planned_device=gone_gpu, state="queued").exists()
    assert devices_retire() == 0, "its queued work must stay visible until another device takes it"


def test_work_pinned_to_a_retired_device_is_refused_with_the_reason(gone_gpu, persona):
    devices_retire()
    gone_gpu.refresh_from_db()
    request = SampleRequest.objects.create(persona=persona, count=1, first_seed=1, model="tiny", steps=1)
    with pytest.raises(NoDeviceAvailable, match="is retired"), transaction.atomic():
        assignments_place(request_id=request.pk, count=1, pinned_device=gone_gpu)


def test_the_retirement_age_is_a_validated_setting(tmp_path):
    code = "from config import settings as s; print(s.GPUSCHEDULER['RETIRE_AFTER_HOURS'])"
    run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 60}
    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, **run).stdout.strip() == "24.0"
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "GPU_RETIRE_AFTER_HOURS": "0"}, **run)
    assert bad.returncode != 0
    assert "GPU_RETIRE_AFTER_HOURS=0.0 is too small: it must be at least 1" in bad.stderr


# --- upgrading a database with a row per host name ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_migration_merges_a_gpus_rows_into_the_most_recently_seen_and_renames_cpu_rows():
    executor = MigrationExecutor(connection)
    executor.migrate([("gpuscheduler", "0003_media_store")])
    old = executor.loader.project_state([("gpuscheduler", "0003_media_store")]).apps
    OldDevice = old.get_model("gpuscheduler", "Device")
    OldSnapshot = old.get_model("gpuscheduler", "Snapshot")
    OldAssignment = old.get_model("gpuscheduler", "Assignment")
    now = timezone.now()
    fields = {"name": "H100", "kind": "cuda", "health": "healthy"}
    # One GPU seen under three container hostnames; the newest name was heard of last.
    first = OldDevice.objects.create(host="c-111", uuid="GPU-aaaa", last_seen=now - timedelta(hours=3), **fields)
    second = OldDevice.objects.create(host="c-222", uuid="GPU-aaaa", last_seen=now - timedelta(hours=2), **fields)
    newest = OldDevice.objects.create(host="c-333", uuid="GPU-aaaa", last_seen=now - timedelta(minutes=1), **fields)
    for device in (first, second, newest):
        OldSnapshot.objects.create(device=device, taken_at=now, health="healthy")
    ran = OldAssignment.objects.create(
        image_count=1, job_id="old-job", queue_name="gpu.1", planned_device=first, device=second, policy="p", reason="r"
    )
    OldDevice.objects.create(host="box-a", uuid="cpu", name="CPU", kind="cpu")
    OldDevice.objects.create(host="box-b", uuid="cpu", name="CPU", kind="cpu")

    executor = MigrationExecutor(connection)
    executor.migrate([("gpuscheduler", "0004_cluster_identity")])
    try:
        new = executor.loader.project_state([("gpuscheduler", "0004_cluster_identity")]).apps
        Device = new.get_model("gpuscheduler", "Device")
        [gpu] = Device.objects.filter(uuid="GPU-aaaa")
        assert (gpu.pk, gpu.host) == (newest.pk, "c-333"), "the most recently seen row is kept"
        assert new.get_model("gpuscheduler", "Snapshot").objects.filter(device_id=gpu.pk).count() == 3
        moved = new.get_model("gpuscheduler", "Assignment").objects.get(pk=ran.pk)
        assert (moved.planned_device_id, moved.device_id) == (gpu.pk, gpu.pk), "no attempt is lost"
        assert sorted(Device.objects.filter(kind="cpu").values_list("uuid", flat=True)) == ["CPU-box-a", "CPU-box-b"]
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
