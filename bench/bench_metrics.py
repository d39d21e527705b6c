"""Time `/metrics` (what Prometheus scrapes) with 64 devices and a large history.

    .venv/bin/python bench/bench_metrics.py [--scrapes 20] [--devices 64]

Fills a fresh database with 64 simulated devices (live workers, a reading on each row, a learned
cost curve and two models each), 1,000,000 snapshot rows (the scrape reads each device's newest
for its power), 200,000 attempts (counted by state, device and policy over the whole table),
200,000 pipeline calls over 48 hours (the histogram reads the last 24 h, at most the latest
10,000) and 20,000 finished requests of the last day (the latency histogram), then times
--scrapes scrapes through Django's test Client with the bearer token: median, p90 and the
slowest, the statements of one scrape and its slowest statements, the size of the answer.

Runs on a temporary SQLite file, and also on PostgreSQL when DATABASE_URL names one (in a
database of its own, created on that server and dropped afterwards). Each backend runs in a
child process because Django's settings are fixed once per process. Redis is only read (the
queue depths and RQ's collector): REDIS_URL, default database 12. Target: a median under 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import child_run, each_backend

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 200.0
SNAPSHOTS = 1_000_000
ASSIGNMENTS = 200_000
CALLS = 200_000
REQUESTS = 20_000
TOKEN = "bench-metrics-token-0123456789"
GIB = 1024**3
# (name, fixed seconds, seconds per image, knee), as bench_placement.py's pool.
CURVES = [("H100", 1.1, 0.1, 4.0), ("A100", 1.5, 0.18, 4.0), ("T4", 0.8, 0.9, 1.0)]
STATES = ["succeeded"] * 17 + ["failed", "retried", "abandoned"]
POLICIES = ["balanced", "balanced", "least_memory", "round_robin"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=20, help="Timed scrapes per backend (the median is shown).")
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    options = ["--scrapes", str(args.scrapes), "--devices", str(args.devices)]
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12")

    def run(backend: str, url: str, work: Path) -> dict[str, Any]:
        return child_run(__file__, backend, url, work, options, REDIS_URL=redis, METRICS_TOKEN=TOKEN)

    missed = print_table(each_backend("bench-metrics", run), args)
    sys.exit(1 if missed else 0)


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> bool:
    """Print the table; True when a backend's median missed the target."""
    print()
    print(
        f"/metrics with {args.devices} devices, {SNAPSHOTS:,} snapshots, {ASSIGNMENTS:,} attempts, "
        f"{CALLS:,} pipeline calls, {REQUESTS:,} requests: {args.scrapes} scrapes each"
    )
    headers = ["backend", "median ms", "p90 ms", "max ms", "queries", "series", "KiB", "slowest statements (ms)"]
    rows = []
    missed = False
    for backend, r in results.items():
        slowest = ", ".join(f"{name} {ms:.1f}" for name, ms in r["slowest"])
        rows.append(
            [
                backend,
                f"{r['median']:.1f}",
                f"{r['p90']:.1f}",
                f"{r['max']:.1f}",
                r["queries"],
                f"{r['series']:,}",
                f"{r['bytes'] / 1024:.0f}",
                slowest,
            ]
        )
        missed = missed or r["median"] >= TARGET_MS
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    print("\n".join(lines))
    verdicts = ", ".join(f"{b} {r['median']:.0f} ms" for b, r in results.items())
    print(f"target: median under {TARGET_MS:.0f} ms: {'MISSED' if missed else 'ok'} ({verdicts})")
    return missed


