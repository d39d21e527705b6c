"""Soak: one worker runs 500 jobs; its resident memory must grow < 1 MB per 100 jobs after warm-up.

    .venv/bin/python bench/bench_soak.py [--jobs 500] [--model tiny] [--warmup 100]

One simulated device, one real `gpuworker` process, real Redis, the tiny diffusers pipeline
(2 steps, 1 image per job) unless --model says otherwise. RSS is read from /proc every 50 jobs.
"""

from __future__ import annotations

import argparse
import time

from harness import Installation, rss_bytes, table, wait_for

MB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    inst = Installation(
        GPU_BACKEND="simulated", GPU_SIMULATED="sim*1", SAMPLES_MODEL=args.model, SAMPLES_STEPS="2", OMP_NUM_THREADS="1"
    )
    inst.setup()
    from django.conf import settings

    from gpuscheduler.models import Assignment, AssignmentState, Device
    from gpuscheduler.simulated import describe
    from personas.models import Persona
    from personas.services import sample_request_submit

    try:
        uuid = describe("sim*1", settings.GPUSCHEDULER["HOST"])[0].uuid
        worker = inst.start("gpuworker", "--device", uuid)
        wait_for(lambda: Device.objects.filter(uuid=uuid, worker_state="idle").exists(), 120, "the worker")
        personas = Persona.objects.bulk_create(
            Persona(name=f"Soak {i}", slug=f"soak-{i}", appearance_prompt=f"portrait {i}") for i in range(args.jobs)
        )
        started = time.monotonic()
        for persona in personas:
            sample_request_submit(persona=persona, count=1)
        checkpoints = list(range(0, args.jobs + 1, 50))
        samples: list[tuple[int, int, float]] = []
        for mark in checkpoints:
            wait_for(
                lambda m=mark: Assignment.objects.filter(state=AssignmentState.SUCCEEDED).count() >= m,
                600,
                f"{mark} jobs",
                interval=0.05,
            )
            samples.append((mark, rss_bytes(worker.pid), time.monotonic() - started))
        failed = Assignment.objects.exclude(state=AssignmentState.SUCCEEDED).count()
    finally:
        inst.close()
    rows = [[jobs, f"{rss / MB:.1f}", f"{(rss - samples[0][1]) / MB:+.1f}", f"{t:.1f}"] for jobs, rss, t in samples]
    print(table(["jobs done", "worker RSS MB", "vs start MB", "seconds"], rows))
    base = next(rss for jobs, rss, _ in samples if jobs >= args.warmup)
    end = samples[-1][1]
    per_100 = (end - base) / MB / ((args.jobs - args.warmup) / 100)
    total = samples[-1][2]
    print()
    print(
        f"model {args.model}: {args.jobs} jobs in {total:.1f} s ({args.jobs / total:.1f} jobs/s), "
        f"{failed} not succeeded"
    )
    verdict = "PASS" if per_100 < 1.0 else "FAIL"
    print(f"growth after {args.warmup} warm-up jobs: {per_100:+.3f} MB per 100 jobs (target < 1 MB): {verdict}")


if __name__ == "__main__":
    main()
