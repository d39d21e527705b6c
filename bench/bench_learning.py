"""Learned cost curves: does the scheduler find each device's speed by itself, and does it scale?

    .venv/bin/python bench/bench_learning.py              # make bench-learning

Real `gpumonitor` and `gpuworkers` processes on simulated devices, `simulated:SECONDS` model (an
image takes SECONDS / speed; the scheduler is never told the speeds: it learns them from the
workers' timed calls, starting from their calibration at worker start).

1. Mixed speeds 1, 1, 0.5, 0.25. How many timed calls each device needs before its learned
   curve is within 10 % of the truth; then, once warmed up (one burst made first), the makespan
   of 96 images as 24 requests of 4 and as 6 requests of 16 against the ideal (all images spread
   over the devices in proportion to their speeds, no call overhead), for the default policy and,
   in the same run, for round robin (the old patch's rule) as the baseline.
2. Scaling over 1, 2, 4 and 8 equal devices: the same burst, efficiency = T1 / (n * Tn).

Targets (issue 9): mixed makespan at most 1.10x the ideal once warmed up; efficiency at 8 at least 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from harness import Installation, table, wait_for

MIXED = "A,B,C:0.5,D:0.25"


def burst(sizes: list[int], tag: str) -> dict[str, Any]:
    """Submit every request at once; wait for all; makespan from the first submit to the last image."""
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    personas = Persona.objects.bulk_create(
        Persona(name=f"Bench {tag}-{i}", slug=f"bench-{tag}-{i}", appearance_prompt=f"portrait {tag} {i}")
        for i in range(len(sizes))
    )
    started = time.monotonic()
    ids = [sample_request_submit(persona=p, count=n).request.pk for p, n in zip(personas, sizes, strict=True)]
    wait_for(
        lambda: not SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists(),
        900,
        f"burst {tag} to finish",
        interval=0.05,
    )
    done = list(SampleRequest.objects.filter(pk__in=ids))
    last = max(r.finished_at for r in done if r.finished_at)
    first = min(r.created for r in done)
    if TIMELINE:
        print(f"  {tag}: {(last - first).total_seconds():.2f} s\n{timeline(ids, first)}", flush=True)
    return {
        "makespan": (last - first).total_seconds(),
        "wall": time.monotonic() - started,
        "made": SampleImage.objects.filter(request__in=ids).count(),
        "asked": sum(sizes),
    }


def timeline(request_ids: list[int], origin: datetime) -> str:
    """Each device's pipeline calls in one burst, in seconds from its first request: when the call's
    first attempt was claimed, the call itself, when its attempts were committed, and its images
    (chunks, of which stolen: planned on another device). Where a burst's tail comes from."""
    from gpuscheduler.models import Assignment

    attempts = Assignment.objects.filter(request__in=request_ids).select_related("pipeline_call", "device")
    calls: dict[int | None, list[Assignment]] = {}
    for attempt in attempts:
        calls.setdefault(attempt.pipeline_call_id, []).append(attempt)
    lines, rows = [], {}
    for members in calls.values():
        call, device = members[0].pipeline_call, members[0].device
        claimed = min(a.started_at for a in members if a.started_at)
        committed = max(a.finished_at for a in members if a.finished_at)
        stolen = sum(1 for a in members if a.planned_device_id != a.device_id)
        ended = (call.at - origin).total_seconds() if call else 0.0
        text = (
            f"{(claimed - origin).total_seconds():.2f} [{ended - (call.seconds if call else 0):.2f}-{ended:.2f}] "
            f"{(committed - origin).total_seconds():.2f}: {sum(a.image_count for a in members)}/{len(members)}"
            + (f"/{stolen} stolen" if stolen else "")
        )
        rows.setdefault(device.name if device else "?", []).append((claimed, text, committed))
    for name in sorted(rows):
        calls_of = sorted(rows[name], key=lambda row: row[0])
        end = (calls_of[-1][2] - origin).total_seconds()
        lines.append(f"    {name} (ends {end:.2f} s): " + "  ".join(text for _, text, _ in calls_of))
    return "\n".join(lines)


def calls_to_converge(device_id: int, truth_per_image: float) -> int | None:
    """The fewest of the device's first timed calls whose fit is within 10 % of the truth at 1, 4 and 8 images."""
    from gpuscheduler.curves import fit
    from gpuscheduler.models import PipelineCall

    calls = list(PipelineCall.objects.filter(device_id=device_id).order_by("id").values_list("images", "seconds"))
    for k in range(1, len(calls) + 1):
        curve = fit(list(reversed(calls[:k])))
        if curve and all(abs(curve.cost(n) - truth_per_image * n) <= 0.10 * truth_per_image * n for n in (1, 4, 8)):
            return k
    return None


