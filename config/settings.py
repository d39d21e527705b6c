"""Settings, all from the environment (see the README's settings table)."""

from __future__ import annotations

import os
import re
import secrets
from datetime import timedelta
from pathlib import Path

from config.env import (
    database_from_url,
    env_bool,
    env_call_sizes,
    env_choice,
    env_float,
    env_host_id,
    env_int,
    env_list,
    env_path,
    env_str,
    parse_simulated_spec,
    redis_url_with_defaults,
)
from config.storage import SAMPLES_ALIAS, samples_storage_settings
from gpuscheduler.backends import BACKENDS  # plain constants: no torch, no NVML
from gpuscheduler.policies import STEAL_RULES  # pure: no Django, no torch

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = env_path("DATA_DIR", Path("var"), base=BASE_DIR)
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """Use DJANGO_SECRET_KEY, or a random key kept in DATA_DIR so sessions survive restarts."""
    key = env_str("DJANGO_SECRET_KEY", "")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


try:
    SECRET_KEY = _secret_key()
except FileExistsError:  # another process created it between exists() and open()
    SECRET_KEY = (DATA_DIR / "secret_key").read_text().strip()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "django_rq",
    "gpuscheduler",
    "personas",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        base=BASE_DIR,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-axes' backend first: it refuses a locked-out login before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# Sample images are served by a permission-checked admin view, never as public media. They live in
# the "samples" storage (config/storage.py): the folder MEDIA_DIR, which machines may share, or S3.
MEDIA_ROOT = env_path("MEDIA_DIR", DATA_DIR / "media", base=BASE_DIR)
MEDIA_URL = "/media/"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    SAMPLES_ALIAS: samples_storage_settings(media_dir=MEDIA_ROOT),
}


def _serve_prefix() -> str:
    """SAMPLES_SERVE_PREFIX: the front server's internal location of MEDIA_DIR, e.g. /protected-samples/."""
    prefix = env_str("SAMPLES_SERVE_PREFIX", "/protected-samples/")
    # It starts every X-Accel-Redirect header: plain URL path segments only, no '..'.
    if not re.fullmatch(r"/([A-Za-z0-9._~-]+/)+", prefix) or "/../" in prefix or "/./" in prefix:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            f"SAMPLES_SERVE_PREFIX={prefix!r} is not a location: it must start and end with '/' and hold only "
            "letters, digits, '.', '_', '~', '-' and '/' (e.g. /protected-samples/, nginx's `internal` location)."
        )
    return prefix


# How the image view hands a sample file over once it has checked the permission: `django` streams it;
# `x-accel-redirect` (nginx) and `x-sendfile` (Apache, lighttpd) answer with an empty body and a header,
# and the front server sends the file from MEDIA_DIR. Only for a folder storage: S3 redirects to a
# signed URL (check samples.W004).
SAMPLES_SERVE = env_choice("SAMPLES_SERVE", "django", ("django", "x-accel-redirect", "x-sendfile"))
SAMPLES_SERVE_PREFIX = _serve_prefix()

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# Served over HTTPS: send the session and CSRF cookies over HTTPS only.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
# Behind a TLS-terminating proxy: believe its X-Forwarded-Proto. Only safe when the proxy sets
# (or strips) that header on every request; otherwise any client could claim HTTPS.
BEHIND_PROXY = env_bool("DJANGO_BEHIND_PROXY", False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Login throttling (django-axes): after LOGIN_FAILURE_LIMIT wrong passwords for one username from
# one address, that username is refused from that address for LOGIN_COOLOFF_MINUTES. Counting per
# username and address together means an attacker elsewhere cannot lock the real admin out, and
# rotating usernames or user agents from one address does not reset anyone's count.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1, maximum=1000)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15, minimum=1, maximum=7 * 24 * 60))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# The lock runs from the last counted failure: tries while locked out neither count nor extend it,
# so the page can say when it ends. A successful login clears that username's count at that address.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "config.login.client_ip"  # X-Forwarded-For only with DJANGO_BEHIND_PROXY=1
AXES_LOCKOUT_CALLABLE = "config.login.lockout_response"
AXES_HTTP_RESPONSE_CODE = 429
# Log lines name the username and address (never the password), and no banner starts every command.
AXES_SENSITIVE_PARAMETERS: list[str] = []
AXES_VERBOSE = False

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
RQ_QUEUES = {"default": {"URL": redis_url_with_defaults(REDIS_URL)}}  # timeouts: config/env.py
RQ = {"COMMIT_MODE": "on_db_commit"}
RQ_SHOW_ADMIN_LINK = True


def _metrics_token() -> str:
    """METRICS_TOKEN: empty for none (then only staff with the GPU status permission read /metrics)."""
    token = env_str("METRICS_TOKEN", "")
    # It travels in an Authorization header and guards every device's and request's figures.
    if token and not (len(token) >= 16 and all("!" <= c <= "~" for c in token)):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            "METRICS_TOKEN must be at least 16 characters of visible ASCII, without spaces (make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or empty for none."
        )
    return token


# The bearer token Prometheus sends to /metrics.
METRICS_TOKEN = _metrics_token()

_GPU_BACKEND = env_choice("GPU_BACKEND", "auto", BACKENDS)
_GPU_SIMULATED = env_str("GPU_SIMULATED", "sim*2")
if _GPU_BACKEND == "simulated":
    parse_simulated_spec(_GPU_SIMULATED)  # fail at start on a bad spec, not in a worker later

