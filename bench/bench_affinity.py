"""Model affinity: requests of two models on two devices that hold one pipeline each.

    .venv/bin/python bench/bench_affinity.py              # make bench-affinity

Real `gpumonitor` and `gpuworkers` processes on two equal simulated devices, each worker keeping
one pipeline (GPU_MODEL_CACHE=1), every model load taking --load seconds (the simulated devices'
`load_seconds` fault; a real model took 12-18 s on the H100). Two image models, `alpha` and
`beta` (`simulated:SECONDS`, one image SECONDS on either device; they differ in dtype, so each
needs its own pipeline). A stream of --requests requests from as many personas, each persona
on one model (a fixed random sequence, seed 7) and of 2, 4 or 8 images, submitted --gap seconds
apart. For each run: model loads (after the workers' warm-up), makespan (first submit to last
image), request latency p50 and p90, with model affinity (the default) and without
(GPU_MODEL_AFFINITY=false), alternating, medians of --repeats runs, ratios measured in the same
run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from harness import Installation, table, wait_for

SEED = 7


def workload(requests: int) -> list[tuple[str, int]]:
    rng = random.Random(SEED)
    return [(rng.choice(("alpha", "beta")), rng.choice((2, 4, 8))) for _ in range(requests)]


def run(plan: list[tuple[str, int]], gap: float, tag: str) -> dict[str, Any]:
    from django.db.models import Sum

    from gpuscheduler.models import DeviceModel
    from personas.models import ACTIVE_REQUEST_STATES, ImageModel, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    models = {m.name: m for m in ImageModel.objects.filter(name__in=("alpha", "beta"))}
    personas = Persona.objects.bulk_create(
        Persona(
            name=f"Bench {tag} {i}",
            slug=f"bench-{tag}-{i}",
            appearance_prompt=f"portrait {i}",
            image_model=models[name],
        )
        for i, (name, _) in enumerate(plan)
    )
    loads_before = DeviceModel.objects.aggregate(n=Sum("loads"))["n"] or 0
    ids = []
    for persona, (_, size) in zip(personas, plan, strict=True):
        ids.append(sample_request_submit(persona=persona, count=size).request.pk)
        time.sleep(gap)
    wait_for(
        lambda: not SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists(),
        1800,
        f"{tag} to finish",
        interval=0.05,
    )
    done = list(SampleRequest.objects.filter(pk__in=ids))
    latencies = sorted((r.finished_at - r.created).total_seconds() for r in done if r.finished_at)
    return {
        "makespan": (max(r.finished_at for r in done if r.finished_at) - min(r.created for r in done)).total_seconds(),
        "loads": (DeviceModel.objects.aggregate(n=Sum("loads"))["n"] or 0) - loads_before,
        "p50": statistics.median(latencies),
        "p90": latencies[min(len(latencies) - 1, round(0.9 * (len(latencies) - 1)))],
        "made": SampleImage.objects.filter(request__in=ids).count(),
        "asked": sum(size for _, size in plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.1, help="seconds per image on either device")
    parser.add_argument("--load", type=float, default=2.0, help="seconds per model load")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between submissions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="Keep the installation's folder (database, logs).")
    args = parser.parse_args()
    if args.seconds <= 0 or args.load < 0 or args.gap < 0 or min(args.requests, args.repeats) < 1:
        parser.error("--seconds must be above 0, --load and --gap at least 0, --requests and --repeats at least 1")
    inst = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED="A,B",
        GPU_MODEL_CACHE="1",
        SAMPLES_MODEL=f"simulated:{args.seconds}",
        SAMPLES_STEPS="1",
        SAMPLES_CALIBRATION="1",
        OMP_NUM_THREADS="1",
    )
    inst.setup()
    from django.conf import settings

    from gpuscheduler import simulated
    from gpuscheduler.models import Device
    from personas.image_models import default_model

    alpha = default_model()
    alpha.name, alpha.dtype = "alpha", "float16"
    alpha.save()
    beta = type(alpha).objects.create(name="beta", source=alpha.source, dtype="float32", steps=1, guidance_scale=7.5)
    assert beta.pk != alpha.pk

    plan = workload(args.requests)
    scenarios = [("with affinity (default)", True), ("without affinity (GPU_MODEL_AFFINITY=false)", False)]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in scenarios}
    try:
        inst.start("gpumonitor")
        wait_for(lambda: Device.objects.count() == 2, 120, "the monitor to register the devices")
        for device in Device.objects.all():  # every load, the workers' warm-up included
            simulated.set_faults(device.uuid, load_seconds=args.load)
        for repeat in range(args.repeats):
            order = scenarios if repeat % 2 == 0 else scenarios[::-1]
            for label, affinity in order:
                settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_AFFINITY": affinity}
                workers = inst.start("gpuworkers", env={"GPU_MODEL_AFFINITY": "true" if affinity else "false"})
                wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 2, 300, "the workers")
                tag = f"r{repeat}-{'on' if affinity else 'off'}"
                result = run(plan, args.gap, tag)
                results[label].append(result)
                print(
                    f"  {label}: makespan {result['makespan']:.1f} s, {result['loads']} loads, "
                    f"p50 {result['p50']:.1f} s, p90 {result['p90']:.1f} s",
                    flush=True,
                )
                inst.stop_process(workers)
                wait_for(lambda: not Device.objects.filter(worker_state="idle").exists(), 60, "the workers to stop")
    finally:
        inst.close(keep=args.keep)

    def median(label: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[label])

    on, off = (label for label, _ in scenarios)
    rows = [
        [
            label,
            f"{median(label, 'loads'):.0f}",
            f"{median(label, 'makespan'):.1f}",
            f"{median(label, 'p50'):.1f}",
            f"{median(label, 'p90'):.1f}",
            "yes" if all(r["made"] == r["asked"] for r in results[label]) else "NO",
        ]
        for label, _ in scenarios
    ]
    rows.append(
        [
            "ratio without / with",
            f"{median(off, 'loads') / max(1.0, median(on, 'loads')):.1f}x",
            f"{median(off, 'makespan') / median(on, 'makespan'):.2f}x",
            f"{median(off, 'p50') / median(on, 'p50'):.2f}x",
            f"{median(off, 'p90') / median(on, 'p90'):.2f}x",
            "",
        ]
    )
    images = sum(size for _, size in plan)
    print(
        f"\n{args.requests} requests ({images} images) of two models on two devices of one pipeline each, "
        f"{args.gap} s apart; {args.seconds} s per image, {args.load} s per model load; medians of {args.repeats}"
    )
    print(table(["scenario", "model loads", "makespan s", "p50 s", "p90 s", "every image made"], rows))


if __name__ == "__main__":
    main()