def mixed(args: argparse.Namespace) -> None:
    from django.conf import settings

    from gpuscheduler.models import Device
    from gpuscheduler.simulated import describe

    speeds = [info.speed for info in describe(MIXED, settings.GPUSCHEDULER["HOST"])]
    convergence = {}
    from gpuscheduler.models import PipelineCall

    for device in Device.objects.order_by("index"):
        convergence[device.name] = calls_to_converge(device.pk, args.seconds / speeds[device.index])
        if convergence[device.name] is None:
            calls = PipelineCall.objects.filter(device=device).order_by("id").values_list("images", "seconds")
            print(f"  {device.name} did not converge; its calls: {[(n, round(t, 3)) for n, t in calls]}")
    burst([4] * 24, "warm")  # warm-up: the curves keep learning from real calls
    rows = []
    for policy in ("balanced", "round_robin"):
        settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": policy}
        for sizes, label in (([4] * 24, "24 x 4"), ([16] * 6, "6 x 16")):
            runs = [burst(sizes, f"{policy}-{label}-{r}".replace(" ", "")) for r in range(args.repeats)]
            ideal = sum(sizes) * args.seconds / sum(speeds)
            makespan = statistics.median(r["makespan"] for r in runs)
            complete = all(r["made"] == r["asked"] for r in runs)
            rows.append([policy, label, f"{makespan:.2f}", f"{ideal:.2f}", f"{makespan / ideal:.2f}", complete])
            print(f"  {policy} {label}: {makespan:.2f} s (ideal {ideal:.2f} s)", flush=True)
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "POLICY": "balanced"}
    print(f"\nMixed speeds {MIXED} (learned, never told), {args.seconds} s per image at speed 1;")
    print("calls each device needed before its curve was within 10 % of the truth (calibration included):")
    print(
        table(
            ["device", "speed (truth)", "calls to within 10 %"],
            [[n, s, convergence[n]] for n, s in zip(sorted(convergence), speeds, strict=True)],
        )
    )
    print(f"\nmakespan once warmed up, medians of {args.repeats} bursts (target: balanced at most 1.10x ideal):")
    print(table(["policy", "requests", "makespan s", "ideal s", "x ideal", "all images made"], rows))


def scaling(args: argparse.Namespace) -> None:
    """One installation with 8 equal devices; for each n, workers on the first n only (placement
    takes only devices with a live worker)."""
    from django.conf import settings

    from gpuscheduler.models import Device
    from gpuscheduler.simulated import describe

    infos = describe("sim*8", settings.GPUSCHEDULER["HOST"])
    rows, base = [], None
    for n in (1, 2, 4, 8):
        workers = [INSTALLATION.start("gpuworker", "--device", info.uuid) for info in infos[:n]]
        try:
            wait_for(
                lambda n=n: Device.objects.filter(worker_state="idle").exclude(worker_name="").count() == n,
                120,
                f"{n} workers",
            )
            burst([4] * 8, f"scale-warm-{n}")
            runs = [burst([4] * args.scale_requests, f"scale-{n}-{r}") for r in range(args.repeats)]
        finally:
            INSTALLATION.stop_process(*workers)
        makespan = statistics.median(r["makespan"] for r in runs)
        base = base or makespan
        complete = all(r["made"] == r["asked"] for r in runs)
        rows.append([n, f"{makespan:.2f}", f"{base / makespan:.2f}", f"{base / (n * makespan):.2f}", complete])
        print(f"  {n} device(s): {makespan:.2f} s", flush=True)
    print(
        f"\nScaling: {args.scale_requests} requests of 4 at once, {args.seconds} s per image, medians of "
        f"{args.repeats} bursts (target: efficiency at 8 at least 0.9):"
    )
    print(table(["devices", "makespan s", "speed-up", "efficiency", "all images made"], rows))


INSTALLATION: Installation
TIMELINE = False


def main() -> None:
    global INSTALLATION, TIMELINE
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per image at speed 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-requests", type=int, default=32)
    parser.add_argument("--only", choices=("mixed", "scaling"))
    parser.add_argument("--keep", action="store_true", help="keep the installation's folder (database, logs)")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="print each burst's calls per device: claimed [call] committed: images/chunks/stolen, in seconds",
    )
    args = parser.parse_args()
    if args.seconds <= 0 or args.repeats < 1 or args.scale_requests < 1:
        parser.error("--seconds must be above 0, --repeats and --scale-requests at least 1")
    TIMELINE = args.timeline
    if args.only is None:
        # One installation per process (Django reads its settings once): each part in its own.
        for part in ("mixed", "scaling"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", part], check=True)
        return
    INSTALLATION = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED=MIXED if args.only == "mixed" else "sim*8",
        SAMPLES_MODEL=f"simulated:{args.seconds}",
        OMP_NUM_THREADS="1",
        GPU_MONITOR_INTERVAL="1",
    )
    INSTALLATION.setup()
    from gpuscheduler.models import Device

    try:
        if args.only == "mixed":
            INSTALLATION.start("gpumonitor")
            INSTALLATION.start("gpuworkers")
            wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 4, 120, "4 workers")
            mixed(args)
        else:
            scaling(args)
    finally:
        INSTALLATION.close(keep=args.keep)


if __name__ == "__main__":
    main()
