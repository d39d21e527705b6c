"""Time placement (`assignments_place`) at 64 devices and 1,000,000 snapshot rows, against the old one.

    .venv/bin/python bench/bench_placement.py [--rounds 3] [--placements 500] [--threads 8] [--seconds 10]

Fills a fresh database with 64 simulated devices (a mix of learned H100, A100 and T4 cost curves,
live workers whose heartbeats go on during the run, one running attempt each), 1,000,000 snapshot
rows, 50,000 finished attempts, and times placements of 4 images under the balanced policy:

- queries per placement (its transaction's round trips, BEGIN and COMMIT included);
- one submitter: --placements placements one after the other (at most --seconds), p50 and p99;
- --threads concurrent submitters for --seconds, as threads of one process (one interpreter
  lock between them) and as processes of their own (as web workers are): placements per
  second, p50 and p99 of each placement.

A drainer plays the workers' part: it finishes the oldest queued attempts so that about two per
device stay queued, as a pool that keeps up would. The old placement (every device row locked,
readings from the newest snapshot of each device) is kept below as it was, and runs in the same
database, alternating with the new one each round; the table shows the median over --rounds
rounds and the ratio old / new. A floor runs beside them: no placement, one attempt row inserted
and committed, the least any durable press costs on this host; what placement adds is its figures
less the floor's. The new placement runs twice: as deployed (a press reuses its
process's read of the devices for up to GPU_PLACEMENT_READ_SECONDS, 0.5 s) and reading the devices
on every press (the setting at 0). A placement the database gives up on (SQLite's "database is
locked" after its 30 s busy timeout) is counted in the notes, not timed.

Runs on a temporary SQLite file, and also on PostgreSQL when DATABASE_URL names one (in a database
of its own, bench_placement_<pid>, created on that server and dropped afterwards). Each backend
runs in a child process because Django's settings are fixed once per process. The targets (on
PostgreSQL): p99 under 5 ms with one submitter, at least 200 placements a second with 8.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import HostLoad, child_run, each_backend

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 64
SNAPSHOTS = 1_000_000
HISTORY = 50_000
IMAGES = 4  # per placement: a persona's default sample count
QUEUED_PER_DEVICE = 2  # what the drainer leaves queued
TARGET_P99_MS = 5.0
TARGET_RATE = 200.0
GIB = 1024**3
# (name, fixed seconds, seconds per image, knee): a call of n images costs fixed + per_image * max(n, knee).
CURVES = [("H100", 1.1, 0.1, 4.0), ("A100", 1.5, 0.18, 4.0), ("T4", 0.8, 0.9, 1.0)]


# --- the parent: one child per backend, then the table ------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of old and new (medians are shown).")
    parser.add_argument("--placements", type=int, default=500, help="One submitter's placements per round.")
    parser.add_argument("--threads", type=int, default=8, help="Concurrent submitters.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Longest a timed phase runs.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--submit", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--request", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers:
        run_workers()
        return
    if args.submit:
        print(json.dumps(run_submitter(args)))
        return
    if args.child:
        print(json.dumps(run_child(args)))
        return

    options = [f"--{name}={getattr(args, name)}" for name in ("rounds", "placements", "threads", "seconds")]

    def run(backend: str, url: str, work: Path) -> dict[str, Any]:
        # Heartbeats go on (their writes compete with placements), but a worker starved of its turn
        # by the old placement must not make its device stale mid-run.
        # The read age as deployed (the test settings the children load read the devices on every press).
        return dict(
            child_run(
                __file__,
                backend,
                url,
                work,
                options,
                GPU_POLICY="balanced",
                GPU_LEASE_SECONDS="600",
                GPU_PLACEMENT_READ_SECONDS="0.5",
            )
        )

    load = HostLoad()
    missed = print_table(each_backend("bench-placement", run), args)
    print(load.summary())
    sys.exit(1 if missed else 0)


def print_table(results: dict[str, Any], args: argparse.Namespace) -> bool:
    """Print the table; True when PostgreSQL ran and the new placement missed a target."""
    n = args.threads
    print()
    print(
        f"Placement of {IMAGES} images, {DEVICES} devices, {SNAPSHOTS:,} snapshot rows: medians of {args.rounds} rounds"
    )
    print(f"(1 submitter; {n} submitter threads in one process; {n} submitter processes, as web workers are)")
    headers = ["backend", "placement", "queries", "1: p50 ms", "p99 ms"]
    for mode in ("threads", "processes"):
        headers += [f"{n} {mode}: per s", "p50 ms", "p99 ms"]
    rows = []
    missed, target = False, ""
    for backend, run in results.items():
        old, new = run["old"], run["new"]
        named = (("old", old), ("new, read each press", run["fresh"]), ("new", new), ("floor", run["floor"]))
        for name, r in named:
            rows.append([backend, name, f"{r['queries']:.0f}", *cells(r, "{:.1f}"), r["notes"]])
        ratio = {key: old[key] / new[key] for key in new if key != "notes"}
        for key in ("threads_rate", "processes_rate"):
            ratio[key] = new[key] / old[key]  # higher is better: new over old
        rows.append([backend, "ratio", f"{ratio['queries']:.1f}", *cells(ratio, "{:.1f}x"), "old/new; rates new/old"])
        if backend == "postgresql":
            ok_p99, ok_rate = new["p99"] < TARGET_P99_MS, new["processes_rate"] >= TARGET_RATE
            missed = not (ok_p99 and ok_rate)
            floor = run["floor"]
            target = (
                f"PostgreSQL targets: p99 {new['p99']:.1f} ms < {TARGET_P99_MS:.0f} ms: "
                f"{'ok' if ok_p99 else 'MISSED'} (the floor's p99 {floor['p99']:.1f} ms: "
                f"placement adds {new['p99'] - floor['p99']:.1f} ms at p99, "
                f"{new['p50'] - floor['p50']:.1f} ms at p50); "
                f"{new['processes_rate']:.0f} placements/s >= {TARGET_RATE:.0f} with {n} submitters: "
                f"{'ok' if ok_rate else 'MISSED'} ({new['threads_rate']:.0f}/s on threads)"
            )
    print(table([*headers, "notes"], rows))
    if "postgresql" in results:
        print(target)
    print(
        "queries: the round trips of one placement, BEGIN and COMMIT included (on PostgreSQL the turn "
        "goes with the backlog read); times include the commit."
    )
    return missed


def cells(r: dict[str, Any], form: str) -> list[str]:
    keys = ["p50", "p99"]
    for mode in ("threads", "processes"):
        keys += [f"{mode}_rate", f"{mode}_p50", f"{mode}_p99"]
    return [form.format(r[key]) for key in keys]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# --- the child: one database, both placements ----------------------------------------------------


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    devices = fill()
    print(f"{args.child}: filled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    # The workers' part runs in a process of its own, as workers do: not in this one's interpreter lock.
    workers = subprocess.Popen([sys.executable, __file__, "--workers"])
    rounds: dict[str, list[dict[str, float]]] = {"old": [], "fresh": [], "new": [], "floor": []}
    try:
        for n in range(args.rounds):
            for name in ("new", "fresh", "old", "floor") if n % 2 == 0 else ("floor", "old", "fresh", "new"):
                drain(keep=0)
                result = measure(name, args)
                rounds[name].append(result)
                print(f"{args.child} round {n + 1} {name}: {json.dumps(result)}", file=sys.stderr)
    finally:
        workers.terminate()
        workers.wait(30)
    summary = {name: medians(rows) for name, rows in rounds.items()}
    if args.child == "postgresql":
        summary["new"]["notes"] = "turns on one advisory lock, sent with the backlog read; reads prepared"
    else:
        summary["new"]["notes"] = "no lock: IMMEDIATE transactions serialize writers"
    summary["new"]["notes"] += "; device read reused for up to 0.5 s (the default)"
    summary["fresh"]["notes"] = "the same, devices read on every press (GPU_PLACEMENT_READ_SECONDS=0)"
    summary["old"]["notes"] = "every device row locked, newest snapshot of each read"
    summary["floor"]["notes"] = "no placement: one attempt row inserted and committed (the host's floor)"
    for row in summary.values():
        failed = {mode: row.pop(f"{mode}_failed") for mode in ("threads", "processes")}
        if any(failed.values()):
            given_up = ", ".join(f"{n:.0f} on {mode}" for mode, n in failed.items())
            row["notes"] += f"; the database gave up on {given_up} (database is locked)"
    assert len(devices) == DEVICES
    return summary


def medians(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def fill() -> list[int]:
    """64 devices with live workers and learned curves, their snapshots and a history of attempts."""
    from django.db import connection, transaction
    from django.utils import timezone

    from gpuscheduler.models import Assignment, AssignmentState, CostCurve, Device, DeviceKind, Health
    from gpuscheduler.workloads import default_key_and_steps
    from personas.models import Persona, RequestState, SampleRequest

    now = timezone.now()
    devices = Device.objects.bulk_create(
        Device(
            host="bench",
            uuid=f"SIM-{i:04d}-bench",
            name=CURVES[i % len(CURVES)][0],
            index=i,
            kind=DeviceKind.SIMULATED,
            memory_total=80 * GIB,
            health=Health.HEALTHY,
            health_reason="readings within limits",
            last_seen=now,
            worker_name=f"gpu-{i}@bench",
            worker_pid=10000 + i,
            worker_host="bench",
            worker_state="busy",
            worker_seen_at=now,
            reading_at=now,
            memory_used=(8 + i % 20) * GIB,
            utilization=float(50 + i % 50),
            temperature=float(50 + i % 30),
        )
        for i in range(DEVICES)
    )
    model_key, model_steps = default_key_and_steps()  # the default model (made here from the settings)
    CostCurve.objects.bulk_create(
        CostCurve(
            device=d,
            model=model_key,
            steps=model_steps,
            fixed_seconds=CURVES[i % len(CURVES)][1],
            per_image_seconds=CURVES[i % len(CURVES)][2],
            knee=CURVES[i % len(CURVES)][3],
            calls=50,
            sizes=3,
        )
        for i, d in enumerate(devices)
    )
    persona = Persona.objects.create(name="History", slug="history", appearance_prompt="x")
    done = SampleRequest.objects.create(
        persona=persona, count=DEVICES * IMAGES, first_seed=0, model="m", steps=1, state=RequestState.RUNNING
    )
    # Finished attempts, so that the live ones are found by index, not by reading the table.
    Assignment.objects.bulk_create(
        (
            Assignment(
                request=None,
                image_count=IMAGES,
                job_id=f"history-{n}",
                queue_name=f"gpu.{devices[n % DEVICES].pk}",
                planned_device=devices[n % DEVICES],
                device=devices[n % DEVICES],
                policy="balanced",
                reason="bench",
                state=AssignmentState.SUCCEEDED,
                started_at=now,
                finished_at=now,
                calls=1,
            )
            for n in range(HISTORY)
        ),
        batch_size=5000,
    )
    # The call each worker is running now.
    Assignment.objects.bulk_create(
        Assignment(
            request=done,
            first_index=1000 + i,
            image_count=IMAGES,
            job_id=f"running-{i}",
            queue_name=f"gpu.{d.pk}",
            planned_device=d,
            device=d,
            policy="balanced",
            reason="bench",
            state=AssignmentState.RUNNING,
            started_at=now,
            heartbeat_at=now,
        )
        for i, d in enumerate(devices)
    )
    table = "gpuscheduler_snapshot"
    columns = "device_id, taken_at, bucket_seconds, memory_used, memory_total, utilization, temperature, "
    columns += "power_watts, throttle_reasons, health, error"
    per_device = SNAPSHOTS // DEVICES
    with transaction.atomic(), connection.cursor() as cursor:
        # Generated by the database itself: 5 s apart, newest a moment ago.
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
        # What autovacuum does soon after a load this size (on PostgreSQL it would otherwise vacuum
        # the million rows during the first timed phase): the timings are of a database at rest.
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
    return [d.pk for d in devices]


def run_workers() -> None:
    """The workers' part, until terminated: heartbeats on a thread, and the drainer."""
    import django

    django.setup()
    threading.Thread(target=loop, args=(heartbeats,), daemon=True).start()
    loop(drain)


