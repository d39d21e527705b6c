#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU (for this project's lent machine,
# prepare it first with the shared device notes: fetch the wheels the machine lacks, including
# pytest, pytest-django and pytest-timeout, and source their on-device script):
#   1. bench_throughput.py --gpu: a real gpuworker with an SD-1.5-shaped random-weight pipeline
#      through Redis, 32 images in requests of 8, against the bare diffusers loop on the same
#      device in the same run; prints images/s for both, the ratio (target >= 0.9) and whether
#      the web process held a CUDA context;
#   2. the same with SAMPLES_COMPILE=1: the worker's UNet compiled with torch.compile, calls padded
#      to the SAMPLES_COMPILE_BUCKETS sizes and each bucket compiled at worker start (minutes),
#      against the same uncompiled bare loop (on the H100 compiled calls of 16 reached 7.7 img/s
#      against 5.6);
#   3. the `gpu` tests: a real out-of-memory error (set_per_process_memory_fraction) handled and
#      memory back to its baseline, and 100 real jobs with flat torch.cuda.memory_reserved().
# Results go to $OUT (or ./gpu-check-out).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
python3 bench/bench_throughput.py --gpu --out "$out" 2>&1 | tee "$out/throughput.txt" | tail -12
SAMPLES_COMPILE=1 python3 bench/bench_throughput.py --gpu --out "$out" 2>&1 | tee "$out/throughput-compiled.txt" | tail -12
DJANGO_SETTINGS_MODULE=tests.settings GPU_BACKEND=nvml python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
  2>&1 | tee "$out/gpu-tests.txt" | tail -5
