"""The chores registry gpumonitor runs: one run per interval cluster-wide, failures contained."""

from __future__ import annotations

import logging

import pytest

from gpuscheduler import housekeeping, queues


@pytest.fixture
def chores(monkeypatch):
    """An empty registry of this test's own, and a list of the chores' runs."""
    monkeypatch.setattr(housekeeping, "_chores", {})
    runs: list[str] = []
    return runs


def test_two_processes_in_the_same_interval_run_a_chore_once(chores, redis_db):
    housekeeping.register("sweep", 600, lambda: chores.append("sweep"))

    assert housekeeping.run_due() == ["sweep"]
    housekeeping._chores["sweep"].last_run = None  # another process, which has never run it
    assert housekeeping.run_due() == [], "the first process took this interval's turn"
    redis_db.delete("gpuscheduler:turn:housekeeping:sweep")  # the interval has passed
    assert housekeeping.run_due() == ["sweep"]
    assert chores == ["sweep", "sweep"]


def test_while_redis_is_down_each_process_runs_a_chore_once_per_interval(chores, settings, monkeypatch):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    queues._connection.cache_clear()
    housekeeping.register("sweep", 600, lambda: chores.append("sweep"))
    clock = [1000.0]
    monkeypatch.setattr(housekeeping.time, "monotonic", lambda: clock[0])
    try:
        assert housekeeping.run_due() == ["sweep"], "a turn is an economy, never a reason to skip the work"
        clock[0] += 599
        assert housekeeping.run_due() == []
        clock[0] += 2
        assert housekeeping.run_due() == ["sweep"]
    finally:
        queues._connection.cache_clear()


def test_a_failing_chore_is_logged_and_the_others_still_run(chores, redis_db, caplog):
    def broken() -> None:
        raise RuntimeError("disk on fire")

    housekeeping.register("broken", 60, broken)
    housekeeping.register("fine", 60, lambda: chores.append("fine"))

    with caplog.at_level(logging.ERROR, logger="gpuscheduler.housekeeping"):
        assert housekeeping.run_due() == ["broken", "fine"]

    assert chores == ["fine"]
    (record,) = caplog.records
    assert record.getMessage() == "housekeeping chore broken failed; it runs again in 60 s"
    assert "disk on fire" in caplog.text


def test_a_chore_needs_a_positive_interval(chores):
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="every_seconds must be positive"):
            housekeeping.register("sweep", bad, lambda: None)


def test_the_personas_app_registers_its_orphan_sweep():
    from personas.integrity import SWEEP_SECONDS

    assert "samples-orphans" in housekeeping.registered()
    assert housekeeping._chores["samples-orphans"].every_seconds == SWEEP_SECONDS


# --- the scheduler's own chores: compaction, retention and retirement, once per interval ----------


def test_the_scheduler_registers_compaction_and_retirement_as_cluster_chores():
    from gpuscheduler.apps import COMPACT_EVERY_SECONDS
    from gpuscheduler.cluster import RETIRE_EVERY_SECONDS, devices_retire
    from gpuscheduler.services import snapshots_compact

    assert housekeeping._chores["snapshots-compact"].fn is snapshots_compact
    assert housekeeping._chores["snapshots-compact"].every_seconds == COMPACT_EVERY_SECONDS
    assert housekeeping._chores["devices-retire"].fn is devices_retire
    assert housekeeping._chores["devices-retire"].every_seconds == RETIRE_EVERY_SECONDS


def _old_raw_snapshots(device, count: int = 24):
    from datetime import timedelta

    from django.utils import timezone

    from gpuscheduler.models import Snapshot

    old = timezone.now().replace(second=0, microsecond=0) - timedelta(hours=3)
    Snapshot.objects.bulk_create(
        Snapshot(device=device, taken_at=old + timedelta(seconds=5 * i), utilization=float(i), health="healthy")
        for i in range(count)  # two minutes at 5 s
    )


def _one_monitor_tick(monkeypatch) -> None:
    """Run gpumonitor's loop in this process for exactly one tick."""
    import signal
    import time
    from types import SimpleNamespace

    from django.core.management import call_command

    from gpuscheduler.management.commands import gpumonitor

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The loop's pause is where it stops: the command's own SIGTERM handler ends it after one tick.
    monkeypatch.setattr(
        gpumonitor,
        "time",
        SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: signal.raise_signal(signal.SIGTERM)),
    )
    try:
        call_command("gpumonitor", "--interval", "1")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.django_db(transaction=True)  # the monitor's loop closes its connection every tick
def test_a_monitor_leaves_compaction_to_the_one_whose_turn_it_is(device_factory, redis_db, monkeypatch):
    from gpuscheduler.models import Snapshot

    device = device_factory("H100")
    _old_raw_snapshots(device)
    redis_db.set("gpuscheduler:turn:housekeeping:snapshots-compact", 1, px=60_000)  # another host's turn

    _one_monitor_tick(monkeypatch)

    assert Snapshot.objects.filter(device=device, bucket_seconds=0).count() >= 24, "nothing folded out of turn"
    assert not Snapshot.objects.filter(bucket_seconds__gt=0).exists()

    redis_db.delete("gpuscheduler:turn:housekeeping:snapshots-compact")  # the interval has passed
    for chore in housekeeping._chores.values():
        chore.last_run = None
    _one_monitor_tick(monkeypatch)
    assert Snapshot.objects.filter(device=device, bucket_seconds=60).count() == 2, "its turn: folded once"


@pytest.mark.django_db(transaction=True)
def test_two_monitors_folding_the_same_history_at_once_count_every_reading_once(device_factory, monkeypatch):
    import contextlib
    import threading

    from django.db import connection

    from gpuscheduler import services
    from gpuscheduler.models import Snapshot

    if connection.vendor != "postgresql":
        pytest.skip("SQLite's IMMEDIATE transactions serialize the two folds; the race needs PostgreSQL")
    device = device_factory("H100")
    _old_raw_snapshots(device)
    # Both monitors read the rows before either writes (what Redis being down allowed): each waits
    # for the other at the fold for up to a second.
    met = threading.Barrier(2)
    averages = services._averages

    def averages_after_both_read(*args, **kwargs):
        with contextlib.suppress(threading.BrokenBarrierError):
            met.wait(timeout=1)
        return averages(*args, **kwargs)

    monkeypatch.setattr(services, "_averages", averages_after_both_read)
    errors: list[BaseException] = []

    def monitor() -> None:
        try:
            services.snapshots_compact()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=monitor) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    rows = list(Snapshot.objects.filter(device=device, bucket_seconds=60).order_by("taken_at"))
    assert [row.utilization for row in rows] == [5.5, 17.5], "each minute averaged once, from 12 readings each"
    assert not Snapshot.objects.filter(device=device, bucket_seconds=0).exists()