# --- the child: one database, filled, then scraped ------------------------------------------------


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    fill(args.devices)
    print(f"{args.child}: filled in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    def scrape() -> bytes:
        response = client.get("/metrics")
        assert response.status_code == 200, response.content[:500]
        return bytes(response.content)

    for _ in range(2):  # warm-up: imports, connections, the database's caches
        body = scrape()
    statements: list[tuple[str, float]] = []

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        begin = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            statements.append((label(sql), (time.perf_counter() - begin) * 1000))

    with connection.execute_wrapper(timed):
        scrape()
    timings = []
    for _ in range(args.scrapes):
        begin = time.perf_counter()
        scrape()
        timings.append((time.perf_counter() - begin) * 1000)
    timings.sort()
    slowest = sorted(statements, key=lambda x: -x[1])
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {
        "median": statistics.median(timings),
        "p90": timings[min(len(timings) - 1, int(len(timings) * 0.9))],
        "max": timings[-1],
        "queries": len(statements),
        "slowest": slowest[:4],
        "series": series,
        "bytes": len(body),
    }


def label(sql: str) -> str:
    """A statement's table, to name it in the table: `pipelinecall`, `assignment`, ..."""
    for table in ("pipelinecall", "samplerequest", "snapshot", "assignment", "costcurve", "devicemodel", "device"):
        if f"_{table}" in sql:
            return table
    return sql.split()[0].lower()


def fill(count: int) -> None:
    """Devices, snapshots, attempts, calls and requests, as a busy pool would have them."""
    from datetime import timedelta

    from django.db import connection, transaction
    from django.utils import timezone

    from gpuscheduler.models import (
        Assignment,
        CostCurve,
        Device,
        DeviceKind,
        DeviceModel,
        Health,
        Host,
        ModelState,
        PipelineCall,
    )
    from gpuscheduler.workloads import default_key_and_steps
    from personas.models import Persona, RequestState, SampleRequest

    now = timezone.now()
    Host.objects.create(host="bench", hostname="bench-machine")
    devices = Device.objects.bulk_create(
        Device(
            host="bench",
            uuid=f"GPU-{i:04d}-bench",
            name=CURVES[i % len(CURVES)][0],
            index=i,
            kind=DeviceKind.SIMULATED,
            memory_total=80 * GIB,
            health=Health.HEALTHY,
            last_seen=now,
            worker_name=f"gpu-{i}@bench",
            worker_host="bench",
            worker_state="busy",
            worker_seen_at=now + timedelta(hours=1),  # live for the whole run
            reading_at=now,
            memory_used=(8 + i % 20) * GIB,
            utilization=float(50 + i % 50),
            temperature=float(50 + i % 30),
        )
        for i in range(count)
    )
    model, steps = default_key_and_steps()
    CostCurve.objects.bulk_create(
        CostCurve(
            device=d, model=model, steps=steps, fixed_seconds=c[1], per_image_seconds=c[2], knee=c[3], calls=50, sizes=3
        )
        for d, c in ((d, CURVES[i % len(CURVES)]) for i, d in enumerate(devices))
    )
    DeviceModel.objects.bulk_create(
        DeviceModel(device=d, model=key, state=state, load_seconds=12.5, loads=3, memory_bytes=4 * GIB)
        for d in devices
        for key, state in ((model, ModelState.WARM), ("sdxl@bench", ModelState.EVICTED))
    )
    Assignment.objects.bulk_create(
        (
            Assignment(
                image_count=4,
                job_id=f"history-{n}",
                queue_name=f"gpu.{devices[n % count].pk}",
                planned_device=devices[n % count],
                device=devices[n % count],
                policy=POLICIES[n % len(POLICIES)],
                reason="bench",
                state=STATES[n % len(STATES)],
                calls=1,
            )
            for n in range(ASSIGNMENTS)
        ),
        batch_size=5000,
    )
    PipelineCall.objects.bulk_create(
        (
            PipelineCall(
                device=devices[n % count],
                model=model,
                steps=steps,
                images=(1, 4, 8, 16)[n % 4],
                seconds=0.5 + (n % 37) / 10,
                at=now - timedelta(seconds=n * 48 * 3600 / CALLS),
            )
            for n in range(CALLS)
        ),
        batch_size=5000,
    )
    personas = Persona.objects.bulk_create(
        Persona(name=f"Bench {i}", slug=f"bench-{i}", appearance_prompt="x") for i in range(200)
    )
    SampleRequest.objects.bulk_create(
        (
            SampleRequest(
                persona=personas[n % len(personas)],
                count=4,
                first_seed=n,
                model=model,
                steps=steps,
                state=RequestState.SUCCEEDED if n % 10 else RequestState.FAILED,
                created=now - timedelta(seconds=n * 86000 / REQUESTS),
                finished_at=now - timedelta(seconds=n * 86000 / REQUESTS) + timedelta(seconds=2 + n % 300),
            )
            for n in range(REQUESTS)
        ),
        batch_size=5000,
    )
    table = "gpuscheduler_snapshot"
    columns = "device_id, taken_at, bucket_seconds, memory_used, memory_total, utilization, temperature, "
    columns += "power_watts, throttle_reasons, health, error"
    per_device = SNAPSHOTS // count
    with transaction.atomic(), connection.cursor() as cursor:
        # Generated by the database itself: 5 s apart, newest a moment ago (as bench_placement.py).
        if connection.vendor == "postgresql":
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT d.id, now() - make_interval(secs => 5 * s.i), 0, "
                "(2 + s.i %% 30)::bigint * 1073741824, 85899345920, (s.i * 7 %% 100)::float, 40 + s.i %% 40, 200, "
                "'', 'healthy', '' FROM gpuscheduler_device d CROSS JOIN generate_series(1, %s) AS s(i)",
                [per_device],
            )
        else:
            cursor.execute(
                f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < %s) "
                f"INSERT INTO {table} ({columns}) SELECT d.id, "
                "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || (5 * s.i) || ' seconds'), 0, "
                "(2 + s.i %% 30) * 1073741824, 85899345920, (s.i * 7 %% 100) * 1.0, 40 + s.i %% 40, 200, "
                "'', 'healthy', '' FROM gpuscheduler_device d CROSS JOIN s",
                [per_device],
            )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # what autovacuum does soon after a load this size


if __name__ == "__main__":
    main()
