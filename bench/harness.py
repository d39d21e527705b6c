"""A throwaway installation for benchmarks: its own DATA_DIR, SQLite database and Redis database.

Benchmarks are not tests: they start real processes, take minutes, and print a table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(ROOT / "manage.py")]


class Installation:
    """Environment + processes of one benchmark run; call setup() before importing Django models."""

    def __init__(self, **env: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="persona-bench-"))
        self.env = {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATA_DIR": str(self.dir),
            "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", f"sqlite:///{self.dir / 'db.sqlite3'}"),
            "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
            "GPU_HOST": "benchhost",
            "LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.children: list[subprocess.Popen[bytes]] = []

    def setup(self) -> None:
        os.environ.update(self.env)
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        import redis
        from django.core.management import call_command

        from gpuscheduler import queues

        redis.Redis.from_url(self.env["REDIS_URL"]).flushdb()
        queues._connection.cache_clear()
        call_command("migrate", verbosity=0)

    def start(self, *args: str, env: dict[str, str] | None = None, new_session: bool = True) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{len(self.children):02d}-{args[0]}.log", "wb")  # noqa: SIM115 (the child's)
        process = subprocess.Popen(
            [*MANAGE, *args],
            cwd=ROOT,
            env={**os.environ, **self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        self.children.append(process)
        return process

    def start_program(self, program: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a console script of the venv (e.g. `rq worker ...`) in this installation's environment."""
        log = open(self.dir / f"{len(self.children):02d}-{program}.log", "wb")  # noqa: SIM115 (the child's)
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / program), *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(process)
        return process

    def close(self, keep: bool = False) -> None:
        self.stop_processes()
        if keep:
            print(f"(logs kept in {self.dir})")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def stop_processes(self) -> None:
        self.stop_process(*self.children)

    def stop_process(self, *processes: subprocess.Popen[bytes]) -> None:
        """SIGTERM each process group (a warm shutdown), SIGKILL what is left after 20 s."""
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class HostLoad:
    """How fast and how quiet the host was while a benchmark ran, to read its figures against:
    a pure-Python loop's time (placement took 3x longer on a crowded host than on a quiet one), and the
    share of CPU time the hypervisor took away (steal, from /proc/stat; None where there is none).

        load = HostLoad()  # at the start
        ...
        print(load.summary())  # at the end
    """

    def __init__(self) -> None:
        self.loop_ms = python_loop_ms()
        self.started = _cpu_times()

    def stolen(self) -> float | None:
        now = _cpu_times()
        if self.started is None or now is None:
            return None
        delta = [b - a for a, b in zip(self.started, now, strict=True)]
        total = sum(delta)
        # The columns: user nice system idle iowait irq softirq steal ...
        return delta[7] / total if total > 0 and len(delta) > 7 else None

    def summary(self) -> str:
        stolen = self.stolen()
        steal = "not reported" if stolen is None else f"{stolen:.0%} of CPU time"
        return (
            f"host: {os.cpu_count()} CPUs; a loop of a million Python additions took {self.loop_ms:.0f} ms "
            f"(median of 5: compare it between runs); the hypervisor took {steal} during the run."
        )


def python_loop_ms() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _cpu_times() -> list[int] | None:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return [int(v) for v in first[1:]] if first and first[0] == "cpu" else None


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


class postgres_database:
    """A throwaway database, `<prefix>_<pid>`, on the server `url` points at; dropped on exit."""

    def __init__(self, url: str, prefix: str) -> None:
        self.parts = urlsplit(url)
        self.name = f"{prefix}_{os.getpid()}"

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(urlunsplit(self.parts._replace(path="/postgres")), autocommit=True)

    def __enter__(self) -> str:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return urlunsplit(self.parts._replace(path=f"/{self.name}"))

    def __exit__(self, *exc: object) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def each_backend(prefix: str, run: Callable[[str, str, Path], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`run(backend, database_url, work_dir)` on a temporary SQLite file, then on PostgreSQL when
    DATABASE_URL names one (in a throwaway database of its own there); the results by backend."""
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    try:
        results["sqlite"] = run("sqlite", f"sqlite:///{work / 'bench.sqlite3'}", work)
        url = os.environ.get("DATABASE_URL", "")
        if url.startswith(("postgres://", "postgresql://", "pgsql://")):
            with postgres_database(url, prefix.replace("-", "_")) as bench_url:
                results["postgresql"] = run("postgresql", bench_url, work)
        else:
            print("DATABASE_URL names no PostgreSQL database: timing SQLite only.", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def child_run(script: str, backend: str, url: str, work: Path, options: list[str], **env: str) -> Any:
    """Run `script --child BACKEND OPTIONS` in a process of its own (Django's settings are fixed once
    per process) on the database `url`, DATA_DIR under `work`; returns the JSON its last line prints."""
    import json

    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATA_DIR": str(work / backend),
        "DATABASE_URL": url,
        "DJANGO_DEBUG": "false",  # no query log in memory
        "PYTHONPATH": str(ROOT),
        **env,
    }
    (work / backend).mkdir(exist_ok=True)
    print(f"{backend}: filling and timing...", file=sys.stderr)
    command = [sys.executable, script, "--child", backend, *options]
    done = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {backend} run failed")
    sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])
