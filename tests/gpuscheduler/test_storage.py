"""The media store as a health input: a full disk or a read-only media folder stops new work on its
host, says why on the status page and in gpustatus, and work resumes at the next good reading.

Root ignores file permissions, so a read-only folder cannot be made with chmod here: the probe's
write (storage._probe_write) and shutil.disk_usage are replaced where a test needs a bad reading.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections import namedtuple
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import transaction
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from gpuscheduler import simulated, storage
from gpuscheduler.assignments import NoDeviceAvailable, assignments_place
from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.models import Assignment, MediaStore, WorkerState
from gpuscheduler.placement_reads import device_views, steal_sources
from gpuscheduler.policies import store_admit
from gpuscheduler.storage import (
    StoreReading,
    store_admits,
    store_check,
    store_refresh,
    store_report_error,
)
from gpuscheduler.worker import GpuWorker
from personas.models import SampleRequest
from personas.services import sample_request_submit
from tests.media import media_root

pytestmark = pytest.mark.django_db

HOST = "testhost"
Usage = namedtuple("Usage", "total used free")
MB = 1024**2
ROOT = Path(__file__).resolve().parents[2]


def failing_write(code: int):
    def write(store, name: str) -> None:
        raise OSError(code, os.strerror(code), str(media_root() / name))

    return write


def age_verdict(seconds: float = storage.STORE_CHECK_SECONDS + 1) -> None:
    MediaStore.objects.update(checked_at=timezone.now() - timedelta(seconds=seconds))


# --- the rule and the reading ----------------------------------------------------------------------


def test_a_store_is_admitted_only_when_writable_and_above_the_free_space_floor():
    assert store_admit(ok=True, error="", free_bytes=600 * MB, min_free_bytes=512 * MB).ok
    low = store_admit(ok=True, error="", free_bytes=100 * MB, min_free_bytes=512 * MB)
    assert (low.ok, low.reason) == (False, "only 100 MB free, below STORAGE_MIN_FREE_MB=512")
    full = store_admit(ok=False, error="No space left on device: media/samples/x", free_bytes=0, min_free_bytes=0)
    assert (full.ok, full.reason) == (False, "No space left on device: media/samples/x")


def test_a_writable_folder_reads_healthy_and_the_probe_leaves_no_file(settings):
    media = media_root()
    left = media / "samples" / "persona-1"
    left.mkdir(parents=True)
    killed = media / f"{storage.PROBE_PREFIX}otherhost-999999"  # of a process killed mid-probe, long ago
    killed.write_bytes(b"x")
    os.utime(killed, (0, 0))
    row = store_check(host=HOST)
    assert row.healthy and row.free_bytes > 0 and row.total_bytes >= row.free_bytes
    assert row.path == str(media), "the media folder, created if missing"
    assert sorted(p.name for p in media.iterdir()) == ["samples"], "outside samples/, which holds images alone"
    assert list(left.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "text"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")],
    ids=["disk-full", "read-only"],
)
def test_a_probe_that_cannot_write_makes_the_store_unhealthy_with_the_real_error(monkeypatch, code, text):
    monkeypatch.setattr(storage, "_probe_write", failing_write(code))
    row = store_check(host=HOST)
    assert not row.healthy
    assert row.reason == f"{text}: media/.storage-probe-{HOST}-{os.getpid()}"
    assert store_admits(host=HOST) == (False, f"the media store of {HOST} is unhealthy: {row.reason}")


def test_free_space_below_storage_min_free_mb_makes_the_store_unhealthy(monkeypatch, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "STORAGE_MIN_FREE_MB": 512}
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(1000 * MB, 900 * MB, 100 * MB))
    row = store_check(host=HOST)
    assert (row.healthy, row.reason, row.free_bytes) == (
        False,
        "only 100 MB free, below STORAGE_MIN_FREE_MB=512",
        100 * MB,
    )


def test_the_next_good_reading_makes_the_store_healthy_again(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(storage, "_probe_write", failing_write(errno.ENOSPC))
        assert not store_check(host=HOST).healthy
    # The failed probe a second back: on SQLite (a millisecond's resolution) the next one could
    # otherwise fall in the same millisecond, where a tie goes to the error.
    MediaStore.objects.filter(host=HOST).update(checked_at=F("checked_at") - timedelta(seconds=1))
    row = store_check(host=HOST)
    assert row.healthy and row.changed_at == row.checked_at
    assert store_admits(host=HOST) == (True, "")


def test_a_simulated_storage_fault_fails_the_probe_until_it_is_cleared():
    simulated.set_storage_fault(HOST, "erofs")
    row = store_check(host=HOST)
    assert not row.healthy
    assert row.reason == f"Read-only file system (simulated): media/.storage-probe-{HOST}-{os.getpid()}"
    simulated.set_storage_fault(HOST, None)
    assert store_check(host=HOST).healthy


# --- a write error reported by a worker ------------------------------------------------------------


def test_a_reported_write_error_is_not_hidden_by_a_probe_that_began_before_it(monkeypatch):
    error = "No space left on device: media/samples/persona-1/r1-0.png"

    def read_while_a_worker_fails(*, host: str) -> StoreReading:
        store_report_error(host=HOST, error=error)  # lands while this probe is under way
        return StoreReading(path=str(media_root()), writable=True, free_bytes=10_000 * MB, total_bytes=20_000 * MB)

    monkeypatch.setattr(storage, "store_read", read_while_a_worker_fails)
    row = store_check(host=HOST)
    assert (row.healthy, row.reason) == (False, error)
    assert MediaStore.objects.get(host=HOST).reason == error


def test_a_reported_write_error_holds_until_a_probe_is_due_then_a_good_probe_clears_it(monkeypatch):
    store_check(host=HOST)
    store_report_error(host=HOST, error="No space left on device: media/samples/persona-1/r1-0.png")
    probes = []
    real_read = storage.store_read
    monkeypatch.setattr(storage, "store_read", lambda **kwargs: probes.append(kwargs) or real_read(**kwargs))

    ok, why = store_admits(host=HOST)
    assert (ok, probes) == (False, []), "no probe within STORE_CHECK_SECONDS of the report"
    assert why.endswith("No space left on device: media/samples/persona-1/r1-0.png")

    age_verdict()
    assert store_admits(host=HOST) == (True, "")
    assert len(probes) == 1


def test_the_store_is_probed_at_most_once_per_check_interval(monkeypatch):
    probes = []
    real_read = storage.store_read
    monkeypatch.setattr(storage, "store_read", lambda **kwargs: probes.append(kwargs) or real_read(**kwargs))
    for _ in range(5):
        store_refresh(host=HOST)
    assert len(probes) == 1
    age_verdict()
    store_refresh(host=HOST)
    assert len(probes) == 2


# --- no new work while unhealthy --------------------------------------------------------------------


@pytest.fixture
def full_store() -> str:
    error = "No space left on device: media/samples/persona-1/r1-0.png"
    store_report_error(host=HOST, error=error)
    return error


def test_devices_of_a_host_whose_store_is_unhealthy_take_no_new_work(full_store, device_factory, persona_factory):
    here = device_factory("H100", worker=True)
    elsewhere = device_factory("H100", worker=True, host="otherhost")
    views = {v.id: v for v in device_views()}
    assert not views[here.pk].healthy and views[elsewhere.pk].healthy
    assert views[here.pk].blocked == f"paused (the media store of {HOST} is unhealthy: {full_store})"
    request = sample_request_submit(persona=persona_factory(), count=4, enqueue=False).request
    assert set(Assignment.objects.filter(request=request).values_list("planned_device", flat=True)) == {elsewhere.pk}


def test_when_no_host_can_write_placement_says_why(full_store, device_factory, persona_factory):
    device = device_factory("H100", worker=True)
    request = SampleRequest.objects.create(persona=persona_factory(), count=1, first_seed=1, model="tiny", steps=1)
    with pytest.raises(NoDeviceAvailable) as error, transaction.atomic():
        assignments_place(request_id=request.pk, count=1)
    assert f"{device.label} is paused (the media store of {HOST} is unhealthy: {full_store})" in str(error.value)


def test_work_queued_on_a_host_that_cannot_write_is_stolen_by_another_host(device_factory, persona_factory):
    paused = device_factory("H100", worker=True)
    sample_request_submit(persona=persona_factory(), count=1, enqueue=False)
    assert Assignment.objects.filter(planned_device=paused, state="queued").exists()
    other = device_factory("H100", worker=True, host="otherhost")
    assert steal_sources(other.pk) == set(), "an idle twin leaves a single call to its owner"
    store_report_error(host=HOST, error="Read-only file system: media/samples/persona-1/r1-0.png")
    assert steal_sources(other.pk) == {paused.pk}


@pytest.mark.django_db(transaction=True)
def test_the_worker_takes_no_work_while_its_store_is_unhealthy_and_resumes_by_itself(device_factory, redis_db):
    device = device_factory("H100", worker=True)
    worker = GpuWorker(WorkerContext(device=device, name="w", host=HOST, generator=None), connection=redis_db)
    assert worker.housekeeping() is True
    store_report_error(host=HOST, error="No space left on device: media/samples/persona-1/r1-0.png")
    # Another worker of this host met the full disk: this one sees it once its admission is no
    # longer fresh (ADMISSION_FRESH_SECONDS after its last reading; at once for a fault of its own).
    worker.context.admission_expire()
    assert worker.housekeeping() is False
    assert worker.idle_state == WorkerState.PAUSED
    age_verdict()  # the next probe is due, and the disk has room again
    assert worker.housekeeping() is True
    assert worker.idle_state == WorkerState.IDLE


# --- what it shows ------------------------------------------------------------------------------------


def test_the_status_page_shows_an_unhealthy_store_with_the_reason(full_store, client, user_factory):
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))
    data = client.get(reverse("admin:gpuscheduler_gpustatuspage_data"), {"fragments": "1"}).json()
    [store] = data["storage"]
    assert (store["host"], store["healthy"], store["reason"]) == (HOST, False, full_store)
    html = data["html"]["storage"]
    assert 'class="errornote gpu-storage-unhealthy"' in html
    assert f"The media store of {HOST} is unhealthy since" in html and full_store in html
    assert "No new work starts on testhost" in html
    page = client.get(reverse("admin:gpuscheduler_gpustatuspage_changelist")).content.decode()
    assert 'id="gpu-storage"' in page and full_store in page


def test_gpustatus_shows_the_store_in_the_table_and_in_json(full_store, device_factory):
    device_factory("H100")
    out = StringIO()
    call_command("gpustatus", stdout=out)
    assert f"media store of {HOST}: UNHEALTHY, no work starts: {full_store}" in out.getvalue()
    out = StringIO()
    call_command("gpustatus", "--json", stdout=out)
    [store] = json.loads(out.getvalue())["storage"]
    assert (store["host"], store["healthy"], store["reason"]) == (HOST, False, full_store)


def test_a_healthy_store_is_one_quiet_line_in_gpustatus(device_factory):
    device_factory("H100")
    store_check(host=HOST)
    out = StringIO()
    call_command("gpustatus", stdout=out)
    assert f"media store of {HOST}: healthy, " in out.getvalue() and "GiB free" in out.getvalue()


# --- the setting ----------------------------------------------------------------------------------------


def settings_value(tmp_path: Path, value: str) -> subprocess.CompletedProcess[str]:
    code = "from config import settings as s; print(s.GPUSCHEDULER['STORAGE_MIN_FREE_MB'])"
    environment = {k: v for k, v in os.environ.items() if k != "STORAGE_MIN_FREE_MB"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environment, "DATA_DIR": str(tmp_path), **({"STORAGE_MIN_FREE_MB": value} if value else {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_storage_min_free_mb_defaults_to_512_and_reads_the_environment(tmp_path):
    assert settings_value(tmp_path, "").stdout.strip() == "512"
    assert settings_value(tmp_path, "2048").stdout.strip() == "2048"


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_storage_min_free_mb_stops_the_import_naming_the_variable(tmp_path, value):
    result = settings_value(tmp_path, value)
    assert result.returncode != 0
    assert "ImproperlyConfigured: STORAGE_MIN_FREE_MB" in result.stderr