def loop(work: Callable[[], Any]) -> None:
    from django.db import DatabaseError

    while True:
        try:
            work()
        except DatabaseError:  # SQLite's "database is locked" while the old placement runs
            time.sleep(0.1)


def heartbeats() -> None:
    """Each worker beats on its own device row every 2 s (one-row UPDATEs, as gpuworker does)."""
    from gpuscheduler.clock import DbNow
    from gpuscheduler.models import Device

    ids = list(Device.objects.order_by("pk").values_list("pk", flat=True))
    for pk in ids:
        Device.objects.filter(pk=pk).update(worker_seen_at=DbNow(), last_seen=DbNow())
        time.sleep(2.0 / len(ids))


def drain(keep: int | None = None) -> None:
    """Finish the oldest queued attempts beyond `keep` (two per device), as workers that keep up do."""
    from gpuscheduler.clock import DbNow
    from gpuscheduler.models import Assignment, AssignmentState

    keep = DEVICES * QUEUED_PER_DEVICE if keep is None else keep
    queued = Assignment.objects.filter(state=AssignmentState.QUEUED)
    excess = queued.count() - keep
    if excess > 0:
        ids = list(queued.order_by("id").values_list("id", flat=True)[:excess])
        Assignment.objects.filter(pk__in=ids, state=AssignmentState.QUEUED).update(
            state=AssignmentState.SUCCEEDED, finished_at=DbNow()
        )
    if keep:
        time.sleep(0.05)


