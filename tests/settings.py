"""Settings for the test suite: the project's settings with test defaults in the environment.

Worker processes started by the end-to-end tests load this module too, so they see the same
DATA_DIR, Redis database and simulated devices as the test process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "DATA_DIR" not in os.environ:
    # A folder of this test run's own (the SQLite test database lives in it), so two test runs
    # on one machine never share or delete each other's database. Worker processes that the
    # tests start are given DATA_DIR and DATABASE_URL explicitly.
    _run_dir = tempfile.mkdtemp(prefix="persona-samples-test-")
    os.environ["DATA_DIR"] = _run_dir
    atexit.register(shutil.rmtree, _run_dir, ignore_errors=True)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("GPU_BACKEND", "simulated")
os.environ.setdefault("GPU_SIMULATED", "sim*2")
os.environ.setdefault("GPU_HOST", "testhost")
os.environ.setdefault("SAMPLES_STEPS", "2")
os.environ.setdefault("LOG_LEVEL", "warning")
# The media store's free-space floor: low, so a nearly full CI disk does not pause every worker.
os.environ.setdefault("STORAGE_MIN_FREE_MB", "1")
# Every press reads the devices anew: tests change a device and place at once, where a deployment's
# presses may reuse a read up to half a second old (tests/gpuscheduler/test_recent_reads.py tests that).
os.environ.setdefault("GPU_PLACEMENT_READ_SECONDS", "0")

from config.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
