"""Worker vs bare diffusers loop: images/s through the whole system against the same pipeline
called directly on the same device, in the same run.

    .venv/bin/python bench/bench_throughput.py            # CPU: the tiny model on one simulated device
    python bench/bench_throughput.py --gpu                # GPU check (lent machine): SD-1.5-shaped
                                                          # random-weight pipeline, fp16, 512 px

Both paths make --images images in requests (calls) of --per-request. The worker path goes
through the real admin button (Django test client), Redis and a real `gpuworker` process; it is
timed from the first press to the last image committed, after one untimed warm-up request. The
bare path loads the same saved pipeline in this process, warms it up with one call, then times
the same calls. The web side (this process, until the bare loop) must not import torch: checked
and printed, with NVML's list of processes holding a CUDA context on the GPU.
Target: worker / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, Installation, table, wait_for


def bare_loop(model_dir: str, device: str, images: int, per_call: int, steps: int, guidance: float) -> dict[str, float]:
    """The same pipeline, loaded here and called directly: the ceiling the worker is measured against."""
    import torch

    from personas.imagegen import ModelSpec, load_pipeline

    spec = ModelSpec("local", model_dir) if model_dir != "tiny" else ModelSpec("tiny", "tiny")
    started = time.monotonic()
    pipe = load_pipeline(spec, device)
    load_seconds = time.monotonic() - started

    def call(first_seed: int) -> None:
        generators = [torch.Generator(device="cpu").manual_seed(first_seed + i) for i in range(per_call)]
        with torch.inference_mode():
            pipe(
                prompt="portrait of a person, studio light",
                negative_prompt="blurry",
                num_images_per_prompt=per_call,
                generator=generators,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pil",
            )
        if device == "cuda":
            torch.cuda.synchronize()

    call(10_000)  # warm-up, as the worker's untimed request
    started = time.monotonic()
    for n in range(images // per_call):
        call(n * per_call)
    seconds = time.monotonic() - started
    return {"seconds": seconds, "images_per_s": images / seconds, "load_seconds": load_seconds}


def cuda_holders() -> list[int]:
    """PIDs holding a CUDA context on any GPU (NVML), or [] where there is no NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    pids = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pids += [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
    return pids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="NVML backend, GPU 0, SD-1.5-shaped model, fp16, 512 px")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for a JSON result")
    parser.add_argument("--build-model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_model:
        sys.path.insert(0, str(ROOT))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
        import django

        django.setup()
        from personas.imagegen import build_sd15_shaped_pipeline

        build_sd15_shaped_pipeline().save_pretrained(Path(args.build_model))
        return

    env = {"SAMPLES_STEPS": str(args.steps), "SAMPLES_MAX_BATCH": str(args.per_request)}
    if args.gpu:
        env.update(GPU_BACKEND="nvml")
    else:
        env.update(GPU_BACKEND="simulated", GPU_SIMULATED="cpu0*1", SAMPLES_MODEL="tiny")
    inst = Installation(**env)
    if args.gpu:
        model_dir = inst.dir / "sd15-random"
        started = time.monotonic()
        subprocess.run(
            [sys.executable, __file__, "--build-model", str(model_dir)], check=True, env={**os.environ, **inst.env}
        )
        print(f"built the SD-1.5-shaped random-weight pipeline in {time.monotonic() - started:.1f} s")
        inst.env["SAMPLES_MODEL"] = str(model_dir)
    inst.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    from gpuscheduler.backends import get_backend
    from gpuscheduler.models import Assignment, AssignmentState, Device
    from personas.models import Persona, SampleImage

    settings.ALLOWED_HOSTS = ["testserver"]
    try:
        info = get_backend().devices()[0]
        worker = inst.start("gpuworker", "--device", info.uuid)
        wait_for(lambda: Device.objects.filter(uuid=info.uuid, worker_state="idle").exists(), 600, "the worker to load")
        admin = User.objects.create_superuser("bench", password="bench-password-1")
        client = Client()
        client.force_login(admin)
        count = args.images // args.per_request

        def press_all(prefix: str, n: int) -> float:
            personas = [
                Persona.objects.create(
                    name=f"{prefix} {i}", slug=f"{prefix}-{i}", appearance_prompt="portrait, studio light"
                )
                for i in range(n)
            ]
            started = time.monotonic()
            for persona in personas:
                response = client.post(
                    reverse("admin:personas_persona_generate", args=[persona.pk]), {"count": str(args.per_request)}
                )
                assert response.status_code == 302
            wait_for(
                lambda: SampleImage.objects.filter(persona__in=personas).count() == n * args.per_request,
                3600,
                f"{prefix} images",
                interval=0.02,
            )
            return time.monotonic() - started

        press_all("warmup", 1)
        worker_seconds = press_all("timed", count)
        timed = Assignment.objects.filter(request__persona__slug__startswith="timed-", state=AssignmentState.SUCCEEDED)
        span = max(a.finished_at for a in timed) - min(a.started_at for a in timed)
        calls = sorted({a.calls for a in timed})
        web_torch = "torch" in sys.modules
        holders = cuda_holders()
        web_holds_cuda = os.getpid() in holders
        worker_holds_cuda = worker.pid in holders
    finally:
        inst.stop_processes()  # the worker leaves the device to the bare loop
    device = "cuda" if args.gpu else "cpu"
    try:
        bare = bare_loop(
            inst.env["SAMPLES_MODEL"],
            device,
            args.images,
            args.per_request,
            args.steps,
            float(settings.SAMPLES["GUIDANCE"]),
        )
    finally:
        inst.close()
    worker_rate = args.images / worker_seconds
    rows = [
        ["gpuworker via admin button + Redis", f"{worker_seconds:.2f}", f"{worker_rate:.2f}"],
        [
            "  (first job start to last job end)",
            f"{span.total_seconds():.2f}",
            f"{args.images / span.total_seconds():.2f}",
        ],
        ["bare diffusers loop, same device", f"{bare['seconds']:.2f}", f"{bare['images_per_s']:.2f}"],
    ]
    print()
    print(
        f"{args.images} images in calls of {args.per_request}, {args.steps} steps, {device}, "
        f"model {inst.env['SAMPLES_MODEL']}"
    )
    print(table(["path", "seconds", "images/s"], rows))
    ratio = worker_rate / bare["images_per_s"]
    print(f"\nworker / bare = {ratio:.3f} (target >= 0.9): {'PASS' if ratio >= 0.9 else 'FAIL'}")
    print(f"pipeline calls per job: {calls}; web process imported torch: {web_torch}; ")
    print(
        f"CUDA context holders: {holders} "
        f"(web pid {os.getpid()} holds one: {web_holds_cuda}; worker: {worker_holds_cuda})"
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = {
            "device": device,
            "images": args.images,
            "per_request": args.per_request,
            "steps": args.steps,
            "worker_seconds": worker_seconds,
            "worker_span_seconds": span.total_seconds(),
            "bare": bare,
            "ratio": ratio,
            "web_imported_torch": web_torch,
            "web_holds_cuda": web_holds_cuda,
        }
        (Path(args.out) / "throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
