"""The watchdog of a gpuworker: the Watchdog class the worker holds, and the child process it
starts, `python -m gpuscheduler.watchdog <worker pid>`.

It reads lines from its stdin, a pipe from the worker: ``deadline <time.monotonic()>`` arms it
(the monotonic clock is one for every process of a machine, and no clock step moves it),
``clear`` disarms it. If an armed deadline passes it SIGKILLs the worker: a job stuck in native
code (a CUDA call) never returns to the interpreter, so rq's SIGALRM timeout cannot end it. When
the pipe closes (the worker exited or was killed) the watchdog exits too, so it never outlives
the worker. It imports nothing of Django or torch and costs a few megabytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


class Watchdog:
    """A child process that SIGKILLs this worker if a job outlives its deadline."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpuscheduler.watchdog", str(os.getpid())],
            stdin=subprocess.PIPE,
            close_fds=True,
            cwd=str(ROOT),
        )

    def arm(self, seconds: float) -> None:
        self._send(f"deadline {time.monotonic() + seconds + self.grace:.3f}\n")

    def disarm(self) -> None:
        self._send("clear\n")

    def _send(self, line: str) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            log.error("the watchdog process is gone; native hangs will not be caught")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.process.stdin is not None
            self.process.stdin.close()
        with contextlib.suppress(Exception):
            self.process.wait(timeout=5)


def main(argv: list[str]) -> int:
    worker_pid = int(argv[1])
    # Ctrl-C in a terminal reaches the whole process group; the worker decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline: float | None = None
    buffer = b""
    stdin = sys.stdin.fileno()
    while True:
        if os.getppid() != worker_pid:
            return 0
        ready, _, _ = select.select([stdin], [], [], 0.5)
        if ready:
            chunk = os.read(stdin, 4096)
            if not chunk:
                return 0  # the worker is gone
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode(errors="replace").split()
                if words[:1] == ["deadline"] and len(words) == 2:
                    deadline = float(words[1])
                elif words[:1] == ["clear"]:
                    deadline = None
        if deadline is not None and time.monotonic() > deadline:
            sys.stderr.write(f"watchdog: worker {worker_pid} is past its job deadline; killing it\n")
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