# --- timing ------------------------------------------------------------------------------------------

Place = Callable[[int, int], Any]
_first_index = itertools.count()


def new_place(request_id: int, first_index: int) -> Any:
    from gpuscheduler.assignments import assignments_place
    from gpuscheduler.workloads import default_key_and_steps

    # As a press places: for the request's model and steps (read once; a press has them on its request).
    global _model
    if _model is None:
        _model = default_key_and_steps()
    model, steps = _model
    return assignments_place(request_id=request_id, count=IMAGES, first_index=first_index, model=model, steps=steps)


_model: tuple[str, int] | None = None


def new_request() -> int:
    from personas.models import Persona, SampleRequest

    name = uuid.uuid4().hex[:12]
    persona = Persona.objects.create(name=name, slug=name, appearance_prompt="x")
    return SampleRequest.objects.create(persona=persona, count=IMAGES, first_seed=0, model="m", steps=1).pk


def timed(place: Place, request_id: int) -> float:
    from django.db import transaction

    started = time.perf_counter()
    with transaction.atomic():
        place(request_id, next(_first_index) * IMAGES)
    return (time.perf_counter() - started) * 1000


def attempt(place: Place, request_id: int, latencies: list[float]) -> bool:
    """One timed placement into `latencies`; False when the database gave up on it (SQLite says
    "database is locked" once a writer waited past its timeout)."""
    from django.db import OperationalError

    try:
        latencies.append(timed(place, request_id))
    except OperationalError:
        return False
    return True


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    place = PLACERS[name]
    request_id = new_request()
    for _ in range(5):  # warm caches and connections
        timed(place, request_id)
    counts = []
    for _ in range(5):
        with CaptureQueriesContext(connection) as captured, transaction.atomic():
            place(request_id, next(_first_index) * IMAGES)
        counts.append(len(captured.captured_queries))

    single: list[float] = []
    deadline = time.monotonic() + args.seconds
    while len(single) < args.placements and time.monotonic() < deadline:
        single.append(timed(place, request_id))
    result = {"queries": statistics.median(counts), "p50": percentile(single, 0.5), "p99": percentile(single, 0.99)}
    for mode, run in (("threads", in_threads), ("processes", in_processes)):
        latencies, failed, elapsed = run(name, args)
        result[f"{mode}_failed"] = failed
        result[f"{mode}_rate"] = len(latencies) / elapsed
        result[f"{mode}_p50"] = percentile(latencies, 0.5)
        result[f"{mode}_p99"] = percentile(latencies, 0.99)
    return result


