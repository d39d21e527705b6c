"""`make run`: the whole application in one terminal, stopped together with Ctrl-C.

Migrates, creates demo data (printing the admin login), uses the Redis at REDIS_URL or starts a
private redis-server, then starts the per-GPU workers, the monitor and the web server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(ROOT / "manage.py")]


def say(text: str) -> None:
    print(f"[make run] {text}", flush=True)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
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


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.chdir(ROOT)
    import django

    django.setup()
    from django.conf import settings

    port = os.environ.get("PORT", "8000")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        sys.exit(f"[make run] PORT={port!r} is not a port number.")
    subprocess.run([*MANAGE, "check"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*MANAGE, "migrate", "--no-input", "-v", "0"], check=True)
    demo = subprocess.run([*MANAGE, "demo_data"], check=True, capture_output=True, text=True).stdout.strip()

    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    if not redis_answers(settings.REDIS_URL):
        started.append(("redis-server", start_private_redis(settings.REDIS_URL, Path(settings.DATA_DIR))))
    # Each child in a session of its own: Ctrl-C reaches only this script, which stops them in
    # order (web, monitor and workers warm, Redis last) instead of all at once.
    for name, args in [
        ("gpuworkers", ["gpuworkers"]),
        ("gpumonitor", ["gpumonitor"]),
        ("web", ["runserver", f"127.0.0.1:{port}", "--insecure", "--noreload"]),
    ]:
        started.append((name, subprocess.Popen([*MANAGE, *args], start_new_session=True)))

    backend = settings.GPUSCHEDULER["BACKEND"]
    say("-" * 60)
    say(f"Open http://127.0.0.1:{port}/admin/   (GPU backend: {backend}, data: {settings.DATA_DIR})")
    for line in demo.splitlines():
        say(line)
    say("GPU status: Admin > GPU scheduler > GPU status. Press Ctrl-C to stop everything.")
    say("-" * 60)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, process in started:
                if process.poll() is not None and name != "gpuworkers":
                    say(f"{name} exited with {process.returncode}; stopping everything")
                    stopping = True
            time.sleep(0.5)
    finally:
        say("stopping (running jobs finish first) ...")
        for name, process in reversed(started):
            if process.poll() is None and name != "redis-server":
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for name, process in reversed(started):
            if name == "redis-server" and process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
                process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
