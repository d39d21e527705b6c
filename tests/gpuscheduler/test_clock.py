"""One clock: every lease, heartbeat, deadline and "seen at" is written and judged on the database's
time, whatever the clock of the host that writes or reads it says; times shown to people are in
TIME_ZONE, with the zone's name.

Here this process's clock is made to run a day ahead or a day behind (timezone.now patched; the
database's clock is untouched). A value "on the database's clock" lies within a minute of db_now().
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from gpuscheduler import storage
from gpuscheduler.assignments import (
    assignment_claim,
    assignment_heartbeat,
    assignment_requeue,
    assignment_succeed,
    canary_finish,
    canary_start,
)
from gpuscheduler.backends import DeviceInfo, Reading
from gpuscheduler.clock import DbNow, clock_text, db_now
from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceKind, Health, MediaStore, Snapshot
from gpuscheduler.page_reads import device_status
from gpuscheduler.queues import enqueue_assignments
from gpuscheduler.recovery import assignments_recover
from gpuscheduler.selectors import device_stale, live_worker, worker_alive
from gpuscheduler.services import (
    device_observe,
    device_probation_end,
    device_set_unhealthy,
    device_upsert,
    snapshots_record,
    worker_attach,
    worker_beat,
)
from gpuscheduler.simulated import SimulatedBackend
from gpuscheduler.status import status_page
from gpuscheduler.storage import StoreReading, store_check, store_refresh, store_report_error
from personas.models import SampleRequest
from personas.services import (
    sample_request_cancel,
    sample_request_mark_started,
    sample_request_refresh,
    sample_request_submit,
)

pytestmark = pytest.mark.django_db

HOST = "testhost"
GIB = 1024**3


@pytest.fixture(params=[1, -1], ids=["host-clock-a-day-ahead", "host-clock-a-day-behind"])
def host_clock_off(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make this process's wall clock run a day off from the database's."""

    def shift() -> None:
        real, offset = timezone.now, timedelta(days=request.param)
        monkeypatch.setattr(timezone, "now", lambda: real() + offset)

    return shift


def assert_database_time(*values: datetime | None) -> None:
    now = db_now()
    for value in values:
        assert value is not None and abs((value - now).total_seconds()) < 60, f"{value} is not near {now}"


def reading(device: Device, temperature: float = 40.0) -> Reading:
    return Reading(uuid=device.uuid, ok=True, memory_used=0, memory_total=80 * GIB, temperature=temperature)


# --- the clock ------------------------------------------------------------------------------------


def test_db_now_is_the_databases_time_not_the_hosts(host_clock_off):
    host_clock_off()
    assert abs((db_now() - timezone.now()).total_seconds()) > 23 * 3600
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")  # db_now() left the connection usable
    assert db_now().utcoffset() == timedelta(0)


def test_a_database_time_written_reads_back_equal_to_itself(device_factory):
    """Recovery and attach UPDATE a row only where a time still equals what they read: the database's
    time must survive the round trip through Python exactly."""
    device = device_factory("H100")
    for _ in range(20):
        Device.objects.filter(pk=device.pk).update(worker_seen_at=DbNow())
        seen = Device.objects.values_list("worker_seen_at", flat=True).get(pk=device.pk)
        assert Device.objects.filter(pk=device.pk, worker_seen_at=seen).exists()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's text format of datetimes")
@pytest.mark.parametrize("stored", ["2024-01-02 03:04:05.000", "2024-01-02 03:04:05.250"])
def test_on_sqlite_the_database_time_is_written_as_django_writes_datetimes(stored):
    from gpuscheduler.clock import _SQLITE_NOW

    sql = _SQLITE_NOW.replace("%%%%", "%").replace("'now'", f"'{stored}'")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}")
        written = cursor.fetchone()[0]
    assert written == connection.ops.adapt_datetimefield_value(datetime.fromisoformat(stored).replace(tzinfo=UTC))


# --- every writer ---------------------------------------------------------------------------------