def in_threads(name: str, args: argparse.Namespace) -> tuple[list[float], int, float]:
    """--threads submitters on threads of this process (one interpreter lock between them)."""
    from django.db import connection

    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors: list[BaseException] = []
    failed: list[int] = []
    barrier = threading.Barrier(args.threads + 1)
    owners = [new_request() for _ in range(args.threads)]

    def submitter(mine: list[float], own: int) -> None:
        try:
            barrier.wait()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                if not attempt(PLACERS[name], own, mine):
                    failed.append(1)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=submitter, args=(mine, own)) for mine, own in zip(latencies, owners, strict=True)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"a submitter failed: {errors[0]!r}")
    return [t for mine in latencies for t in mine], len(failed), elapsed


def in_processes(name: str, args: argparse.Namespace) -> tuple[list[float], int, float]:
    """--threads submitters, each a process of its own (as web workers are), started together."""
    start = time.time() + 8  # after every process has loaded Django
    command = [sys.executable, __file__, "--submit", name, "--seconds", str(args.seconds), "--start", str(start)]
    children = [
        subprocess.Popen([*command, "--request", str(new_request())], stdout=subprocess.PIPE, text=True)
        for _ in range(args.threads)
    ]
    latencies: list[float] = []
    failed = 0
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"a submitter process failed (exit {child.returncode})")
        mine, lost = json.loads(out.strip().splitlines()[-1])
        latencies += mine
        failed += lost
    return latencies, failed, args.seconds


