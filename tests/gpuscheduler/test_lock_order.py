"""Placement, recovery and the monitor's tick take their locks in one order: presses, reconcilers and
ticks never deadlock.

PostgreSQL only: SQLite's IMMEDIATE transactions serialize writers, so there are no row locks to
take in the wrong order. Each thread works on a connection of its own, as web processes, workers
and monitors do. Placement locks no device row (the placement turn alone makes it exact), so the
windows where the old orders deadlocked (the dead worker's device row first, then every device in
pk order; a tick's multi-row writes in table order) are now made by holding the placement turn:
everyone piles up behind it, holding what they took before it, then goes at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from gpuscheduler.assignments import assignment_claim, assignments_place
from gpuscheduler.backends import DeviceInfo, Reading
from gpuscheduler.models import LIVE_STATES, Assignment, AssignmentState, Device
from gpuscheduler.recovery import assignments_recover
from gpuscheduler.services import placement_turn, snapshots_record
from personas.models import SampleRequest
from personas.services import sample_request_submit

pytestmark = pytest.mark.django_db(transaction=True)

ROUNDS = 3
PRESSES = 3
RECONCILERS = 2


@pytest.fixture
def postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: SQLite serializes writers (IMMEDIATE transactions), so no row lock order exists")


class Outcome:
    """`work()` on a thread and a database connection of its own; its result or its exception."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self.result = work()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()

    def join(self) -> None:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "a thread is still blocked after 60 s"


