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