def test_a_workers_presence_and_its_devices_health_are_written_on_the_database_clock(device_factory, host_clock_off):
    device = device_factory("H100")
    Device.objects.filter(pk=device.pk).update(last_seen=None)
    host_clock_off()

    assert worker_attach(device=device, name="w1", pid=os.getpid(), host=HOST) is None
    assert_database_time(Device.objects.get(pk=device.pk).worker_seen_at)
    Device.objects.filter(pk=device.pk).update(worker_seen_at=None)
    assert worker_beat(device=device, name="w1", state="idle")
    assert_database_time(Device.objects.get(pk=device.pk).worker_seen_at)

    device_observe(device=device, reading=reading(device))
    assert_database_time(Device.objects.get(pk=device.pk).last_seen)
    device_set_unhealthy(device=device, reason="model does not load")
    assert_database_time(Device.objects.get(pk=device.pk).health_changed_at)
    Device.objects.filter(pk=device.pk).update(health_changed_at=None)
    assert device_observe(device=device, reading=reading(device)) == Health.PROBATION
    assert_database_time(Device.objects.get(pk=device.pk).health_changed_at)
    Device.objects.filter(pk=device.pk).update(health_changed_at=None)
    assert device_probation_end(device=device, passed=True, detail="1 image in 0.1 s")
    assert_database_time(Device.objects.get(pk=device.pk).health_changed_at)

    new = device_upsert(info=DeviceInfo(uuid="SIM-clock-new", name="T4", kind=DeviceKind.SIMULATED), host=HOST)
    assert_database_time(new.created, Device.objects.get(pk=new.pk).created)


def test_the_monitors_snapshots_and_the_media_store_are_stamped_on_the_database_clock(host_clock_off):
    backend = SimulatedBackend("sim*2", host=HOST)
    host_clock_off()

    snapshots = snapshots_record(backend=backend, host=HOST)

    assert len(snapshots) == 2
    assert_database_time(*Snapshot.objects.values_list("taken_at", flat=True))
    assert_database_time(*Device.objects.values_list("last_seen", flat=True))
    assert_database_time(*Device.objects.values_list("created", flat=True))

    store_check(host=HOST, reading=StoreReading(path="media", writable=True, free_bytes=GIB, total_bytes=2 * GIB))
    assert_database_time(MediaStore.objects.get(host=HOST).checked_at)
    store_report_error(host=HOST, error="No space left on device: media/samples/x.png")
    row = MediaStore.objects.get(host=HOST)
    assert_database_time(row.checked_at, row.changed_at)
    assert not row.healthy


def test_an_attempt_is_queued_claimed_kept_and_ended_on_the_database_clock(
    persona, device_factory, redis_db, host_clock_off
):
    device = device_factory("H100", worker=True)
    host_clock_off()

    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    (attempt,) = Assignment.objects.filter(request=request)
    assert_database_time(request.created, SampleRequest.objects.get(pk=request.pk).created, attempt.queued_at)
    assert enqueue_assignments([attempt]) == 1
    assert_database_time(Assignment.objects.get(pk=attempt.pk).enqueued_at)

    claimed = assignment_claim(assignment_id=attempt.pk, device=device, worker_name="w", host=HOST, timeout=600)
    assert claimed is not None
    assert_database_time(claimed.started_at, claimed.heartbeat_at)
    assert claimed.deadline_at == claimed.started_at + timedelta(seconds=600)
    sample_request_mark_started(request_id=request.pk)
    assert_database_time(SampleRequest.objects.get(pk=request.pk).started_at)
    Assignment.objects.filter(pk=attempt.pk).update(heartbeat_at=None)
    assert assignment_heartbeat(assignment_id=attempt.pk)
    assert_database_time(Assignment.objects.get(pk=attempt.pk).heartbeat_at)
    with transaction.atomic():
        assert assignment_succeed(assignment_id=attempt.pk, calls=1, peak_memory=None)
    assert_database_time(Assignment.objects.get(pk=attempt.pk).finished_at)
    sample_request_refresh(request_id=request.pk)
    assert_database_time(SampleRequest.objects.get(pk=request.pk).finished_at)

    canary = canary_start(device=device, worker_name="w", host=HOST, timeout=60)
    canary = Assignment.objects.get(pk=canary.pk)
    assert_database_time(canary.queued_at, canary.started_at, canary.heartbeat_at)
    assert canary_finish(assignment_id=canary.pk, passed=True)
    assert_database_time(Assignment.objects.get(pk=canary.pk).finished_at)


def test_a_requeued_or_cancelled_attempt_is_stamped_on_the_database_clock(persona, device_factory, host_clock_off):
    device, _ = device_factory("H100", worker=True), device_factory("H100", worker=True)
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    first, second = Assignment.objects.filter(request=request).order_by("first_index")
    host_clock_off()

    assert assignment_claim(assignment_id=first.pk, device=device, worker_name="w", host=HOST, timeout=60)
    assert assignment_requeue(assignment_id=first.pk, error="media store: No space left on device")
    assert_database_time(Assignment.objects.get(pk=first.pk).enqueued_at)
    assert sample_request_cancel(request=request) == 2
    assert_database_time(
        SampleRequest.objects.get(pk=request.pk).finished_at, Assignment.objects.get(pk=second.pk).finished_at
    )


