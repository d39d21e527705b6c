"""Fault injection on real processes; one row per fault: images asked / made / files / duplicates /
lost / time to recover.

    .venv/bin/python bench/bench_faults.py [--scenario all|kills|ambiguous|disk|twohosts]

- kills: 200 images on 4 simulated devices while a worker is SIGKILLed every 20 s and Redis
  drops once (restarted empty). Recovery: from a kill to its chunk running again.
- ambiguous: 60 images while a proxy in front of PostgreSQL lets 6 image COMMITs through and
  cuts the connection before their replies arrive (tests/pgproxy.py). Needs PostgreSQL: it uses
  BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/persona_bench, dropped and created anew).
- disk: 60 images; after 5 s the media disk is full (simulated ENOSPC on every write) for 150 s.
  Recovery: from space returning to the first image stored.
- twohosts: two machines (2 devices each, their own GPU_HOST and DATA_DIR) share the database,
  Redis and one MEDIA_DIR; after 5 s every process of host B (monitor and workers) is SIGKILLed.
  Recovery: from the kill to the last of B's chunks running again on host A; "served" counts the
  images this process (host A's web server) serves through the admin image view.

Production timings: GPU_LEASE_SECONDS=10, heartbeats every 2 s, monitor every 2 s. Each scenario
runs in a process of its own (a fresh installation). Target: made = asked = files,
duplicates = lost = 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from harness import ROOT, Installation, table, wait_for

SCENARIOS = ("kills", "ambiguous", "disk", "twohosts")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Redis:
    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        client = redis.Redis(port=self.port)
        wait_for(lambda: _ping(client), 10, "redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _ping(client) -> bool:  # type: ignore[no-untyped-def]
    import redis

    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _fresh_pg_database(url: str) -> None:
    """An empty database for this run (a previous run's rows would look like live workers)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


class Run:
    """One scenario's installation, Redis and submitted requests."""

    def __init__(self, args: argparse.Namespace, **env: str) -> None:
        self.args = args
        self.redis = Redis(free_port())
        self.redis.start()
        settings = {
            "GPU_BACKEND": "simulated",
            "GPU_SIMULATED": "sim*4",
            "SAMPLES_MODEL": f"simulated:{args.seconds_per_image}",
            "REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0",
            "OMP_NUM_THREADS": "1",
            "LOG_LEVEL": "info",
        }
        self.inst = Installation(**{**settings, **env})
        self.inst.setup()
        self.token = uuid.uuid4().hex[:6]
        self.requests: list[Any] = []

    def submit(self, images: int) -> float:
        from personas.models import Persona
        from personas.services import sample_request_submit

        per = self.args.per_request
        personas = Persona.objects.bulk_create(
            Persona(name=f"Fault {self.token} {i}", slug=f"fault-{self.token}-{i}", appearance_prompt=f"portrait {i}")
            for i in range(images // per)
        )
        started = time.monotonic()
        self.requests = [sample_request_submit(persona=p, count=per).request for p in personas]
        return started

    def active(self) -> bool:
        from personas.models import ACTIVE_REQUEST_STATES, SampleRequest

        ids = [r.pk for r in self.requests]
        return SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists()

    def counts(self) -> dict[str, Any]:
        from config.storage import samples_storage
        from personas.models import SampleImage

        rows = SampleImage.objects.filter(request__in=self.requests)
        asked = sum(r.count for r in self.requests)
        made = rows.count()
        distinct = rows.values("request", "index").distinct().count()
        names = set(rows.values_list("image", flat=True))
        prefixes = tuple(f"r{r.pk}-" for r in self.requests)
        # Through the samples storage, as the workers wrote them: a folder or a bucket.
        stored = _stored(samples_storage(), "samples")
        on_disk = [name for name in stored if name.rsplit("/", 1)[-1].startswith(prefixes)]
        with_file = len(names & set(on_disk))
        return {
            "asked": asked,
            "made": made,
            "files": len(on_disk),
            "duplicates": made - distinct + max(0, len(on_disk) - with_file),
            "lost": asked - distinct + (made - with_file),
        }

    def close(self) -> None:
        self.inst.close(keep=False)
        self.redis.stop()


def _stored(storage: Any, folder: str) -> list[str]:
    """The .png files under `folder` in a storage, by name."""
    try:
        folders, files = storage.listdir(folder)
    except FileNotFoundError:
        return []
    found = [f"{folder}/{name}" for name in files if name.endswith(".png")]
    for sub in folders:
        found += _stored(storage, f"{folder}/{sub}")
    return found


def wait_done(run: Run, started: float, limit: float = 900) -> float:
    while run.active():
        if time.monotonic() - started > limit:
            print(f"gave up after {limit:.0f} s")
            break
        time.sleep(0.2)
    return time.monotonic() - started


# --- scenarios ------------------------------------------------------------------------------------


def scenario_kills(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    run = Run(args)
    from gpuscheduler.models import Assignment, AssignmentState, Device

    kills: list[tuple[float, int]] = []
    try:
        run.inst.start("gpumonitor")
        run.inst.start("gpuworkers")
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers")
        started = run.submit(args.images)
        next_kill = started + args.kill_every
        redis_dropped, redis_back_at = False, None
        while run.active() and time.monotonic() - started < 900:
            now = time.monotonic()
            if not redis_dropped and now - started >= args.redis_drop_at:
                print(f"{now - started:6.1f} s  Redis stops (and loses every job) for {args.redis_down_for:.0f} s")
                run.redis.stop()
                time.sleep(args.redis_down_for)
                run.redis.start()
                redis_back_at, redis_dropped = time.time(), True
            if now >= next_kill:
                busy = list(
                    Device.objects.filter(current_assignment__isnull=False, worker_pid__isnull=False).values_list(
                        "worker_pid", "current_assignment"
                    )
                )
                if busy:
                    pid, assignment_id = random.choice(busy)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append((time.time(), assignment_id))
                        print(f"{now - started:6.1f} s  SIGKILL worker pid {pid} (assignment {assignment_id})")
                    except ProcessLookupError:
                        pass
                next_kill = now + args.kill_every
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        recoveries = []
        for killed_at, assignment_id in kills:
            old = Assignment.objects.get(pk=assignment_id)
            if old.state == AssignmentState.SUCCEEDED:
                continue  # it finished just before the kill landed
            retry = (
                Assignment.objects.filter(request=old.request, first_index=old.first_index, attempt__gt=old.attempt)
                .order_by("attempt")
                .first()
            )
            ok = retry is not None and retry.started_at is not None
            recoveries.append(retry.started_at.timestamp() - killed_at if ok else float("inf"))
        after = [
            t.timestamp() - redis_back_at
            for t in Assignment.objects.filter(started_at__isnull=False).values_list("started_at", flat=True)
            if redis_back_at and t.timestamp() >= redis_back_at
        ]
        recoveries.sort()
        note = f"{len(kills)} kills; first job {min(after):.1f} s after Redis returned" if after else ""
        return {
            **run.counts(),
            "recover": f"median {recoveries[len(recoveries) // 2]:.1f}, max {recoveries[-1]:.1f}" if recoveries else "",
            "wall": elapsed,
            "note": note,
        }
    finally:
        run.close()


def scenario_ambiguous(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.pgproxy import PgCutProxy

    url = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/persona_bench")
    try:
        _fresh_pg_database(url)
    except Exception as exc:
        return {"skipped": f"needs PostgreSQL at BENCH_PG_URL ({exc})"}
    os.environ["BENCH_DATABASE_URL"] = url
    run = Run(args)
    from django.db import connection

    from gpuscheduler.models import Device

    db = connection.settings_dict
    proxy = PgCutProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    try:
        run.inst.start("gpumonitor")
        run.inst.start("gpuworkers", env={"DATABASE_URL": proxy.url(db["NAME"], db["USER"] or "postgres")})
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers")
        proxy.arm(6)
        started = run.submit(60)
        elapsed = wait_done(run, started)
        return {**run.counts(), "recover": "at once", "wall": elapsed, "note": f"{proxy.cuts} COMMIT replies cut"}
    finally:
        proxy.close()
        run.close()


def scenario_disk(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    from django.conf import settings

    from gpuscheduler import simulated
    from gpuscheduler.models import Device
    from personas.models import SampleImage

    host = settings.GPUSCHEDULER["HOST"]
    try:
        run.inst.start("gpumonitor")
        run.inst.start("gpuworkers")
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers")
        started = run.submit(60)
        time.sleep(5)
        simulated.set_storage_fault(host, "enospc")
        print(f"{time.monotonic() - started:6.1f} s  the media disk is full for {args.disk_full_for:.0f} s")
        before = SampleImage.objects.filter(request__in=run.requests).count()
        time.sleep(args.disk_full_for)
        during = SampleImage.objects.filter(request__in=run.requests).count() - before
        simulated.set_storage_fault(host, None)
        returned = time.monotonic()
        print(f"{returned - started:6.1f} s  space is back")
        made = SampleImage.objects.filter(request__in=run.requests).count
        wait_for(lambda: made() > before + during, 120, "the first image after space returned", interval=0.1)
        first = time.monotonic() - returned
        elapsed = wait_done(run, started)
        return {**run.counts(), "recover": f"{first:.1f}", "wall": elapsed, "note": f"{during} images while full"}
    finally:
        run.close()


def served_by_this_web_server(requests: list[Any]) -> int:
    """How many of the requests' images this process's admin image view serves (200, or a signed
    URL that answers 200), as host A's web server would."""
    import urllib.request

    from django.contrib.auth.models import User
    from django.test import Client

    from personas.models import SampleImage

    admin = User.objects.filter(username="bench-admin").first() or User.objects.create_superuser(
        "bench-admin", "bench@example.com", uuid.uuid4().hex
    )
    client = Client(SERVER_NAME="localhost")
    client.force_login(admin)
    served = 0
    for pk in SampleImage.objects.filter(request__in=requests).values_list("pk", flat=True):
        response = client.get(f"/admin/personas/persona/image/{pk}/")
        if response.status_code == 302:
            with urllib.request.urlopen(response["Location"]) as signed:
                served += signed.status == 200
        else:
            served += response.status_code == 200
    return served


def scenario_twohosts(args: argparse.Namespace) -> dict[str, Any]:
    """Two machines (own GPU_HOST and DATA_DIR, one shared MEDIA_DIR); host B is SIGKILLed mid-run."""
    run = Run(args, GPU_SIMULATED="sim*2", GPU_HOST="host-a")
    from gpuscheduler.models import Assignment, Device
    from gpuscheduler.page_reads import device_status

    shared = str(run.inst.dir / "media")  # this process (host A's web server) uses it too

    def host_env(name: str) -> dict[str, str]:
        data = run.inst.dir / name
        data.mkdir(exist_ok=True)
        return {"GPU_HOST": name, "DATA_DIR": str(data), "MEDIA_DIR": shared}

    try:
        run.inst.start("gpumonitor", env=host_env("host-a"))
        run.inst.start("gpuworkers", env=host_env("host-a"))
        b_monitor = run.inst.start("gpumonitor", env=host_env("host-b"))
        b_workers = run.inst.start("gpuworkers", env=host_env("host-b"))
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers on 2 hosts")
        b_devices = list(Device.objects.filter(host="host-b").values_list("pk", flat=True))
        started = run.submit(60)
        time.sleep(5)
        for process in (b_monitor, b_workers):
            os.killpg(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        killed_wall = time.time()
        print(f"{killed - started:6.1f} s  every process of host-b SIGKILLed")

        def b_stale() -> bool:
            rows = [r for r in device_status() if r["id"] in b_devices]
            return all(r["health"] == "stale" for r in rows)

        wait_for(b_stale, 120, "host-b's devices to show stale", interval=0.2)
        stale_after = time.monotonic() - killed
        elapsed = wait_done(run, started)
        on_b = Assignment.objects.filter(request__in=run.requests, device_id__in=b_devices, attempt=1)
        made_on_b = Assignment.objects.filter(request__in=run.requests, device_id__in=b_devices, state="succeeded")
        reruns = [
            Assignment.objects.filter(request=a.request, first_index=a.first_index, attempt__gt=1)
            .exclude(started_at=None)
            .order_by("attempt")
            .values_list("started_at", flat=True)
            .first()
            for a in on_b
            if a.state != "succeeded"
        ]
        last = max((t.timestamp() - killed_wall for t in reruns if t), default=None)
        served = served_by_this_web_server(run.requests)
        images_on_b = sum(made_on_b.values_list("image_count", flat=True))
        return {
            **run.counts(),
            "recover": f"{last:.1f}" if last is not None else "nothing to rerun",
            "wall": elapsed,
            "note": f"{served} served by host A ({images_on_b} made on B); {len(reruns)} chunks re-run; "
            f"B stale after {stale_after:.1f} s",
        }
    finally:
        run.close()


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    parser.add_argument("--images", type=int, default=200, help="kills scenario: images in all")
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--seconds-per-image", type=float, default=1.5)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--redis-drop-at", type=float, default=30.0)
    parser.add_argument("--redis-down-for", type=float, default=10.0)
    parser.add_argument("--disk-full-for", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-row", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_row:
        row = globals()[f"scenario_{args.scenario}"](args)
        print("ROW " + json.dumps(row))
        return
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    rows = []
    for name in names:
        print(f"== {name} ==", flush=True)
        argv = [a for a in sys.argv[1:] if not a.startswith("--scenario")]
        if "--scenario" in sys.argv:
            index = sys.argv.index("--scenario")
            argv = sys.argv[1:index] + sys.argv[index + 2 :]
        result = subprocess.run(
            [sys.executable, __file__, "--scenario", name, "--json-row", *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = result.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("ROW ")))
        found = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
        if not found:
            print(result.stderr[-3000:])
            rows.append([name, "failed", "", "", "", "", "", "", f"exit {result.returncode}"])
            continue
        r = found[0]
        if "skipped" in r:
            rows.append([name, "", "", "", "", "", "", "", r["skipped"]])
            continue
        rows.append(
            [
                name,
                r["asked"],
                r["made"],
                r["files"],
                r["duplicates"],
                r["lost"],
                r["recover"],
                f"{r['wall']:.1f}",
                r["note"],
            ]
        )
    print()
    headers = ["fault", "asked", "made", "files", "duplicates", "lost", "recover s", "wall s", "note"]
    print(table(headers, rows))
    ran = [row for row in rows if row[1] != ""]
    ok = bool(ran) and all(row[1] == row[2] == row[3] and row[4] == row[5] == 0 for row in ran)
    print(f"\ntarget made = asked = files, duplicates = lost = 0: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
