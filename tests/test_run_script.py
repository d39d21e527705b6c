"""`make run` (scripts/run.py): a warm stop that waits for running jobs, then kills whole process groups."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def run_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_run", ROOT / "scripts" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie stays until PID 1 reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def session(script: str) -> tuple[subprocess.Popen[bytes], int]:
    """A shell in a session of its own that starts one grandchild and prints its pid."""
    process = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    grandchild = int(process.stdout.readline())
    return process, grandchild


def test_the_stop_deadline_is_the_job_timeout_plus_30_seconds(run_script, settings):
    settings.SAMPLES = {**settings.SAMPLES, "JOB_TIMEOUT": 600}
    assert run_script.stop_grace(settings.SAMPLES) == 630


def test_a_group_that_ignores_sigterm_is_killed_whole_after_the_deadline(run_script):
    # The leader stands for gpuworkers, the grandchild for a worker it started: both ignore SIGTERM.
    leader, worker = session("trap '' TERM; sleep 60 & echo $!; wait")
    started = time.monotonic()

    run_script.stop_all([("gpuworkers", leader)], grace=0.5, signals=run_script.Signals(), poll=0.05)

    assert leader.poll() == -signal.SIGKILL
    assert not running(worker), "the worker in the leader's group was killed too"
    # Not left to its own end (its sleep lasts 60 s): a bound far from both, for a busy machine.
    assert time.monotonic() - started < 30


def test_a_warm_stop_waits_for_running_work_to_finish(run_script):
    # One SIGTERM: the leader finishes its "job" (1 s) and exits by itself, well inside the deadline.
    leader, worker = session("trap 'sleep 1; kill $!; exit 0' TERM; sleep 60 & echo $!; wait")

    run_script.stop_all([("gpuworkers", leader)], grace=30, signals=run_script.Signals(), poll=0.05)

    assert leader.returncode == 0
    assert not running(worker)


def test_a_second_signal_kills_at_once(run_script):
    leader, worker = session("trap '' TERM; sleep 60 & echo $!; wait")
    signals = run_script.Signals()
    signals.count = 2
    started = time.monotonic()

    run_script.stop_all([("gpuworkers", leader)], grace=600, signals=signals, poll=0.05)

    assert not running(worker) and leader.poll() is not None
    # Not after the 600 s grace: a bound far from it, and from the moment it takes, for a busy machine.
    assert time.monotonic() - started < 60


def test_processes_left_behind_by_a_dead_gpuworkers_are_stopped(run_script):
    # gpuworkers died (SIGKILL) and its worker, orphaned, still holds its GPU.
    leader, worker = session("sleep 60 & echo $!; wait")
    leader.send_signal(signal.SIGKILL)
    leader.wait()
    assert running(worker)

    run_script.stop_all([("gpuworkers", leader)], grace=5, signals=run_script.Signals(), poll=0.05)

    assert not running(worker)


def test_an_exit_of_gpuworkers_is_reported_and_stops_the_watch(run_script, capsys):
    workers = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    web = subprocess.Popen(["sleep", "60"], start_new_session=True)
    started = [("gpuworkers", workers), ("web", web)]
    try:
        assert run_script.watch(started, run_script.Signals(), poll=0.05) is True
    finally:
        run_script.stop_all(started, grace=5, signals=run_script.Signals(), poll=0.05)

    assert "WARNING: gpuworkers exited with 3: no GPU worker is left; stopping everything" in capsys.readouterr().out
    assert web.returncode == -signal.SIGTERM


def test_a_signal_ends_the_watch_without_blaming_a_process(run_script):
    web = subprocess.Popen(["sleep", "60"], start_new_session=True)
    signals = run_script.Signals()
    signals(signal.SIGINT, None)
    try:
        assert run_script.watch([("web", web)], signals, poll=0.05) is False
    finally:
        run_script.stop_all([("web", web)], grace=5, signals=signals, poll=0.05)
    assert web.returncode == -signal.SIGTERM