def lock_waiters() -> int:
    """Sessions of this test database waiting for a lock right now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


def wait_for_waiters(count: int) -> None:
    deadline = time.monotonic() + 30
    while lock_waiters() < count:
        assert time.monotonic() < deadline, f"expected {count} sessions waiting for a lock, saw {lock_waiters()}"
        time.sleep(0.02)


@pytest.fixture
def hold_turn() -> Iterator[Callable[[], threading.Event]]:
    """Hold the placement turn from a connection of its own (a press or a monitor's tick in its
    turn) until the returned event is set."""
    holders: list[tuple[threading.Event, Outcome]] = []

    def hold() -> threading.Event:
        locked, release = threading.Event(), threading.Event()

        def work() -> None:
            with transaction.atomic():
                placement_turn()
                locked.set()
                release.wait(60)

        holders.append((release, Outcome(work)))
        assert locked.wait(30), "the holder never got the turn"
        return release

    yield hold
    for release, outcome in holders:
        release.set()
        outcome.join()


def dead_attempt_on(device: Device, persona: Any) -> Assignment:
    """A running attempt on `device` whose worker stopped beating an hour ago (and is still shown there)."""
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    queued = Assignment.objects.get(request=request)
    claimed = assignment_claim(assignment_id=queued.pk, device=device, worker_name="dead", host="testhost", timeout=600)
    assert claimed is not None
    Assignment.objects.filter(pk=claimed.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    Device.objects.filter(pk=device.pk).update(current_assignment=claimed)
    return Assignment.objects.get(pk=claimed.pk)


def test_presses_and_reconcilers_at_once_never_deadlock_and_retry_each_dead_attempt_once(
    postgresql, persona_factory, device_factory, redis_db, hold_turn
):
    devices = [device_factory("H100", worker=True) for _ in range(6)]
    top = max(devices, key=lambda d: d.pk)
    dead: list[Assignment] = []

    for _ in range(ROUNDS):
        dead.append(dead_attempt_on(top, persona_factory()))
        # The presses hold their personas' rows and queue up for the turn; the reconcilers come
        # while they wait: the winner holds the dead attempt's row and queues up for the turn to
        # place its retry, the other waits for that row. Under the old order the winner held the
        # dead worker's device row by then, so a press that had to lock it closed a cycle.
        release = hold_turn()
        presses = [
            Outcome(lambda p=persona_factory(): sample_request_submit(persona=p, count=4)) for _ in range(PRESSES)
        ]
        wait_for_waiters(PRESSES)
        reconcilers = [Outcome(assignments_recover) for _ in range(RECONCILERS)]
        wait_for_waiters(PRESSES + RECONCILERS)
        release.set()
        for outcome in presses + reconcilers:
            outcome.join()

        errors = [o.error for o in presses + reconcilers if o.error is not None]
        assert not errors, errors
        assert sum(o.result.abandoned == [dead[-1].job_id] for o in reconcilers) == 1, "one reconciler abandons it"

    for attempt in dead:
        attempt.refresh_from_db()
        assert attempt.state == AssignmentState.ABANDONED
        (retry,) = Assignment.objects.filter(request_id=attempt.request_id, attempt=2)
        assert (retry.first_index, retry.image_count, retry.state) == (0, 1, AssignmentState.QUEUED)
        assert retry.planned_device_id != top.pk, "the retry avoids the device its worker died on"
    assert not Device.objects.filter(current_assignment__isnull=False).exists(), "no device shows a dead attempt"
    # Every chunk of every request has exactly one live attempt, and Redis holds its job once.
    requests = list(SampleRequest.objects.all())
    assert len(requests) == ROUNDS * (1 + PRESSES)
    for request in requests:
        live = Assignment.objects.filter(request=request, state__in=LIVE_STATES)
        assert sorted(i for a in live for i in a.indexes) == list(range(request.count)), request
        for attempt in live:
            assert redis_db.lrange(f"rq:queue:{attempt.queue_name}", 0, -1).count(attempt.job_id.encode()) == 1


class ReadsInReverse:
    """A backend reporting `devices` as they are, read last to first (as NVML's index order may be)."""

    name = "fake"

    def __init__(self, devices: list[Device]) -> None:
        self.infos = [
            DeviceInfo(uuid=d.uuid, name=d.name, kind=d.kind, index=d.index, memory_total=d.memory_total)
            for d in devices
        ]

    def devices(self) -> list[DeviceInfo]:
        return list(self.infos)

    def read(self, uuids: Any = None) -> list[Reading]:
        return [
            Reading(uuid=i.uuid, ok=True, memory_used=1024**3, memory_total=i.memory_total, temperature=40.0)
            for i in reversed(self.infos)
        ]

    def close(self) -> None:
        pass


def test_a_monitor_tick_during_a_press_never_deadlocks(postgresql, persona_factory, device_factory, settings):
    first, middle, last = sorted(
        (device_factory("H100", worker=True, health_reason="readings within limits") for _ in range(3)),
        key=lambda d: d.pk,
    )
    # A device row's newest version goes to the end of its table page: the table now reads
    # last, first, middle, which is the order a multi-row UPDATE that scans it locks them in.
    Device.objects.filter(pk=first.pk).update(name="H100")
    Device.objects.filter(pk=middle.pk).update(name="H100")
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM gpuscheduler_device ORDER BY ctid")
        assert [row[0] for row in cursor.fetchall()] == [last.pk, first.pk, middle.pk]
    request = SampleRequest.objects.create(persona=persona_factory(), count=2, first_seed=0, model="m", steps=1)
    backend = ReadsInReverse([first, middle, last])
    placed, release = threading.Event(), threading.Event()

    def press() -> list[Assignment]:
        with transaction.atomic():
            # Two images on three idle devices: one on the first, one on the middle.
            assignments = assignments_place(request_id=request.pk, count=2)
            placed.set()
            release.wait(60)  # in its turn, not committed yet
        return assignments

    def tick() -> int:
        with connection.cursor() as cursor:
            # What the planner does on a table of a few pages, made certain.
            cursor.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
        return len(snapshots_record(backend=backend, host=settings.GPUSCHEDULER["HOST"]))

    # The press has placed on the first and middle devices and holds its turn; the monitor's tick
    # comes meanwhile. Its snapshots' foreign-key checks (last to first) pass (the press holds no
    # device row), and it waits for the turn before it locks the device rows to update them. When
    # the press held the rows of the devices it chose, the tick's checks and its last_seen UPDATE
    # (in table order) each met a row the press held while holding one the press needed.
    placing = Outcome(press)
    assert placed.wait(30), "the press never placed"
    ticking = Outcome(tick)
    wait_for_waiters(1)
    release.set()
    placing.join()
    ticking.join()

    assert (placing.error, ticking.error) == (None, None)
    assert ticking.result == 3
    assert sorted(a.planned_device_id for a in placing.result) == [first.pk, middle.pk]
    assert Device.objects.filter(last_seen__isnull=False).count() == 3
