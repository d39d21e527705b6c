"""Placement makes a fixed number of queries, locks no device row, and stays exact.

Timings belong to bench/bench_placement.py; these tests check the shape that makes it fast: the
same three statements whatever the number of devices and snapshots (on PostgreSQL its reads
prepared once per connection, and its turn taken in the same round trip as the backlogs),
readings taken from the device row, no wait on a device row someone holds, and placements that
take turns, each seeing the work placed before its turn (tests/test_concurrency.py has twenty of
them at once).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpuscheduler import placement_reads
from gpuscheduler.backends import DeviceInfo, Reading
from gpuscheduler.models import Assignment, AssignmentState, Device, Snapshot
from gpuscheduler.placement import assignments_place
from gpuscheduler.placement_reads import device_views
from gpuscheduler.services import PLACEMENT_LOCK, device_observe, snapshots_record
from gpuscheduler.workloads import default_key_and_steps
from personas.models import SampleRequest

GIB = 1024**3
_chunks = itertools.count()


@pytest.fixture
def request_factory(persona_factory: Callable[..., Any]) -> Callable[[], SampleRequest]:
    def make() -> SampleRequest:
        return SampleRequest.objects.create(persona=persona_factory(), count=4, first_seed=0, model="m", steps=1)

    return make


@pytest.fixture
def postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's IMMEDIATE transactions serialize placements; no lock is taken")


def place(request: SampleRequest, count: int = 1, **options: Any) -> list[Assignment]:
    with transaction.atomic():
        return assignments_place(request_id=request.pk, count=count, **options)


def queue_on(device: Device, request: SampleRequest, images: int) -> Assignment:
    """Work already waiting on `device`: a queued attempt of `images` images."""
    first_index = 100 + next(_chunks)
    return Assignment.objects.create(
        request=request,
        first_index=first_index,
        image_count=images,
        job_id=f"queued-{device.pk}-{first_index}",
        queue_name=f"gpu.{device.pk}",
        planned_device=device,
        policy="balanced",
        reason="test",
    )


def cluster_of(count: int, device_factory: Callable[..., Device], request: SampleRequest) -> list[Device]:
    """`count` devices with live workers, curves, an hour of readings each and some queued work."""
    devices = [device_factory("H100", worker=True, speed=1.0 + i % 3) for i in range(count)]
    start = timezone.now() - timedelta(hours=1)
    Snapshot.objects.bulk_create(
        Snapshot(device=d, taken_at=start + timedelta(seconds=30 * i), memory_used=i * GIB, health="healthy")
        for d in devices
        for i in range(120)
    )
    for i, device in enumerate(devices[::2]):
        queue_on(device, request, images=1 + i % 4)
    return devices


def queries_of_one_placement(request: SampleRequest, policy: str, settings: Any) -> list[str]:
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": policy}
    with CaptureQueriesContext(connection) as captured:
        place(request, count=1, first_index=0)
    return [q["sql"] for q in captured.captured_queries]


@pytest.mark.parametrize("policy", ["balanced", "least_memory", "round_robin"])
def test_a_placement_makes_as_many_queries_with_32_devices_as_with_4(policy, device_factory, request_factory, settings):
    filler = request_factory()
    cluster_of(4, device_factory, filler)
    small = queries_of_one_placement(request_factory(), policy, settings)
    cluster_of(28, device_factory, filler)
    large = queries_of_one_placement(request_factory(), policy, settings)

    assert len(small) == len(large), (small, large)
    assert not [sql for sql in large if "gpuscheduler_snapshot" in sql], "readings come from the device rows"
    assert Device.objects.count() == 32 and Snapshot.objects.count() == 32 * 120


@pytest.mark.django_db(transaction=True)
def test_a_placement_is_three_statements_and_its_reads_are_prepared_once_per_connection(
    device_factory, request_factory
):
    connection.close()  # a new session: nothing prepared on it yet
    for _ in range(3):
        device_factory("H100", worker=True, speed=1.0)
    model, steps = default_key_and_steps()

    def statements() -> list[str]:
        request = request_factory()
        with CaptureQueriesContext(connection) as captured:
            place(request, count=4, model=model, steps=steps)
        # The placement's own: not the BEGIN and COMMIT of `place`'s transaction.
        return [q["sql"] for q in captured.captured_queries if q["sql"].split()[0] not in ("BEGIN", "COMMIT")]

    first, second = statements(), statements()

    assert [len(first), len(second)] == [3, 3], (first, second)
    assert second[2].startswith('INSERT INTO "gpuscheduler_assignment"')
    if connection.vendor == "postgresql":
        # The device read, then the turn and the backlogs in one round trip, then the insert.
        assert first[0].startswith("PREPARE gpuscheduler_read_") and first[1].startswith(TURN + "; PREPARE ")
        read, backlogs = (re.search(r"PREPARE (\S+) AS ", sql).group(1) for sql in first[:2])  # type: ignore[union-attr]
        assert second[:2] == [f"EXECUTE {read}", f"{TURN}; EXECUTE {backlogs}"]
    else:
        assert [sql.split()[0] for sql in second] == ["SELECT", "SELECT", "INSERT"]


TURN = f"SELECT pg_advisory_xact_lock({PLACEMENT_LOCK})"


@pytest.mark.django_db(transaction=True)
def test_a_placement_after_the_sessions_statements_were_dropped_fails_once_and_the_next_prepares_them_again(
    device_factory, request_factory
):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: nothing is prepared on SQLite")
    device = device_factory("H100", worker=True, speed=1.0)
    place(request_factory())
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # what a pooler's DISCARD ALL does to them

    with pytest.raises(DatabaseError, match="does not exist"):
        place(request_factory())
    (placed,) = place(request_factory())

    assert placed.planned_device_id == device.pk
    assert Assignment.objects.count() == 2


def test_the_attempts_a_placement_returns_are_the_saved_rows(device_factory, request_factory):
    device_factory("H100", worker=True, speed=1.0)
    request = request_factory()

    placed = place(request, count=2, first_index=6, attempt=2)

    stored = list(Assignment.objects.filter(request=request).order_by("first_index"))
    assert [a.pk for a in placed] == [a.pk for a in stored]
    assert [(a.first_index, a.image_count, a.attempt, a.state, a.error) for a in placed] == [
        (6, 2, 2, AssignmentState.QUEUED, "")
    ]
    assert placed[0].queued_at == stored[0].queued_at, "the database's clock, read on first use"
    placed[0].reason = "changed"
    placed[0].save()
    assert Assignment.objects.get(pk=placed[0].pk).reason == "changed"
    assert Assignment.objects.count() == 1, "saved again as the row it is, not inserted"


class FakeBackend:
    """Reports these devices with the memory each uses now (set `used[uuid]` between reads)."""

    name = "fake"

    def __init__(self, devices: list[Device]) -> None:
        self.infos = [
            DeviceInfo(uuid=d.uuid, name=d.name, kind=d.kind, index=d.index, memory_total=80 * GIB) for d in devices
        ]
        self.used = {d.uuid: GIB for d in devices}

    def devices(self) -> list[DeviceInfo]:
        return list(self.infos)

    def read(self, uuids: Any = None) -> list[Reading]:
        return [
            Reading(uuid=i.uuid, ok=True, memory_used=self.used[i.uuid], memory_total=80 * GIB, temperature=40.0)
            for i in self.infos
        ]

    def close(self) -> None:
        pass


def test_least_memory_avoids_a_device_whose_newer_reading_is_full(device_factory, request_factory, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": "least_memory"}
    first, second = device_factory("H100", worker=True), device_factory("H100", worker=True)
    backend = FakeBackend([first, second])
    backend.used = {first.uuid: 2 * GIB, second.uuid: 40 * GIB}
    snapshots_record(backend=backend, host=settings.GPUSCHEDULER["HOST"])
    (placed,) = place(request_factory())
    assert placed.planned_device_id == first.pk

    backend.used = {first.uuid: 70 * GIB, second.uuid: 3 * GIB}
    snapshots_record(backend=backend, host=settings.GPUSCHEDULER["HOST"])
    Snapshot.objects.all().delete()  # placement reads the copy on the device row, not the history
    (placed,) = place(request_factory())

    assert placed.planned_device_id == second.pk
    first.refresh_from_db()
    assert (first.memory_used, first.temperature, first.reading_at is not None) == (70 * GIB, 40.0, True)


def test_a_workers_own_reading_reaches_the_device_row(device_factory, request_factory, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": "least_memory"}
    long_ago = timezone.now() - timedelta(minutes=5)
    first = device_factory("H100", worker=True, memory_used=GIB, last_seen=long_ago)
    second = device_factory("H100", worker=True, memory_used=10 * GIB, last_seen=long_ago)

    full = Reading(uuid=first.uuid, ok=True, memory_used=60 * GIB, memory_total=80 * GIB, temperature=50.0)
    device_observe(device=first, reading=full)
    (placed,) = place(request_factory())

    assert placed.planned_device_id == second.pk
    assert [v.memory_used for v in device_views([Device.objects.get(pk=first.pk)])] == [60 * GIB]


def test_work_placed_after_the_devices_were_read_counts(device_factory, request_factory, monkeypatch):
    first, second = device_factory("H100", worker=True, speed=1.0), device_factory("H100", worker=True, speed=1.0)
    real = placement_reads.device_reads

    def then_another_press(*args: Any, **kwargs: Any) -> Any:
        reads = real(*args, **kwargs)
        queue_on(first, request_factory(), images=6)  # committed while this placement waited for its turn
        return reads

    # A press reads the devices through recent_device_reads, which calls this.
    monkeypatch.setattr(placement_reads, "device_reads", then_another_press)

    (placed,) = place(request_factory())

    assert placed.planned_device_id == second.pk


class Held:
    """One device row locked FOR UPDATE (FOR NO KEY UPDATE, the lock an UPDATE of it takes, with
    `no_key`) from a connection of its own until release()."""

    def __init__(self, device: Device, *, no_key: bool = False) -> None:
        self.locked, self.released = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(device.pk, no_key), daemon=True)
        self.thread.start()
        assert self.locked.wait(30), "the holder never got its lock"

    def _hold(self, pk: int, no_key: bool) -> None:
        try:
            with transaction.atomic():
                Device.objects.select_for_update(no_key=no_key).filter(pk=pk).get()
                self.locked.set()
                self.released.wait(60)
        finally:
            connection.close()

    def release(self) -> None:
        self.released.set()
        self.thread.join(30)


@pytest.fixture
def hold() -> Iterator[Callable[..., Held]]:
    held: list[Held] = []

    def make(device: Device, *, no_key: bool = False) -> Held:
        held.append(Held(device, no_key=no_key))
        return held[-1]

    yield make
    for holder in held:
        holder.release()


class Placing:
    """A placement on a thread and a connection of its own."""

    def __init__(self, request: SampleRequest, **options: Any) -> None:
        self.result: list[Assignment] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(request, options), daemon=True)
        self.thread.start()

    def _run(self, request: SampleRequest, options: dict[str, Any]) -> None:
        try:
            self.result = place(request, **options)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()

    def finished(self, timeout: float = 30) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_placement_does_not_wait_for_a_lock_on_a_device_it_did_not_choose(
    postgresql, device_factory, request_factory, hold
):
    busy, idle = device_factory("H100", worker=True, speed=1.0), device_factory("H100", worker=True, speed=1.0)
    queue_on(busy, request_factory(), images=4)
    holder = hold(busy)  # a monitor tick, a press or an operator holding the busy device's row

    placing = Placing(request_factory())

    assert placing.finished(), "the placement waited for the lock on a device it did not choose"
    assert placing.error is None, placing.error
    assert [a.planned_device_id for a in placing.result or []] == [idle.pk]
    holder.release()


@pytest.mark.django_db(transaction=True)
def test_a_placement_does_not_wait_for_an_update_of_the_device_it_chose(
    postgresql, device_factory, request_factory, hold
):
    only = device_factory("H100", worker=True, speed=1.0)
    holder = hold(only, no_key=True)  # a heartbeat or a health change in flight on its row

    placing = Placing(request_factory())

    assert placing.finished(), "the placement waited for the device's row (it takes no lock on it)"
    assert placing.error is None, placing.error
    assert [a.planned_device_id for a in placing.result or []] == [only.pk]
    holder.release()


class Open:
    """A placement on a thread and a connection of its own, its transaction kept open until close()."""

    def __init__(self, request: SampleRequest) -> None:
        self.placed, self.closed = threading.Event(), threading.Event()
        self.result: list[Assignment] = []
        self.thread = threading.Thread(target=self._run, args=(request,), daemon=True)
        self.thread.start()
        assert self.placed.wait(30), "the first placement never finished"

    def _run(self, request: SampleRequest) -> None:
        try:
            with transaction.atomic():
                self.result = assignments_place(request_id=request.pk, count=1)
                self.placed.set()
                self.closed.wait(60)
        finally:
            connection.close()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(30)


@pytest.mark.django_db(transaction=True)
def test_placements_take_turns_and_each_sees_the_work_of_the_one_before(postgresql, device_factory, request_factory):
    first, second = sorted((device_factory("H100", worker=True, speed=1.0) for _ in range(2)), key=lambda d: d.pk)
    earlier = Open(request_factory())  # placed, not committed yet
    assert [a.planned_device_id for a in earlier.result] == [first.pk]

    later = Placing(request_factory())
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing
    while lock_waiters() < 1:
        assert later.thread.is_alive(), later.error or later.result
        assert time.monotonic() < deadline, "the second placement did not wait for its turn"
        time.sleep(0.02)
    earlier.close()

    assert later.finished(), "the second placement never got its turn"
    assert later.error is None, later.error
    assert [a.planned_device_id for a in later.result or []] == [second.pk], "it saw the first one's image"