GPUSCHEDULER = {
    "BACKEND": _GPU_BACKEND,
    "SIMULATED": _GPU_SIMULATED,
    "POLICY": env_str("GPU_POLICY", "balanced").lower(),
    "STEAL": env_choice("GPU_STEAL", "speed", STEAL_RULES),
    # Model affinity: placement and stealing count loading a model where it is not warm (off only
    # to measure what it brings: bench/bench_affinity.py).
    "MODEL_AFFINITY": env_bool("GPU_MODEL_AFFINITY", True),
    # Pipelines each worker keeps loaded on its device, the least recently used evicted first (on
    # CUDA a load that does not fit in the free memory evicts sooner): personas/pipelines.py.
    "MODEL_CACHE": env_int("GPU_MODEL_CACHE", 2, minimum=1, maximum=64),
    # This machine's stable id: keys its CPU and simulated devices, its media store and its Host
    # row. Made once into DATA_DIR unless set (config.env.env_host_id says why not the host name).
    "HOST": env_host_id("GPU_HOST", data_dir=DATA_DIR),
    "MAX_TEMPERATURE": env_float("GPU_MAX_TEMPERATURE", 85.0, minimum=30, maximum=120),
    "MIN_FREE_MEMORY_MB": env_int("GPU_MIN_FREE_MEMORY_MB", 1024, minimum=0, maximum=1_000_000),
    "MONITOR_INTERVAL": env_float("GPU_MONITOR_INTERVAL", 2.0, minimum=0.1, maximum=3600),
    "HEARTBEAT_INTERVAL": env_float("GPU_HEARTBEAT_INTERVAL", 2.0, minimum=0.1, maximum=60),
    "LEASE_SECONDS": env_float("GPU_LEASE_SECONDS", 10.0, minimum=1, maximum=3600),
    # How old a press's read of the devices may be: each process reuses its last one this long
    # (gpuscheduler/placement_reads.py recent_device_reads says why that is safe); 0 reads them
    # on every press.
    "PLACEMENT_READ_SECONDS": env_float("GPU_PLACEMENT_READ_SECONDS", 0.5, minimum=0, maximum=10),
    "WATCHDOG_GRACE": env_float("GPU_WATCHDOG_GRACE", 30.0, minimum=1, maximum=3600),
    "SNAPSHOT_RAW_HOURS": env_float("GPU_SNAPSHOT_RAW_HOURS", 2.0, minimum=0.1, maximum=24 * 90),
    "SNAPSHOT_BUCKET_SECONDS": env_int("GPU_SNAPSHOT_BUCKET_SECONDS", 60, minimum=5, maximum=86400),
    "SNAPSHOT_RETENTION_DAYS": env_float("GPU_SNAPSHOT_RETENTION_DAYS", 7.0, minimum=0.01, maximum=3650),
    # Devices nothing was heard of for this long are retired: hidden, kept for history.
    "RETIRE_AFTER_HOURS": env_float("GPU_RETIRE_AFTER_HOURS", 24.0, minimum=1, maximum=24 * 3650),
    # Free space the media folder needs; below it (or when it cannot be written) no work starts.
    "STORAGE_MIN_FREE_MB": env_int("STORAGE_MIN_FREE_MB", 512, minimum=0, maximum=100_000_000),
}

SAMPLES = {
    "MODEL": env_str("SAMPLES_MODEL", "tiny"),
    "MAX_PER_REQUEST": env_int("SAMPLES_MAX_PER_REQUEST", 16, minimum=1, maximum=1024),
    "MAX_BATCH": env_int("SAMPLES_MAX_BATCH", 16, minimum=1, maximum=1024),
    # Call sizes a worker times at start, for each device whose cost curve rests on fewer than two
    # sizes (the curve is then learned from every call: gpuscheduler/curves.py). Empty: none.
    "CALIBRATION": env_call_sizes("SAMPLES_CALIBRATION", [1, 4, 8, 16]),
    # Cross-request batching: a worker fills its pipeline call with other queued chunks of the same
    # model and steps, up to its device's best call size (off only to measure what it brings).
    "BATCHING": env_bool("SAMPLES_BATCHING", True),
    # torch.compile of the UNet, calls padded to these sizes (each warmed at worker start): GPUs only.
    "COMPILE": env_bool("SAMPLES_COMPILE", False),
    "COMPILE_BUCKETS": env_call_sizes("SAMPLES_COMPILE_BUCKETS", [1, 2, 4, 8, 16]) or [1, 2, 4, 8, 16],
    # How long a worker may wait for more queued work to fill a pipeline call (Triton's
    # max_queue_delay); 0 batches only work already queued.
    "BATCH_WAIT_MS": env_int("SAMPLES_BATCH_WAIT_MS", 0, minimum=0, maximum=60_000),
    "STEPS": env_int("SAMPLES_STEPS", 25, minimum=1, maximum=500),
    "GUIDANCE": env_float("SAMPLES_GUIDANCE", 7.5, minimum=0, maximum=50),
    "JOB_TIMEOUT": env_int("SAMPLES_JOB_TIMEOUT", 600, minimum=5, maximum=86400),
    "MAX_ATTEMPTS": env_int("SAMPLES_MAX_ATTEMPTS", 3, minimum=1, maximum=20),
    # The thumbnail stored beside each image (personas/thumbnails.py): its longest side, and format.
    "THUMBNAIL_SIZE": env_int("SAMPLES_THUMBNAIL_SIZE", 256, minimum=32, maximum=1024),
    "THUMBNAIL_FORMAT": env_choice("SAMPLES_THUMBNAIL_FORMAT", "webp", ("webp", "jpeg")),
}

# LOG_FORMAT=json: one JSON object per line (time, level, logger, message, exception) for log shippers.
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "config.logging_format.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {
        "handlers": ["console"],
        "level": env_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
    },
    "loggers": {
        "rq.worker": {"level": "WARNING"},
        "django.server": {"level": "WARNING"},
    },
}