def test_a_probe_and_a_reported_write_error_at_the_same_database_time_leave_the_error(monkeypatch):
    """SQLite's time has millisecond resolution: a tie between a probe and a worker's report goes to the error."""
    at = db_now()
    monkeypatch.setattr(storage, "db_now", lambda: at)
    good = StoreReading(path="media", writable=True, free_bytes=GIB, total_bytes=2 * GIB)

    store_check(host=HOST, reading=good)
    store_report_error(host=HOST, error="No space left on device: media/samples/x.png")
    assert not MediaStore.objects.get(host=HOST).healthy
    store_check(host=HOST, reading=good)
    assert not MediaStore.objects.get(host=HOST).healthy


# --- every reader -----------------------------------------------------------------------------------


def test_a_host_whose_clock_is_a_day_off_judges_live_and_dead_workers_by_the_database_clock(
    persona, device_factory, redis_db, monkeypatch, host_clock_off
):
    live = device_factory("H100", worker=True)
    dead = device_factory("H100", worker=True)
    request = sample_request_submit(persona=persona, count=2, enqueue=False).request
    on_live, on_dead = Assignment.objects.filter(request=request).order_by("first_index")
    for attempt, device in ((on_live, live), (on_dead, dead)):
        assert assignment_claim(assignment_id=attempt.pk, device=device, worker_name="w", host=HOST, timeout=600)
    # The dead host's worker and monitor last wrote an hour ago, by the database's clock.
    hour_ago = DbNow() - timedelta(hours=1)
    Device.objects.filter(pk=live.pk).update(worker_seen_at=DbNow(), last_seen=DbNow())
    Device.objects.filter(pk=dead.pk).update(
        worker_seen_at=hour_ago, last_seen=hour_ago, created=DbNow() - timedelta(days=2)
    )
    Assignment.objects.filter(pk=on_dead.pk).update(heartbeat_at=hour_ago)
    store_check(host=HOST, reading=StoreReading(path="media", writable=True, free_bytes=GIB, total_bytes=2 * GIB))
    live.refresh_from_db()
    dead.refresh_from_db()
    host_clock_off()

    assert worker_alive(live) and not worker_alive(dead)
    assert list(Device.objects.filter(live_worker()).values_list("pk", flat=True)) == [live.pk]
    assert device_stale(live) is None
    assert device_stale(dead) == pytest.approx(3600, abs=60)
    rows = {row["id"]: row for row in device_status()}
    assert (rows[live.pk]["health"], rows[live.pk]["worker"]["state"]) == (Health.HEALTHY, "idle")
    assert (rows[dead.pk]["health"], rows[dead.pk]["worker"]["state"]) == ("stale", "missing")
    assert rows[dead.pk]["worker"]["heartbeat_age_seconds"] == pytest.approx(3600, abs=60)

    monkeypatch.setattr(storage, "store_read", lambda path: pytest.fail("a verdict of a moment ago is probed again"))
    assert store_refresh(host=HOST).healthy

    report = assignments_recover()
    assert report.abandoned == [on_dead.job_id]
    assert Assignment.objects.get(pk=on_live.pk).state == AssignmentState.RUNNING


# --- times for people ---------------------------------------------------------------------------------


def test_times_in_messages_and_on_the_status_page_are_in_time_zone_with_its_name(
    settings, persona, device_factory, redis_db
):
    settings.TIME_ZONE = "Asia/Kolkata"  # UTC+05:30 all year: never the same clock time as UTC
    device = device_factory("H100", worker=True, health=Health.UNHEALTHY)
    healthy = device_factory("H100", worker=True)

    device_observe(device=device, reading=reading(device))
    device.refresh_from_db()
    assert device.health_changed_at is not None
    local = timezone.localtime(device.health_changed_at)
    assert device.health_reason == f"readings within limits again since {local:%H:%M:%S} IST; waiting for a canary job"

    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    (attempt,) = Assignment.objects.filter(request=request)
    assert assignment_claim(assignment_id=attempt.pk, device=healthy, worker_name="w", host=HOST, timeout=600)
    Assignment.objects.filter(pk=attempt.pk).update(heartbeat_at=DbNow() - timedelta(minutes=5))
    assignments_recover()
    attempt.refresh_from_db()
    assert attempt.heartbeat_at is not None
    assert attempt.error.endswith(f"(last {clock_text(attempt.heartbeat_at)})")
    assert clock_text(attempt.heartbeat_at) == f"{timezone.localtime(attempt.heartbeat_at):%H:%M:%S} IST"

    page = status_page()
    assert page["generated_text"] == clock_text(datetime.fromisoformat(page["generated_at"]))
    assert page["generated_text"].endswith(" IST")
