"""Per-job overhead: the whole system against a raw rq SimpleWorker on the same Redis, in the same run.

    .venv/bin/python bench/bench_overhead.py              # make bench-overhead
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/bench_overhead .venv/bin/python bench/bench_overhead.py

- raw rq: 300 no-op jobs enqueued one by one into one queue and drained by a plain
  `rq worker --worker-class rq.worker.SimpleWorker` that is already running: from the first enqueue
  to the last job finished.
- this system: 300 one-image requests (300 personas, `sample_request_submit`, as the button does)
  of the zero-second simulated model on one simulated device with its `gpuworker` already warm:
  from the first submit to the last image committed. Once with cross-request batching (the
  default) and once without (SAMPLES_BATCHING=0), each image still its own attempt.

Target (issue 9): at most 2x the raw rq time per job.

Besides the end-to-end figure, each run shows where the time goes: how long the 300 submits took
(this process, concurrent with the worker), and the worker process's CPU time per job (from
/proc/PID/stat: what the worker itself spends, whatever else the machine is doing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Installation, table, wait_for


def raw_rq(inst: Installation, jobs: int) -> float:
    """Seconds per job for rq alone: enqueue `jobs` no-op jobs, a running SimpleWorker drains them."""
    import redis
    from rq import Queue, Worker

    connection = redis.Redis.from_url(inst.env["REDIS_URL"])
    queue = Queue("bench-raw", connection=connection)
    process = inst.start_program(
        "rq", "worker", "--url", inst.env["REDIS_URL"], "--worker-class", "rq.worker.SimpleWorker", "bench-raw"
    )
    try:
        wait_for(lambda: Worker.all(queue=queue), 30, "the rq worker")
        started = time.monotonic()
        enqueued = [queue.enqueue("os.getpid") for _ in range(jobs)]
        last = enqueued[-1]
        wait_for(lambda: last.get_status(refresh=True) == "finished" and queue.count == 0, 300, "rq to drain", 0.005)
        seconds = time.monotonic() - started
        finished = sum(1 for job in enqueued if job.get_status(refresh=True) == "finished")
        assert finished == jobs, f"only {finished} of {jobs} raw jobs finished"
    finally:
        inst.stop_process(process)
    return seconds / jobs


@dataclass
class Run:
    per_job: float  # seconds per request, first submit to last image
    submit: float  # seconds per submit
    worker_cpu: float  # the worker process's CPU seconds per request
    images: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system(inst: Installation, requests: int, tag: str) -> Run:
    """One run of `requests` one-image requests through the whole system."""
    from gpuscheduler.models import Device
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleImage, SampleRequest
    from personas.services import sample_request_submit

    personas = Persona.objects.bulk_create(
        Persona(name=f"Bench {tag} {i}", slug=f"bench-{tag}-{i}", appearance_prompt=f"portrait {i}")
        for i in range(requests)
    )
    worker = Device.objects.get().worker_pid
    cpu = cpu_seconds(worker)
    started = time.monotonic()
    ids = [sample_request_submit(persona=persona, count=1).request.pk for persona in personas]
    submitted = time.monotonic() - started
    wait_for(
        lambda: not SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).exists(),
        600,
        f"{tag} to finish",
        interval=0.005,
    )
    seconds = time.monotonic() - started
    cpu = cpu_seconds(worker) - cpu
    print(f"  {tag}: submitted in {submitted:.2f} s, done in {seconds:.2f} s, worker CPU {cpu:.2f} s", flush=True)
    images = SampleImage.objects.filter(request__in=ids).count()
    return Run(seconds / requests, submitted / requests, cpu / requests, images)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.jobs < 1 or args.repeats < 1:
        parser.error("--jobs and --repeats must be at least 1")
    inst = Installation(GPU_BACKEND="simulated", GPU_SIMULATED="H100", SAMPLES_MODEL="simulated:0", OMP_NUM_THREADS="1")
    inst.setup()
    from gpuscheduler.models import Device

    raw_runs: list[float] = []
    runs: dict[str, list[Run]] = {"batching": [], "no batching": []}
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    try:
        inst.start("gpumonitor")
        for label, batching in (("batching", "1"), ("no batching", "0")):
            worker = inst.start("gpuworkers", env={"SAMPLES_BATCHING": batching})
            wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 1, 120, "the worker")
            system(inst, 20, f"warm-{label.replace(' ', '')}")
            for r in range(args.repeats):
                runs[label].append(system(inst, args.jobs, f"{label.replace(' ', '')}-{r}"))
            inst.stop_process(worker)
            wait_for(lambda: not Device.objects.filter(worker_state="idle").exists(), 60, "the worker to stop")
        for _ in range(args.repeats):
            raw_runs.append(raw_rq(inst, args.jobs))
    finally:
        inst.close()
    raw = statistics.median(raw_runs)
    rows = [["raw rq SimpleWorker, no-op jobs", f"{raw * 1000:.1f}", "1.00", "-", "-", "-"]]
    for label in ("batching", "no batching"):
        ours = statistics.median(run.per_job for run in runs[label])
        rows.append(
            [
                f"this system, {label}",
                f"{ours * 1000:.1f}",
                f"{ours / raw:.2f}",
                f"{statistics.median(run.submit for run in runs[label]) * 1000:.1f}",
                f"{statistics.median(run.worker_cpu for run in runs[label]) * 1000:.1f}",
                "yes" if all(run.images == args.jobs for run in runs[label]) else "NO",
            ]
        )
    print(f"\n{args.jobs} jobs (one-image requests), medians of {args.repeats} runs; target: at most 2.00x raw rq")
    headers = ["path", "ms per job", "x raw rq", "submit ms each", "worker CPU ms per job", "every image made"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
