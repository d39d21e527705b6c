"""`make run`: the whole application in one terminal, stopped together with Ctrl-C.

Migrates, creates demo data (printing the admin login), uses the Redis at REDIS_URL or starts a
private redis-server, then starts the per-GPU workers, the monitor and the web server.

Ctrl-C is a warm shutdown: the web server and the monitor stop, the workers finish their running
jobs (up to SAMPLES_JOB_TIMEOUT + 30 s), then Redis stops. A second Ctrl-C kills everything at
once. If any of them exits by itself, everything is stopped the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(ROOT / "manage.py")]
# Past the job timeout, a worker whose job hangs in native code is killed by its own watchdog
# (GPU_WATCHDOG_GRACE later); this is the margin on top of the timeout before we kill it ourselves.
STOP_MARGIN_SECONDS = 30
KILL_WAIT_SECONDS = 5

Started = list[tuple[str, subprocess.Popen[bytes]]]


def say(text: str) -> None:
    print(f"[make run] {text}", flush=True)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.exceptions.RedisError, OSError):
        return False


def start_private_redis(url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    parts = urlsplit(url)
    if parts.scheme != "redis" or (parts.hostname or "127.0.0.1") not in ("127.0.0.1", "localhost"):
        sys.exit(f"[make run] Redis at {url} does not answer, and it is not on this machine: start it there.")
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(
            "[make run] No Redis answers at REDIS_URL and redis-server is not installed.\n"
            "  Debian/Ubuntu: sudo apt-get install redis-server   (then run `make run` again)\n"
            "  macOS:         brew install redis"
        )
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = str(parts.port or 6379)
    say(f"no Redis at {url}: starting a private redis-server on 127.0.0.1:{port} (data in {folder})")
    process = subprocess.Popen(
        [binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(50):
        if redis_answers(url):
            return process
        time.sleep(0.1)
    process.terminate()
    sys.exit(f"[make run] the private redis-server did not answer on port {port}; is the port taken?")


class Signals:
    """Counts SIGINT/SIGTERM: the first asks for a warm shutdown, a second one for a kill."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count == 2:
            say("second signal: killing everything now")


def group_alive(process: subprocess.Popen[bytes]) -> bool:
    """Whether any live process is left in the child's process group (its own session).

    The group holds what the child started too: gpuworkers' per-GPU workers and their watchdogs,
    which keep their GPUs busy if the supervisor dies without them.
    """
    if process.poll() is None:  # reaps the child itself once it has exited
        return True
    pgid = process.pid
    proc = Path("/proc")
    if proc.is_dir():
        # Zombies count as gone: an orphan's zombie stays until PID 1 reaps it, and in a
        # container PID 1 may never do that.
        for stat in proc.glob("[0-9]*/stat"):
            with suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(started: Started, signals: Signals, *, poll: float = 0.5) -> bool:
    """Wait for a signal (False) or for any started process to exit by itself (True, saying which)."""
    while not signals.count:
        for name, process in started:
            code = process.poll()
            if code is None:
                continue
            if name == "gpuworkers":
                say(f"WARNING: gpuworkers exited with {code}: no GPU worker is left; stopping everything")
            else:
                say(f"{name} exited with {code}; stopping everything")
            return True
        time.sleep(poll)
    return False


def stop_all(started: Started, *, grace: float, signals: Signals, poll: float = 0.2) -> None:
    """Warm shutdown: SIGTERM to each child, Redis last; kill the process groups still there after `grace`."""
    services = [(name, p) for name, p in started if name != "redis-server"]
    redis = [(name, p) for name, p in started if name == "redis-server"]
    for name, process in reversed(services):
        if process.poll() is None:
            # To the leader only: gpuworkers passes one SIGTERM to each worker (a warm shutdown),
            # and a second one would turn it into rq's cold shutdown.
            process.send_signal(signal.SIGTERM)
        elif group_alive(process):
            say(f"{name} is gone but left processes behind; stopping them")
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    wait_or_kill(services, deadline=time.monotonic() + grace, signals=signals, poll=poll)
    for _, process in redis:
        if process.poll() is None:
            process.terminate()
    wait_or_kill(redis, deadline=time.monotonic() + 10, signals=signals, poll=poll)


def wait_or_kill(started: Started, *, deadline: float, signals: Signals, poll: float) -> None:
    while any(group_alive(p) for _, p in started):
        if time.monotonic() >= deadline or signals.count > 1:
            for name, process in started:
                if group_alive(process):
                    if signals.count < 2:
                        say(f"{name} did not stop in time; killing its process group")
                    with suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
            end = time.monotonic() + KILL_WAIT_SECONDS
            while any(group_alive(p) for _, p in started) and time.monotonic() < end:
                time.sleep(0.1)
            return
        time.sleep(poll)


def login_lines(demo: str) -> list[str]:
    """What demo_data printed and, on a later run (the admin exists, so no login was printed), whom
    to log in as: the password is the one printed on the first run."""
    lines = demo.splitlines()
    if any(line.startswith("Admin login:") for line in lines):
        return lines
    from django.contrib.auth import get_user_model

    admins = get_user_model().objects.filter(is_superuser=True, is_active=True).order_by("pk")
    name = admins.values_list("username", flat=True).first()
    if name is not None:
        lines.append(
            f"Admin login: username {name!r}, with the password printed on the first run "
            f"(`.venv/bin/python manage.py changepassword {name}` sets a new one)."
        )
    return lines


def stop_grace(samples: dict[str, object]) -> float:
    """Seconds the workers get to finish their running jobs before their process groups are killed."""
    return float(str(samples["JOB_TIMEOUT"])) + STOP_MARGIN_SECONDS


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.chdir(ROOT)
    import django

    django.setup()
    from django.conf import settings

    port = os.environ.get("PORT", "8000")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        sys.exit(f"[make run] PORT={port!r} is not a port number.")
    grace = stop_grace(settings.SAMPLES)
    subprocess.run([*MANAGE, "check"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*MANAGE, "migrate", "--no-input", "-v", "0"], check=True)
    demo = subprocess.run([*MANAGE, "demo_data"], check=True, capture_output=True, text=True).stdout.strip()

    signals = Signals()
    signal.signal(signal.SIGINT, signals)
    signal.signal(signal.SIGTERM, signals)
    started: Started = []
    crashed = False
    try:
        if not redis_answers(settings.REDIS_URL):
            started.append(("redis-server", start_private_redis(settings.REDIS_URL, Path(settings.DATA_DIR))))
        # Each child in a session (and process group) of its own: Ctrl-C reaches only this
        # script, which stops them in order (web, monitor and workers warm, Redis last) instead
        # of all at once, and can kill a child together with everything it started.
        for name, args in [
            ("gpuworkers", ["gpuworkers"]),
            ("gpumonitor", ["gpumonitor"]),
            ("web", ["runserver", f"127.0.0.1:{port}", "--insecure", "--noreload"]),
        ]:
            started.append((name, subprocess.Popen([*MANAGE, *args], start_new_session=True)))

        backend = settings.GPUSCHEDULER["BACKEND"]
        say("-" * 60)
        say(f"Open http://127.0.0.1:{port}/admin/   (GPU backend: {backend}, data: {settings.DATA_DIR})")
        for line in login_lines(demo):
            say(line)
        say("GPU status: Admin > GPU scheduler > GPU status. Press Ctrl-C to stop everything.")
        say("-" * 60)
        crashed = watch(started, signals)
    finally:
        say(f"stopping: running jobs finish first (up to {grace:.0f} s; Ctrl-C again to kill them now) ...")
        stop_all(started, grace=grace, signals=signals)
        say("stopped")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
