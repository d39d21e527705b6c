"""Time the GPU status page and its JSON endpoint against a full week of snapshots.

    .venv/bin/python bench/bench_status_page.py [--requests 20] [--devices 8]

Fills a fresh database with 8 devices and a week of 5-second snapshots in two shapes and times
the page, its JSON endpoint and the JSON with fragments (what the page's script polls): the
median of 20 requests each through Django's test Client.

- compacted: what `snapshots_compact` leaves (raw readings for GPU_SNAPSHOT_RAW_HOURS, 60 s
  averages back to the retention limit), checked by running `snapshots_compact` on it;
- raw: the worst case, 1,000,000 raw readings that no compaction has touched yet.

Runs on a temporary SQLite file, and also on PostgreSQL when DATABASE_URL names one (in a
database of its own, created on that server and dropped afterwards). Each backend runs in a
child process because Django's settings are fixed once per process.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import child_run, each_backend

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 200.0
INTERVAL = 5  # seconds between raw snapshots, as `gpumonitor --interval 5`
DAYS = 7
RAW_ROWS = 1_000_000
JOB_EVERY = 120  # one job starts on each device every two minutes ...
JOB_LENGTH = 70  # ... and runs for 70 s
GIB = 1024**3


# --- the parent: one child per backend, then the table ------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="Requests per measurement (the median is shown).")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, requests=args.requests, devices=args.devices)))
        return

    options = ["--requests", str(args.requests), "--devices", str(args.devices)]
    by_backend = each_backend(
        "bench-status", lambda backend, url, work: {"rows": child_run(__file__, backend, url, work, options)}
    )
    results: list[dict[str, Any]] = [row for found in by_backend.values() for row in found["rows"]]
    print_table(results, devices=args.devices, requests=args.requests)
    slow = [r for r in results if r["median_ms"] > TARGET_MS]
    sys.exit(1 if slow else 0)


def print_table(results: list[dict[str, Any]], *, devices: int, requests: int) -> None:
    print()
    print(f"GPU status page, {devices} devices, median of {requests} requests (target {TARGET_MS:.0f} ms)")
    header = (
        f"{'backend':<11} {'snapshots':<10} {'rows':>9} {'view':<24} "
        f"{'median ms':>9} {'p90 ms':>7} {'queries':>7}  verdict"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "ok" if r["median_ms"] <= TARGET_MS else "SLOW"
        print(
            f"{r['backend']:<11} {r['pattern']:<10} {r['rows']:>9,} {r['view']:<24} {r['median_ms']:>9.1f} "
            f"{r['p90_ms']:>7.1f} {r['queries']:>7}  {verdict} ({r['median_ms'] / TARGET_MS:.2f} of target)"
        )
    for note in sorted({n for r in results for n in r.get("notes", [])}):
        print(f"note: {note}")


# --- the child: one database, both fill patterns ------------------------------------------------


def run_child(backend: str, *, requests: int, devices: int) -> list[dict[str, Any]]:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    now = datetime.now(UTC).replace(microsecond=0)
    device_ids = fill_devices_and_jobs(devices, now)
    results = []

    rows = fill_compacted(device_ids, now)
    notes = check_compacted(now)
    results += time_views(backend, "compacted", rows, requests, notes)

    clear_snapshots()
    rows = fill_raw(device_ids, now)
    results += time_views(backend, "raw", rows, requests, [])
    return results


def fill_devices_and_jobs(count: int, now: datetime) -> list[int]:
    """8 simulated H100s with live workers, and a week of two-minute jobs on each."""
    from django.contrib.auth.models import User
    from django.db.models import F

    from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceKind, Health, WorkerState
    from personas.models import Persona, RequestState, SampleRequest

    User.objects.create_superuser("bench", "bench@example.com", "bench-password")
    devices = [
        Device.objects.create(
            host="bench",
            uuid=f"SIM-{i:04d}-bench",
            name="H100",
            index=i,
            kind=DeviceKind.SIMULATED,
            memory_total=80 * GIB,
            health=Health.HEALTHY,
            worker_name=f"gpu-{i}@bench",
            worker_pid=1000 + i,
            worker_state=WorkerState.BUSY,
            worker_seen_at=now,
        )
        for i in range(count)
    ]
    personas = Persona.objects.bulk_create(
        Persona(name=f"Persona {i}", slug=f"persona-{i}", appearance_prompt=f"portrait {i}") for i in range(200)
    )
    # Oldest first, so ids grow with time as they do in a running system.
    starts = [now - timedelta(seconds=s) for s in range(DAYS * 86400 - JOB_EVERY, 0, -JOB_EVERY)]
    jobs = [(i, start, d) for i, start in enumerate(starts) for d in range(count)]
    requests = SampleRequest.objects.bulk_create(
        (
            SampleRequest(
                persona=personas[(i * count + d) % len(personas)],
                count=4,
                first_seed=i,
                model="tiny",
                steps=25,
                state=RequestState.SUCCEEDED,
                finished_at=start + timedelta(seconds=JOB_LENGTH),
            )
            for i, start, d in jobs
        ),
        batch_size=2000,
    )
    Assignment.objects.bulk_create(
        (
            Assignment(
                request=request,
                image_count=4,
                job_id=f"bench-{i}-{d}",
                queue_name=f"gpu.{devices[d].pk}",
                planned_device=devices[d],
                device=devices[d],
                policy="balanced",
                reason="bench",
                worker_name=devices[d].worker_name,
                host="bench",
                state=AssignmentState.SUCCEEDED,
                started_at=start,
                heartbeat_at=start + timedelta(seconds=JOB_LENGTH),
                finished_at=start + timedelta(seconds=JOB_LENGTH),
                calls=1,
            )
            for (i, start, d), request in zip(jobs, requests, strict=True)
        ),
        batch_size=2000,
    )
    # queued_at is auto_now_add: put it back where a running system would have it.
    Assignment.objects.update(queued_at=F("started_at"))
    # The job running right now on every device, and a queued backlog.
    for d, device in enumerate(devices):
        persona = Persona.objects.create(name=f"Running {d}", slug=f"running-{d}", appearance_prompt="x")
        request = SampleRequest.objects.create(
            persona=persona, count=8, first_seed=0, model="tiny", steps=25, state=RequestState.RUNNING
        )
        running = Assignment.objects.create(
            request=request,
            image_count=4,
            job_id=f"bench-running-{d}",
            queue_name=f"gpu.{device.pk}",
            planned_device=device,
            device=device,
            policy="balanced",
            reason="bench",
            state=AssignmentState.RUNNING,
            worker_name=device.worker_name,
            host="bench",
            started_at=now - timedelta(seconds=40),
            heartbeat_at=now,
        )
        Assignment.objects.create(
            request=request,
            first_index=4,
            image_count=4,
            job_id=f"bench-queued-{d}",
            queue_name=f"gpu.{device.pk}",
            planned_device=device,
            policy="balanced",
            reason="bench",
            state=AssignmentState.QUEUED,
        )
        Device.objects.filter(pk=device.pk).update(current_assignment=running)
    return [d.pk for d in devices]


def reading(t: float, device_index: int, anchor: float) -> tuple[float, float, int, float]:
    """utilization %, temperature C, memory used, power W at epoch second t: busy while a job runs."""
    busy = (t - anchor) % JOB_EVERY < JOB_LENGTH
    jitter = random.random()
    if busy:
        return 90 + 9 * jitter, 70 + 5 * jitter + device_index, int((30 + 4 * jitter) * GIB), 300 + 50 * jitter
    return 2 * jitter, 40 + 3 * jitter, int(2 * GIB), 60 + 10 * jitter


def snapshot_rows(device_ids: list[int], start: float, end: float, step: int, bucket: int, anchor: float) -> Any:
    """Readings of every device from start to end; jobs start every JOB_EVERY seconds counted from anchor."""
    for index, device_id in enumerate(device_ids):
        t = start
        while t < end:
            utilization, temperature, used, power = reading(t, index, anchor)
            yield device_id, t, bucket, used, 80 * GIB, utilization, temperature, power, "", "healthy", ""
            t += step


def fill_compacted(device_ids: list[int], now: datetime) -> int:
    from gpuscheduler.conf import gpu_config

    config = gpu_config()
    bucket = int(config["SNAPSHOT_BUCKET_SECONDS"])
    end = now.timestamp()
    raw_edge = end - float(config["SNAPSHOT_RAW_HOURS"]) * 3600
    cutoff = raw_edge - raw_edge % bucket  # where snapshots_compact stops folding
    oldest = end - float(config["SNAPSHOT_RETENTION_DAYS"]) * 86400
    first_bucket = oldest - oldest % bucket + bucket
    averages = insert_snapshots(snapshot_rows(device_ids, first_bucket, cutoff, bucket, bucket, end))
    raw = insert_snapshots(snapshot_rows(device_ids, cutoff, end, INTERVAL, 0, end))
    return averages + raw


def fill_raw(device_ids: list[int], now: datetime) -> int:
    per_device = RAW_ROWS // len(device_ids)
    end = now.timestamp()
    return insert_snapshots(snapshot_rows(device_ids, end - per_device * INTERVAL, end - 0.5, INTERVAL, 0, end))


def insert_snapshots(rows: Any) -> int:
    """Load rows fast: executemany on SQLite, COPY on PostgreSQL (bulk_create is 10x slower here)."""
    from django.db import connection, transaction

    from gpuscheduler.models import Snapshot

    table = Snapshot._meta.db_table
    columns = (
        "device_id",
        "taken_at",
        "bucket_seconds",
        "memory_used",
        "memory_total",
        "utilization",
        "temperature",
        "power_watts",
        "throttle_reasons",
        "health",
        "error",
    )
    count = 0
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row((row[0], datetime.fromtimestamp(row[1], UTC), *row[2:]))
                    count += 1
        else:
            # Django keeps SQLite datetimes as naive UTC text, 'YYYY-MM-DD HH:MM:SS[.ffffff]'.
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            batch: list[tuple[Any, ...]] = []
            for row in rows:
                batch.append((row[0], str(datetime.fromtimestamp(row[1], UTC).replace(tzinfo=None)), *row[2:]))
                if len(batch) == 20000:
                    cursor.executemany(sql, batch)
                    count, batch = count + len(batch), []
            cursor.executemany(sql, batch)
            count += len(batch)
    if connection.vendor == "postgresql":
        # What autovacuum does soon after a load this size; without it the planner guesses.
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {table}")
    return count


def check_compacted(now: datetime) -> list[str]:
    """The compacted fill must be a fixed point of snapshots_compact."""
    from gpuscheduler.services import snapshots_compact

    folded, expired = snapshots_compact(now=now)
    if folded or expired:
        raise SystemExit(f"the compacted fill is not what snapshots_compact keeps: folded {folded}, expired {expired}")
    return ["compacted fill checked: snapshots_compact folds and deletes nothing in it"]


def clear_snapshots() -> None:
    from django.db import connection

    from gpuscheduler.models import Snapshot

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Snapshot._meta.db_table}")
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM")


def time_views(backend: str, pattern: str, rows: int, requests: int, notes: list[str]) -> list[dict[str, Any]]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.urls import reverse
    from django.utils import timezone

    from gpuscheduler.models import Device

    # Workers are alive (their heartbeat is fresh), so every card shows its current job.
    Device.objects.update(worker_seen_at=timezone.now())
    client = Client(HTTP_HOST="localhost")  # the project allows only its own hosts
    client.force_login(User.objects.get(username="bench"))
    page = reverse("admin:gpuscheduler_gpustatuspage_changelist")
    data = reverse("admin:gpuscheduler_gpustatuspage_data")
    results = []
    for view, url in (("page", page), ("data.json", data), ("data.json?fragments=1", data + "?fragments=1")):
        for _ in range(2):  # warm caches, as a page that is open and polling would have them
            assert client.get(url).status_code == 200
        timings = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(url)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
        queries: list[str] = []

        def count(execute: Any, sql: str, *rest: Any, log: list[str] = queries) -> Any:
            log.append(sql)
            return execute(sql, *rest)

        with connection.execute_wrapper(count):
            client.get(url)
        timings.sort()
        results.append(
            {
                "backend": backend,
                "pattern": pattern,
                "rows": rows,
                "view": view,
                "median_ms": statistics.median(timings),
                "p90_ms": timings[min(len(timings) - 1, int(len(timings) * 0.9))],
                "queries": len(queries),
                "notes": notes,
            }
        )
    return results


if __name__ == "__main__":
    main()
