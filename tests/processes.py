"""Real worker processes for end-to-end tests: started against the test database and Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The URL of the database the tests run on, for child processes."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgresql://{auth}{db.get('HOST') or '127.0.0.1'}{port}/{db['NAME']}"


def wait_for(condition: Callable[[], Any], timeout: float, what: str | Callable[[], str], interval: float = 0.1) -> Any:
    """Poll `condition` until it is truthy; `what` (or what() for logs read at the end) explains a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


class Processes:
    """Starts manage.py commands as child processes with the test environment; stops them all."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        name = "-".join(a.lstrip("-") for a in args)[:60]
        log_path = self.log_dir / f"{len(self.children):02d}-{name}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 (held by the child process)
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env={**os.environ, **self.env, **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killing it takes its children too
        )
        self.children.append((str(log_path), process))
        return process

    def logs(self) -> str:
        parts = []
        for path, process in self.children:
            text = Path(path).read_text(errors="replace")[-6000:]
            parts.append(f"===== {path} (pid {process.pid}, exit {process.poll()}) =====\n{text}")
        return "\n".join(parts)

    def stop(self, timeout: float = 15.0) -> None:
        for _, process in self.children:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, process in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def skewed_clock(offset_seconds: float) -> dict[str, str]:
    """The environment of a child process whose host clock runs `offset_seconds` off (negative:
    behind): tests.settings_skewed shifts the wall clock the project reads (timezone.now, time.time)."""
    return {"DJANGO_SETTINGS_MODULE": "tests.settings_skewed", "TEST_CLOCK_OFFSET_SECONDS": str(offset_seconds)}


def settings_in_a_fresh_process(
    tmp_path: Path, values: str, *, unset: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """Import config.settings (as `s`) in a new interpreter with DATA_DIR=tmp_path, the variables
    starting with any of `unset` removed and `env` added; print `values` (a Python list of settings
    expressions) as JSON. Settings are read once per process, so only a new one shows them."""
    code = f"import json; from config import settings as s; print(json.dumps({values}))"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(unset)} if unset else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environment, "DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        "DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "info",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