def run_submitter(args: argparse.Namespace) -> tuple[list[float], int]:
    """One submitter process: place from --start for --seconds; the latencies in ms, and how many
    placements the database gave up on."""
    import django

    django.setup()
    place = PLACERS[args.submit]
    warm: list[float] = []
    attempt(place, args.request, warm)
    time.sleep(max(0.0, args.start - time.time()))
    end = time.monotonic() + args.seconds
    latencies: list[float] = []
    failed = 0
    while time.monotonic() < end:
        failed += not attempt(place, args.request, latencies)
    return latencies, failed


# --- the old placement, as it was before issue 9 (every device row locked, readings from snapshots) --


def old_place(request_id: int, first_index: int) -> Any:
    from gpuscheduler import queues
    from gpuscheduler.conf import gpu_config, samples_config
    from gpuscheduler.models import Assignment, AssignmentKind, Device
    from gpuscheduler.placement_reads import placement_sequence
    from gpuscheduler.planning import plan_chunks
    from gpuscheduler.policies import get_policy

    devices = list(Device.objects.select_for_update(no_key=True).order_by("pk"))
    views = old_device_views(devices)
    max_batch = int(samples_config()["MAX_BATCH"])
    policy_name = gpu_config()["POLICY"]
    ranked = get_policy(policy_name)(views, placement_sequence())
    chunks = plan_chunks(IMAGES, ranked, max_batch=max_batch, by_finish=policy_name == "balanced")
    return [
        Assignment.objects.create(
            kind=AssignmentKind.SAMPLES,
            request_id=request_id,
            first_index=first_index + chunk.first_index,
            image_count=chunk.size,
            attempt=1,
            job_id=f"samples-{uuid.uuid4().hex}",
            queue_name=queues.device_queue_name(chunk.device_id, pinned=False),
            planned_device_id=chunk.device_id,
            pinned=False,
            avoid_device_id=None,
            policy=policy_name,
            reason=chunk.reason[:500],
        )
        for chunk in chunks
    ]


