"""Settings for the test suite: the project's settings with test defaults in the environment.

Worker processes started by the end-to-end tests load this module too, so they see the same
DATA_DIR, Redis database and simulated devices as the test process.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DATA_DIR", str(_ROOT / "var" / "test"))
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("GPU_BACKEND", "simulated")
os.environ.setdefault("GPU_SIMULATED", "sim*2")
os.environ.setdefault("GPU_HOST", "testhost")
os.environ.setdefault("SAMPLES_STEPS", "2")
os.environ.setdefault("LOG_LEVEL", "warning")

from config.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
