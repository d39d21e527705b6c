"""Fault injection: 200 images on 4 simulated devices while a worker is killed every 20 s and
Redis drops once (restarted empty). Prints asked / made / duplicates / lost / recovery times.

    .venv/bin/python bench/bench_faults.py [--images 200] [--seconds-per-image 1.5] [--kill-every 20]

Production timings: GPU_LEASE_SECONDS=10, heartbeats every 2 s, monitor every 2 s. Real
`gpuworkers` (which restarts killed workers), real `gpumonitor` (the reconciler), and a private
redis-server without persistence, so the drop loses every queued job.
Target: made = asked, duplicates = lost = 0, longest recovery under 30 s.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness import Installation, table, wait_for


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--seconds-per-image", type=float, default=1.5)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--redis-drop-at", type=float, default=30.0)
    parser.add_argument("--redis-down-for", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    redis_server = Redis(free_port())
    redis_server.start()
    inst = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED="sim*4",
        SAMPLES_MODEL=f"simulated:{args.seconds_per_image}",
        REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        OMP_NUM_THREADS="1",
        LOG_LEVEL="info",
    )
    inst.setup()
    from django.conf import settings

    from gpuscheduler.models import Assignment, AssignmentState, Device
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    kills: list[tuple[float, int, int]] = []  # (time, assignment id, device id)
    redis_back_at = None
    try:
        inst.start("gpumonitor")
        inst.start("gpuworkers")
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers")
        count = args.images // args.per_request
        personas = Persona.objects.bulk_create(
            Persona(name=f"Fault {i}", slug=f"fault-{i}", appearance_prompt=f"portrait {i}") for i in range(count)
        )
        started = time.monotonic()
        requests = [sample_request_submit(persona=p, count=args.per_request).request for p in personas]
        next_kill = started + args.kill_every
        redis_dropped = False
        while SampleRequest.objects.filter(pk__in=[r.pk for r in requests], state__in=ACTIVE_REQUEST_STATES).exists():
            now = time.monotonic()
            if now - started > 900:
                print("gave up after 900 s")
                break
            if not redis_dropped and now - started >= args.redis_drop_at:
                print(f"{now - started:6.1f} s  Redis stops (and loses every job) for {args.redis_down_for:.0f} s")
                redis_server.stop()
                time.sleep(args.redis_down_for)
                redis_server.start()
                redis_back_at = time.time()
                print(f"{time.monotonic() - started:6.1f} s  Redis is back, empty")
                redis_dropped = True
            if now >= next_kill:
                busy = list(
                    Device.objects.filter(current_assignment__isnull=False, worker_pid__isnull=False).values_list(
                        "pk", "worker_pid", "current_assignment"
                    )
                )
                if busy:
                    device_id, pid, assignment_id = random.choice(busy)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append((time.time(), assignment_id, device_id))
                        print(
                            f"{now - started:6.1f} s  SIGKILL worker pid {pid} "
                            f"(device {device_id}, assignment {assignment_id})"
                        )
                    except ProcessLookupError:
                        pass
                next_kill = now + args.kill_every
            time.sleep(0.2)
        elapsed = time.monotonic() - started

        asked = sum(r.count for r in requests)
        made = SampleImage.objects.filter(request__in=requests).count()
        distinct = SampleImage.objects.filter(request__in=requests).values("request", "index").distinct().count()
        media = Path(settings.MEDIA_ROOT) / "samples"
        files = sum(1 for p in media.rglob("*.png")) if media.exists() else 0
        recoveries = []
        for killed_at, assignment_id, _ in kills:
            old = Assignment.objects.get(pk=assignment_id)
            retry = (
                Assignment.objects.filter(request=old.request, first_index=old.first_index, attempt__gt=old.attempt)
                .order_by("attempt")
                .first()
            )
            if old.state == AssignmentState.SUCCEEDED:
                continue  # it finished just before the kill landed
            if retry is not None and retry.started_at is not None:
                recoveries.append(retry.started_at.timestamp() - killed_at)
            else:
                recoveries.append(float("inf"))
        redis_recovery = None
        if redis_back_at is not None:
            first_start = (
                Assignment.objects.filter(started_at__isnull=False)
                .order_by("started_at")
                .values_list("started_at", flat=True)
            )
            after = [t.timestamp() - redis_back_at for t in first_start if t.timestamp() >= redis_back_at]
            redis_recovery = min(after) if after else None
        states: dict[str, int] = {}
        for state in Assignment.objects.values_list("state", flat=True):
            states[state] = states.get(state, 0) + 1
    finally:
        inst.close(keep=False)
        redis_server.stop()

    print()
    rows = [
        ["images asked", asked],
        ["images made (rows)", made],
        ["PNG files on disk", files],
        ["duplicates", made - distinct + max(0, files - made)],
        ["lost", asked - distinct],
        ["workers killed", len(kills)],
        ["recovery after a kill, longest s", f"{max(recoveries):.1f}" if recoveries else "n/a"],
        ["recovery after a kill, median s", f"{sorted(recoveries)[len(recoveries) // 2]:.1f}" if recoveries else "n/a"],
        [
            "first job started after Redis came back, s",
            f"{redis_recovery:.1f}" if redis_recovery is not None else "n/a",
        ],
        ["attempts by state", ", ".join(f"{k} {v}" for k, v in sorted(states.items()))],
        ["wall time s", f"{elapsed:.1f}"],
    ]
    print(table(["measure", "value"], rows))
    ok = made == asked == distinct == files and (not recoveries or max(recoveries) < 30)
    print(f"\ntarget made = asked, duplicates = lost = 0, recovery < 30 s: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
