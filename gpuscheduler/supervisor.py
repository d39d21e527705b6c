"""`gpuworkers`: one `gpuworker` process per device, restarted whenever one exits.

rq's worker exits with status 0 when it loses Redis in the middle of a job, so a child is
restarted whatever its exit code (with a growing pause if it keeps dying at once). SIGTERM or
SIGINT is passed on to every child as SIGTERM, a warm shutdown: running jobs finish first. A
second signal is passed on again, which rq turns into a cold shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from django.conf import settings

from gpuscheduler.backends import DeviceInfo

log = logging.getLogger(__name__)

MIN_RESTART_PAUSE, MAX_RESTART_PAUSE = 0.5, 15.0
HEALTHY_RUN_SECONDS = 30.0


@dataclass
class Child:
    info: DeviceInfo
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = MIN_RESTART_PAUSE
    restart_at: float = 0.0
    done: bool = False


class Supervisor:
    def __init__(self, devices: list[DeviceInfo], *, burst: bool = False) -> None:
        self.children = [Child(info) for info in devices]
        self.burst = burst
        self.stopping = 0

    def command(self, info: DeviceInfo) -> list[str]:
        args = [sys.executable, str(settings.BASE_DIR / "manage.py"), "gpuworker", "--device", info.uuid]
        return args + (["--burst"] if self.burst else [])

    def environment(self, info: DeviceInfo) -> dict[str, str]:
        env = dict(os.environ)
        if info.kind != "cuda" and "OMP_NUM_THREADS" not in os.environ:
            # CPU and simulated workers share this machine's cores: give each its part, or
            # every torch process would start one thread per core and they would fight.
            cpu_workers = sum(1 for c in self.children if c.info.kind != "cuda")
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, cpu_workers)))
        return env

    def start(self, child: Child) -> None:
        child.process = subprocess.Popen(self.command(child.info), env=self.environment(child.info))
        child.started = time.monotonic()
        log.info("started worker pid %d for %s %s", child.process.pid, child.info.name, child.info.uuid)

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping += 1
        log.warning(
            "%s: %s shutdown of %d worker(s)",
            signal.Signals(signum).name,
            "warm" if self.stopping == 1 else "cold",
            len(self.children),
        )
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.handle_signal)
        signal.signal(signal.SIGINT, self.handle_signal)
        for child in self.children:
            self.start(child)
        while True:
            now = time.monotonic()
            running = 0
            for child in self.children:
                if child.done:
                    continue
                if child.process is not None:
                    code = child.process.poll()
                    if code is None:
                        running += 1
                        continue
                    child.process = None
                    self._after_exit(child, code, now)
                if child.process is None and not child.done and not self.stopping and now >= child.restart_at:
                    self.start(child)
                    running += 1
                elif not child.done and not self.stopping:
                    running += 1  # waiting out its restart pause
            if running == 0:
                return 0
            time.sleep(0.2)

    def _after_exit(self, child: Child, code: int, now: float) -> None:
        lived = now - child.started
        if self.stopping:
            child.done = True
            log.info("worker for %s stopped (exit %s)", child.info.name, code)
            return
        if self.burst and code == 0:
            child.done = True
            log.info("burst worker for %s finished", child.info.name)
            return
        child.pause = MIN_RESTART_PAUSE if lived > HEALTHY_RUN_SECONDS else min(child.pause * 2, MAX_RESTART_PAUSE)
        child.restart_at = now + child.pause
        log.warning(
            "worker for %s exited with %s after %.1f s; restarting in %.1f s", child.info.name, code, lived, child.pause
        )
