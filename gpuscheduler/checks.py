"""System checks for the scheduler's and the samples' settings (run by every manage.py command)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register

from config.env import redis_url_with_defaults
from gpuscheduler.backends import BACKENDS
from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.policies import POLICIES, STEAL_RULES

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def _redis_url_problem(url: str) -> str | None:
    """What redis-py would refuse in REDIS_URL's options (at the first connection, in a worker)."""
    from redis.connection import parse_url

    try:
        parse_url(redis_url_with_defaults(url))
    except ValueError as error:
        return str(error)
    return None


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = []
    config = gpu_config()
    samples = samples_config()
    if config["POLICY"] not in POLICIES:
        problems.append(
            Error(
                f"GPU_POLICY={config['POLICY']!r} is not a known policy.",
                hint=f"Set GPU_POLICY to one of: {', '.join(sorted(POLICIES))}.",
                id="gpuscheduler.E001",
            )
        )
    if config["BACKEND"] not in BACKENDS:
        problems.append(
            Error(
                f"GPU_BACKEND={config['BACKEND']!r} is unknown.",
                hint=f"Use one of: {', '.join(BACKENDS)}.",
                id="gpuscheduler.E002",
            )
        )
    if samples["MAX_BATCH"] < 1 or samples["MAX_PER_REQUEST"] < 1:
        problems.append(
            Error("SAMPLES_MAX_BATCH and SAMPLES_MAX_PER_REQUEST must be at least 1.", id="gpuscheduler.E004")
        )
    if config["HEARTBEAT_INTERVAL"] * 3 > config["LEASE_SECONDS"]:
        problems.append(
            Error(
                f"GPU_LEASE_SECONDS={config['LEASE_SECONDS']} is less than three heartbeats "
                f"(GPU_HEARTBEAT_INTERVAL={config['HEARTBEAT_INTERVAL']}): live workers would be declared dead.",
                hint="Make GPU_LEASE_SECONDS at least 3 x GPU_HEARTBEAT_INTERVAL.",
                id="gpuscheduler.E005",
            )
        )
    read_seconds = config.get("PLACEMENT_READ_SECONDS")
    if isinstance(read_seconds, bool) or not isinstance(read_seconds, int | float) or not 0 <= read_seconds <= 10:
        problems.append(
            Error(
                f"GPU_PLACEMENT_READ_SECONDS={read_seconds!r} is not a number of seconds from 0 to 10.",
                hint="Set GPU_PLACEMENT_READ_SECONDS to 0.5 (the default), or 0 to read the devices on every press.",
                id="gpuscheduler.E008",
            )
        )
    if config["STEAL"] not in STEAL_RULES:
        problems.append(
            Error(
                f"GPU_STEAL={config['STEAL']!r} is not a stealing rule.",
                hint=f"Set GPU_STEAL to one of: {', '.join(STEAL_RULES)} (speed is the default).",
                id="gpuscheduler.E007",
            )
        )
    if os.environ.get("SAMPLES_GPU_SATURATION") is not None:
        problems.append(
            Warning(
                "SAMPLES_GPU_SATURATION is set but no longer read: each device's saturation (its best call size) "
                "is learned from its own timed calls.",
                hint="Remove SAMPLES_GPU_SATURATION; the GPU status page shows each device's learned cost curve.",
                id="gpuscheduler.W003",
            )
        )
    url = urlsplit(settings.REDIS_URL)
    if url.scheme not in ("redis", "rediss", "unix"):
        problems.append(
            Error(
                f"REDIS_URL={settings.REDIS_URL!r} has the scheme {url.scheme!r}.",
                hint="Use redis://HOST:6379/0, rediss:// for TLS, or unix:///path/to/redis.sock.",
                id="gpuscheduler.E006",
            )
        )
    elif (bad_option := _redis_url_problem(settings.REDIS_URL)) is not None:
        problems.append(
            Error(
                f"REDIS_URL's query string is not what redis-py reads: {bad_option}",
                hint="Give its options numbers (socket_timeout=10, socket_connect_timeout=3, health_check_interval=15) "
                "or leave them out for those defaults.",
                id="gpuscheduler.E009",
            )
        )
    elif url.scheme == "redis" and (url.hostname or "") not in LOCAL_HOSTS and not url.password:
        problems.append(
            Warning(
                "REDIS_URL points at another host without a password or TLS. Jobs are pickled: whoever can "
                "write to this Redis can run code on every worker.",
                hint="Use rediss:// with a password (requirepass / ACL) and keep Redis off public networks.",
                id="gpuscheduler.W001",
            )
        )
    return problems


@register()
def check_samples_serving(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """SAMPLES_SERVE's header modes need a folder the front server reads; object storage has none."""
    from config.storage import samples_storage, storage_local_path

    if settings.SAMPLES_SERVE == "django":
        return []
    try:
        folder = storage_local_path(samples_storage()) is not None
    except Exception:  # S3 without django-storages: samples.E001 says so
        folder = False
    if folder:
        return []
    return [
        Warning(
            f"SAMPLES_SERVE={settings.SAMPLES_SERVE} applies only to a folder storage (SAMPLES_STORAGE=filesystem): "
            "with object storage the image view redirects to a signed URL, or streams the image itself when "
            "S3_SIGNED_URL_SECONDS=0, and sends no header to the front server.",
            hint="Unset SAMPLES_SERVE (or set it to django) with SAMPLES_STORAGE=s3.",
            id="samples.W004",
        )
    ]


@register()
def check_thumbnail_format(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """SAMPLES_THUMBNAIL_FORMAT=webp needs a Pillow built with libwebp (the wheels are)."""
    from PIL import features

    from gpuscheduler.conf import samples_config

    if samples_config()["THUMBNAIL_FORMAT"] != "webp" or features.check("webp"):
        return []
    return [
        Warning(
            "SAMPLES_THUMBNAIL_FORMAT=webp, but this Pillow cannot write WebP: images get no thumbnail, and the "
            "gallery shows the full PNGs.",
            hint="Set SAMPLES_THUMBNAIL_FORMAT=jpeg, or install a Pillow built with libwebp (its wheels are).",
            id="samples.W005",
        )
    ]