def old_device_views(devices: list[Any]) -> list[Any]:
    from gpuscheduler.clock import db_now
    from gpuscheduler.costs import best_call_size, curves_for
    from gpuscheduler.models import Health
    from gpuscheduler.policies import DeviceView
    from gpuscheduler.selectors import device_blocked, latest_snapshots, worker_alive
    from gpuscheduler.storage import stores_unhealthy

    devices = [d for d in devices if d.retired_at is None]
    snapshots = latest_snapshots([d.pk for d in devices])
    curves = curves_for([d.pk for d in devices])
    backlogs = old_device_backlogs()
    stores = stores_unhealthy()
    now = db_now()
    views = []
    for device in devices:
        snap = snapshots.get(device.pk)
        queued, running = backlogs.get(device.pk, (0, 0))
        blocked = device_blocked(device, now, stores)
        views.append(
            DeviceView(
                id=device.pk,
                label=device.label,
                kind=device.kind,
                healthy=device.health == Health.HEALTHY and not blocked,
                blocked=blocked,
                worker_alive=worker_alive(device, now),
                memory_used=snap.memory_used if snap else None,
                memory_total=(snap.memory_total if snap else None) or device.memory_total or None,
                utilization=snap.utilization if snap else None,
                temperature=snap.temperature if snap else None,
                curve=curves[device.pk],
                batch=best_call_size(curves[device.pk]),
                queued_images=queued,
                running_images=running,
            )
        )
    return views


def old_device_backlogs() -> dict[int, tuple[int, int]]:
    from django.db.models import Sum

    from gpuscheduler.models import Assignment, AssignmentState

    queued = (
        Assignment.objects.filter(state=AssignmentState.QUEUED)
        .values("planned_device")
        .annotate(total_images=Sum("image_count"))
    )
    running = (
        Assignment.objects.filter(state=AssignmentState.RUNNING)
        .values("device")
        .annotate(total_images=Sum("image_count"))
    )
    backlog: dict[int, tuple[int, int]] = {}
    for row in queued:
        backlog[row["planned_device"]] = (int(row["total_images"] or 0), 0)
    for row in running:
        if row["device"] is not None:
            q, _ = backlog.get(row["device"], (0, 0))
            backlog[row["device"]] = (q, int(row["total_images"] or 0))
    return backlog


def fresh_place(request_id: int, first_index: int) -> Any:
    """The new placement with GPU_PLACEMENT_READ_SECONDS=0: it reads the devices on every press."""
    from gpuscheduler.placement_reads import forget_device_reads

    forget_device_reads()
    return new_place(request_id, first_index)


def floor_place(request_id: int, first_index: int) -> Any:
    """No placement at all: one attempt row inserted on the first device and committed (BEGIN,
    INSERT, COMMIT). The least any durable press costs on this host; its tail is the host's (the
    disk's flush at commit, a core taken by a neighbour), which placement cannot go below."""
    from gpuscheduler.models import Assignment, AssignmentKind, Device
    from gpuscheduler.placement import _insert
    from gpuscheduler.queues import device_queue_name

    global _floor_device
    if _floor_device is None:
        _floor_device = Device.objects.order_by("pk").values_list("pk", flat=True).first()
    return _insert(
        [
            Assignment(
                kind=AssignmentKind.SAMPLES,
                request_id=request_id,
                first_index=first_index,
                image_count=IMAGES,
                attempt=1,
                job_id=f"samples-{uuid.uuid4().hex}",
                queue_name=device_queue_name(_floor_device),
                planned_device_id=_floor_device,
                policy="floor",
                reason="floor",
            )
        ]
    )


_floor_device: int | None = None

PLACERS: dict[str, Place] = {"new": new_place, "fresh": fresh_place, "old": old_place, "floor": floor_place}


if __name__ == "__main__":
    main()
