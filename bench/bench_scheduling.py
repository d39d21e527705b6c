"""Placement and stealing on a mixed pool: the same stream of requests under every policy and
stealing rule, through real workers, in one run. Prints a table and each row's ratio to the
default (balanced placement, speed-aware stealing).

    .venv/bin/python bench/bench_scheduling.py [--pool 'H100*2,T4:0.25'] [--requests 30] [--repeats 3]

Simulated devices with the `simulated:SECONDS` model (an image takes SECONDS / speed; no
diffusion, so the 2 CPU cores of a small machine do not blur the GPUs' speeds). Requests of 1, 2,
4 or 8 images arrive one every --gap seconds on average (exponential gaps, fixed seed), each for
its own persona, through `sample_request_submit` as the admin button does; real `gpuworkers`
(one process per device), real `gpumonitor`, real Redis. Measured per run: makespan (first
submit to last image), images per second, request latency (submit to finished: median and 90th
percentile), the images each device made, and the calls run by a device other than the one
placement chose (stolen). Medians over --repeats runs, and the worst makespan: a slow device
that steals a fast one's last call shows there first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from harness import Installation, table, wait_for

# (label, GPU_POLICY, GPU_STEAL); the last is the default every ratio is taken against.
SCENARIOS = [
    ("round robin, steal always", "round_robin", "always"),
    ("least memory, steal always", "least_memory", "always"),
    ("balanced, steal always", "balanced", "always"),
    ("balanced, steal speed (default)", "balanced", "speed"),
]
SIZES = (1, 2, 4, 8)


def workload(requests: int, gap: float, seed: int) -> list[tuple[float, int]]:
    """(seconds after the start, images) for every request."""
    rng = random.Random(seed)
    at, stream = 0.0, []
    for _ in range(requests):
        stream.append((at, rng.choice(SIZES)))
        at += rng.expovariate(1 / gap)
    return stream


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", default="H100*2,T4:0.25", help="GPU_SIMULATED for the run")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--gap", type=float, default=0.5, help="mean seconds between requests")
    parser.add_argument("--seconds-per-image", type=float, default=0.4, help="at speed 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.requests < 1 or args.repeats < 1 or args.gap <= 0 or args.seconds_per_image <= 0:
        parser.error("--requests and --repeats must be at least 1, --gap and --seconds-per-image above 0")
    inst = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED=args.pool,
        SAMPLES_MODEL=f"simulated:{args.seconds_per_image}",
        OMP_NUM_THREADS="1",
    )
    inst.setup()
    from django.conf import settings

    from gpuscheduler.models import Assignment, AssignmentState, Device
    from gpuscheduler.simulated import describe
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    stream = workload(args.requests, args.gap, args.seed)
    expected = len(describe(args.pool, settings.GPUSCHEDULER["HOST"]))
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in SCENARIOS}
    per_device: dict[str, dict[str, list[int]]] = {label: {} for label, _, _ in SCENARIOS}
    run = 0
    try:
        inst.start("gpumonitor")
        for steal in ("always", "speed"):
            workers = inst.start("gpuworkers", env={"GPU_STEAL": steal})
            wait_for(lambda: Device.objects.filter(worker_state="idle").count() == expected, 120, "every worker")
            for _ in range(args.repeats):
                for label, policy, rule in SCENARIOS:
                    if rule != steal:
                        continue
                    run += 1
                    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": policy}
                    personas = Persona.objects.bulk_create(
                        Persona(name=f"Bench {run}-{i}", slug=f"bench-{run}-{i}", appearance_prompt=f"portrait {i}")
                        for i in range(len(stream))
                    )
                    requests = []
                    started = time.monotonic()
                    for persona, (at, count) in zip(personas, stream, strict=True):
                        time.sleep(max(0.0, started + at - time.monotonic()))
                        requests.append(sample_request_submit(persona=persona, count=count).request)
                    ids = [r.pk for r in requests]
                    wait_for(
                        lambda ids=ids: (
                            not SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists()
                        ),
                        600,
                        f"{label} to finish",
                    )
                    done = SampleRequest.objects.filter(pk__in=ids)
                    first = min(r.created for r in done)
                    last = max(r.finished_at for r in done if r.finished_at)
                    made = SampleImage.objects.filter(request__in=ids).count()
                    latencies = [(r.finished_at - r.created).total_seconds() for r in done if r.finished_at]
                    succeeded = Assignment.objects.filter(request__in=ids, state=AssignmentState.SUCCEEDED)
                    stolen = sum(1 for a in succeeded if a.device_id != a.planned_device_id)
                    makespan = (last - first).total_seconds()
                    results[label].append(
                        {
                            "makespan": makespan,
                            "rate": made / makespan,
                            "p50": statistics.median(latencies),
                            "p90": percentile(latencies, 0.9),
                            "stolen": stolen,
                            "asked": sum(r.count for r in requests),
                            "made": made,
                        }
                    )
                    for device in Device.objects.order_by("pk"):
                        count = SampleImage.objects.filter(request__in=ids, device=device).count()
                        per_device[label].setdefault(device.label, []).append(count)
                    print(
                        f"run {run}: {label}: {made} images in {makespan:.1f} s, "
                        f"latency median {statistics.median(latencies):.1f} s, {stolen} calls stolen",
                        flush=True,
                    )
            inst.stop_process(workers)
    finally:
        inst.close(keep=False)

    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    baseline = SCENARIOS[-1][0]
    rows = []
    for label, _, _ in SCENARIOS:
        devices_made = " / ".join(
            f"{name.split(' ', 2)[-1]} {statistics.median(counts):.0f}" for name, counts in per_device[label].items()
        )
        rows.append(
            [
                label,
                f"{median(label, 'makespan'):.1f}",
                f"{median(label, 'makespan') / median(baseline, 'makespan'):.2f}",
                f"{max(r['makespan'] for r in results[label]):.1f}",
                f"{median(label, 'rate'):.2f}",
                f"{median(label, 'p50'):.1f}",
                f"{median(label, 'p50') / median(baseline, 'p50'):.2f}",
                f"{median(label, 'p90'):.1f}",
                f"{median(label, 'p90') / median(baseline, 'p90'):.2f}",
                f"{median(label, 'stolen'):.0f}",
                devices_made,
            ]
        )
    total = sum(count for _, count in stream)
    print(
        f"\npool {args.pool}, {args.requests} requests ({total} images, sizes {SIZES}) arriving every "
        f"{args.gap} s on average, {args.seconds_per_image} s per image at speed 1; medians of {args.repeats} runs"
    )
    print(
        table(
            [
                "placement, stealing",
                "makespan s",
                "x default",
                "worst makespan s",
                "images/s",
                "latency p50 s",
                "x default",
                "latency p90 s",
                "x default",
                "stolen calls",
                "images per device",
            ],
            rows,
        )
    )
    complete = all(r["made"] == r["asked"] for runs in results.values() for r in runs)
    print(f"\nevery run made every image asked: {'yes' if complete else 'NO'}")


if __name__ == "__main__":
    main()
