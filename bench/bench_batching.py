"""Cross-request batching on one simulated H100: a burst of small requests from different personas.

    .venv/bin/python bench/bench_batching.py              # make bench-batching

One `simulated-h100:SECONDS` device (a call of 1 image takes SECONDS, larger calls follow the
H100's measured curve: 4 images 1.02x, 8 images 1.20x, 16 images 2.32x, with 3 % noise), its
worker calibrated at start as in production (SAMPLES_CALIBRATION 1,4,8,16). A burst of 24
requests of 4 images, from 24 personas, submitted at once; images/s from the first submit to the
last image, with cross-request batching (the default) and without (SAMPLES_BATCHING=0), in the
same run, and with SAMPLES_BATCH_WAIT_MS=50 while the requests arrive 20 ms apart.

Target (issue 9): with batching at least 1.6x the images/s without.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from harness import Installation, table, wait_for


def burst(requests: int, size: int, gap: float, tag: str) -> dict[str, object]:
    from gpuscheduler.models import Assignment, PipelineCall
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    personas = Persona.objects.bulk_create(
        Persona(name=f"Bench {tag} {i}", slug=f"bench-{tag}-{i}", appearance_prompt=f"portrait {tag} {i}")
        for i in range(requests)
    )
    first_call = PipelineCall.objects.order_by("-id").values_list("id", flat=True).first() or 0
    started = time.monotonic()
    ids = []
    for persona in personas:
        ids.append(sample_request_submit(persona=persona, count=size).request.pk)
        if gap:
            time.sleep(gap)
    wait_for(
        lambda: not SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists(),
        900,
        f"{tag} to finish",
        interval=0.02,
    )
    seconds = time.monotonic() - started
    made = SampleImage.objects.filter(request__in=ids).count()
    calls = Counter(PipelineCall.objects.filter(id__gt=first_call, calibration=False).values_list("images", flat=True))
    shared = Assignment.objects.filter(request__in=ids).exclude(pipeline_call=None).values("pipeline_call").distinct()
    return {"rate": made / seconds, "made": made, "asked": requests * size, "calls": calls, "shared": shared.count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds of a 1-image call")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.seconds <= 0 or min(args.requests, args.size, args.repeats) < 1:
        parser.error("--seconds must be above 0; --requests, --size and --repeats at least 1")
    inst = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED="H100",
        SAMPLES_MODEL=f"simulated-h100:{args.seconds}",
        OMP_NUM_THREADS="1",
    )
    inst.setup()
    from gpuscheduler.models import CostCurve, Device
    from gpuscheduler.status import cost_texts

    scenarios = [
        ("without batching (SAMPLES_BATCHING=0)", {"SAMPLES_BATCHING": "0"}, 0.0),
        ("with batching (default)", {}, 0.0),
        ("with batching, SAMPLES_BATCH_WAIT_MS=50, requests 20 ms apart", {"SAMPLES_BATCH_WAIT_MS": "50"}, 0.02),
        ("without batching, requests 20 ms apart", {"SAMPLES_BATCHING": "0"}, 0.02),
    ]
    results: dict[str, list[dict[str, object]]] = {label: [] for label, _, _ in scenarios}
    curve = ""
    try:
        inst.start("gpumonitor")
        for number, (label, env, gap) in enumerate(scenarios):
            worker = inst.start("gpuworkers", env=env)
            wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 1, 300, "the worker")
            for r in range(args.repeats):
                result = burst(args.requests, args.size, gap, f"s{number}-{r}")
                results[label].append(result)
                print(f"  {label}: {result['rate']:.2f} images/s, calls {dict(result['calls'])}", flush=True)
            inst.stop_process(worker)
            wait_for(lambda: not Device.objects.filter(worker_state="idle").exists(), 60, "the worker to stop")
        device = Device.objects.get()
        curve = cost_texts([device.pk])[device.pk]["text"]
        assert CostCurve.objects.filter(device=device).exists()
    finally:
        inst.close()
    base = statistics.median(float(r["rate"]) for r in results[scenarios[0][0]])  # type: ignore[arg-type]
    rows = []
    for label, _, _ in scenarios:
        runs = results[label]
        rate = statistics.median(float(r["rate"]) for r in runs)  # type: ignore[arg-type]
        calls = runs[len(runs) // 2]["calls"]
        rows.append(
            [
                label,
                f"{rate:.2f}",
                f"{rate / base:.2f}",
                ", ".join(f"{n} x {size}" for size, n in sorted(calls.items())),  # type: ignore[attr-defined]
                "yes" if all(r["made"] == r["asked"] for r in runs) else "NO",
            ]
        )
    print(
        f"\n{args.requests} requests of {args.size} from {args.requests} personas on one simulated H100 "
        f"(a 1-image call {args.seconds} s); medians of {args.repeats} bursts. Learned curve: {curve}"
    )
    print(table(["scenario", "images/s", "x without", "calls (a run near the median)", "every image made"], rows))


if __name__ == "__main__":
    main()
