from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from hypothesis import settings as hypothesis_settings

from config.storage import SAMPLES_ALIAS
from gpuscheduler.backends import DeviceInfo
from gpuscheduler.models import Device, DeviceKind, Health
from gpuscheduler.services import device_upsert
from personas.models import ImageModel, Persona
from tests.processes import Processes, base_env, wait_for

_counter = itertools.count(1)

# Hypothesis: the suite (and CI) replays the same examples every run, so a red build is reproducible
# and never depends on luck; `HYPOTHESIS_PROFILE=explore make test` searches far wider with fresh
# random examples each time (run it after touching validation; a failure it finds becomes an @example).
hypothesis_settings.register_profile("suite", max_examples=40, derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.register_profile("explore", max_examples=1000, deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# Environment variable -> (settings dict, key): children read the variable, the test process the dict.
SETTING_KEYS = {
    "GPU_SIMULATED": ("GPUSCHEDULER", "SIMULATED"),
    "GPU_POLICY": ("GPUSCHEDULER", "POLICY"),
    "GPU_STEAL": ("GPUSCHEDULER", "STEAL"),
    "GPU_MODEL_AFFINITY": ("GPUSCHEDULER", "MODEL_AFFINITY"),
    "GPU_LEASE_SECONDS": ("GPUSCHEDULER", "LEASE_SECONDS"),
    "GPU_HEARTBEAT_INTERVAL": ("GPUSCHEDULER", "HEARTBEAT_INTERVAL"),
    "GPU_WATCHDOG_GRACE": ("GPUSCHEDULER", "WATCHDOG_GRACE"),
    "GPU_MONITOR_INTERVAL": ("GPUSCHEDULER", "MONITOR_INTERVAL"),
    "GPU_MAX_TEMPERATURE": ("GPUSCHEDULER", "MAX_TEMPERATURE"),
    "SAMPLES_MODEL": ("SAMPLES", "MODEL"),
    "SAMPLES_JOB_TIMEOUT": ("SAMPLES", "JOB_TIMEOUT"),
    "SAMPLES_MAX_ATTEMPTS": ("SAMPLES", "MAX_ATTEMPTS"),
    "SAMPLES_STEPS": ("SAMPLES", "STEPS"),
    "SAMPLES_MAX_BATCH": ("SAMPLES", "MAX_BATCH"),
    "GPU_MODEL_CACHE": ("GPUSCHEDULER", "MODEL_CACHE"),
}


@pytest.fixture(autouse=True)
def data_dir(settings: Any, tmp_path: Path) -> Path:
    """Every test gets its own DATA_DIR and media folder, where its samples storage keeps the images
    (as worker processes started with DATA_DIR=path do)."""
    path = tmp_path / "data"
    path.mkdir()
    settings.DATA_DIR = path
    settings.MEDIA_ROOT = path / "media"
    settings.STORAGES = {
        **settings.STORAGES,
        SAMPLES_ALIAS: {
            "BACKEND": "config.storage.DurableFileSystemStorage",
            "OPTIONS": {"location": str(path / "media")},
        },
    }
    return path


class S3Bucket:
    """A bucket of this test's own on the S3 emulator, read and changed behind the storage's back."""

    def __init__(self, endpoint: str, name: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.name = name
        self.env = {
            "SAMPLES_STORAGE": "s3",
            "S3_BUCKET": name,
            "S3_ENDPOINT_URL": endpoint,
            "S3_REGION": "us-east-1",
            "S3_ACCESS_KEY_ID": "test",
            "S3_SECRET_ACCESS_KEY": "test",
        }
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return sorted(entry["Key"] for page in pages for entry in page.get("Contents", ()))

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def remove(self) -> None:
        """Delete the bucket itself (S3 wants it empty first)."""
        for key in self.keys():
            self.delete(key)
        self.client.delete_bucket(Bucket=self.name)


@pytest.fixture(scope="session")
def s3_emulator() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 (moto's server mode), for the whole test run."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_storage(s3_emulator: str, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """The samples storage switched to a new, empty bucket on the emulator: in this process through
    settings.STORAGES, and in the worker processes the test starts through the S3_* variables (set in
    this process's environment, which they inherit), read by the same code as in production."""
    from config.storage import samples_storage_settings

    bucket = S3Bucket(s3_emulator, f"samples-{next(_counter)}-{os.getpid()}-{int(time.time() * 1000) % 10**8}")
    bucket.client.create_bucket(Bucket=bucket.name)
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    settings.STORAGES = {
        **settings.STORAGES,
        SAMPLES_ALIAS: samples_storage_settings(media_dir=Path(settings.MEDIA_ROOT)),
    }
    try:
        yield bucket
    finally:
        with contextlib.suppress(Exception):
            bucket.remove()


@pytest.fixture
def redis_db() -> Iterator[redis_lib.Redis]:
    """The test Redis database, empty before and after the test."""
    connection = redis_lib.Redis.from_url(django_settings.REDIS_URL)
    try:
        connection.ping()
    except redis_lib.exceptions.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"Redis at {django_settings.REDIS_URL} does not answer ({exc}): start redis-server")
    connection.flushdb()
    yield connection
    connection.flushdb()


def configure(settings: Any, env: dict[str, str]) -> None:
    """Apply environment-style overrides to the test process's settings as well."""
    for name, value in env.items():
        if name in SETTING_KEYS:
            group, key = SETTING_KEYS[name]
            current = dict(getattr(settings, group))
            default = current.get(key)
            current[key] = (
                type(default)(value) if isinstance(default, int | float) and not isinstance(default, bool) else value
            )
            setattr(settings, group, current)


def default_model_from_settings() -> None:
    """Point the default model at SAMPLES_MODEL and SAMPLES_STEPS as the test process has them now:
    they seed the default model only while none exists, and a test that changes them means the
    default model to follow (what a fresh installation with those settings would have)."""
    from gpuscheduler.conf import samples_config
    from personas.image_models import default_model, seed_fields

    fields = seed_fields(samples_config())
    model = default_model()
    update = {"source": fields["source"], "steps": fields["steps"]}
    if not ImageModel.objects.filter(name=fields["name"]).exclude(pk=model.pk).exists():
        update["name"] = fields["name"]  # its name follows, where no other model has it
    ImageModel.objects.filter(pk=model.pk).update(**update)


class Cluster:
    """Real gpuworker / gpumonitor processes on simulated devices, sharing this test's database."""

    def __init__(self, settings: Any, data_dir: Path, log_dir: Path) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.env: dict[str, str] = {}
        self.processes = Processes(log_dir, {})
        self.configure(
            GPU_SIMULATED="sim*2",
            SAMPLES_MODEL="simulated:0.2",
            GPU_LEASE_SECONDS="3",
            GPU_HEARTBEAT_INTERVAL="0.5",
            GPU_MONITOR_INTERVAL="0.5",
            # No calibration at worker start: fault tests flip a device's faults before its worker
            # starts, and a hung or failing calibration would change what they test. Tests of
            # learned costs ask for it (SAMPLES_CALIBRATION="1": a simulated device's time grows
            # linearly with its images, so one size shows its slope).
            SAMPLES_CALIBRATION="",
        )

    def configure(self, **env: str) -> None:
        self.env.update(env)
        configure(self.settings, env)
        if {"SAMPLES_MODEL", "SAMPLES_STEPS"} & env.keys():
            default_model_from_settings()

    def start(self, *args: str, env: dict[str, str] | None = None) -> Any:
        """Start any manage.py command with this cluster's environment (and `env` for this process
        alone, e.g. tests.processes.skewed_clock(-30))."""
        self.processes.env = base_env(self.data_dir, **{"REDIS_URL": self.settings.REDIS_URL, **self.env})
        return self.processes.start(*args, env=env)

    def start_workers(self, expect: int | None = None, timeout: float = 60) -> Any:
        process = self.start("gpuworkers")
        self.wait_workers(expect, timeout)
        return process

    def start_worker(
        self, device: Device | str, *extra: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> Any:
        uuid = device if isinstance(device, str) else device.uuid
        process = self.start("gpuworker", "--device", uuid, *extra, env=env)
        wait_for(
            lambda: Device.objects.filter(uuid=uuid, worker_pid=process.pid, worker_state="idle").exists(),
            timeout,
            lambda: f"worker for {uuid} to attach\n{self.processes.logs()}",
        )
        return process

    def start_monitor(self, *extra: str, env: dict[str, str] | None = None) -> Any:
        return self.start("gpumonitor", *extra, env=env)

    def wait_workers(self, expect: int | None, timeout: float = 60) -> None:
        from gpuscheduler.simulated import describe

        expect = expect or len(describe(self.settings.GPUSCHEDULER["SIMULATED"], self.settings.GPUSCHEDULER["HOST"]))
        wait_for(
            lambda: Device.objects.filter(worker_state="idle").exclude(worker_name="").count() >= expect,
            timeout,
            lambda: f"{expect} workers to attach\n{self.processes.logs()}",
        )

    def logs(self) -> str:
        return self.processes.logs()


@pytest.fixture
def cluster(transactional_db: None, settings: Any, data_dir: Path, tmp_path: Path, redis_db: Any) -> Iterator[Cluster]:
    """Worker processes on the shared test Redis (request `private_redis` first to use one of your own)."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cluster = Cluster(settings, data_dir, log_dir)
    try:
        yield cluster
    finally:
        cluster.processes.stop()


@pytest.fixture
def persona_factory(db: None) -> Callable[..., Persona]:
    def make(**fields: Any) -> Persona:
        n = next(_counter)
        defaults = {
            "name": f"Persona {n}",
            "slug": f"persona-{n}",
            "appearance_prompt": f"portrait number {n}, studio light",
            "negative_prompt": "blurry",
            "default_sample_count": 4,
            "base_seed": 1000 * n,
        }
        return Persona.objects.create(**{**defaults, **fields})

    return make


@pytest.fixture
def persona(persona_factory: Callable[..., Persona]) -> Persona:
    return persona_factory(name="Ada Lovelace", slug="ada-lovelace")


def learned_curve(device: Device, *, per_image: float, fixed: float = 0.0, knee: float = 1.0, calls: int = 10) -> None:
    """Store a cost curve for `device` (the default model, at its steps), as its worker's calls would have."""
    from gpuscheduler.models import CostCurve
    from personas.image_models import default_model, spec_of

    model = default_model()
    CostCurve.objects.update_or_create(
        device=device,
        model=spec_of(model)["key"],
        steps=model.steps,
        defaults={"fixed_seconds": fixed, "per_image_seconds": per_image, "knee": knee, "calls": calls, "sizes": 2},
    )


@pytest.fixture
def device_factory(db: None, settings: Any) -> Callable[..., Device]:
    def make(
        name: str = "H100",
        *,
        kind: str = DeviceKind.SIMULATED,
        health: str = Health.HEALTHY,
        worker: bool = False,
        warm: tuple[str, ...] | None = None,
        **fields: Any,
    ) -> Device:
        """A registered device, read a moment ago (so not stale); `worker=True` gives it a live
        worker (one heartbeat, now) that has the default model warm (or the `warm` keys). `speed=S` gives it a learned
        cost curve of 1/S seconds per image for the default model and steps, as if its worker had
        timed its calls."""
        from django.utils import timezone

        n = next(_counter)
        speed = fields.pop("speed", None)
        info = DeviceInfo(
            uuid=fields.pop("uuid", f"SIM-test-{n:04d}"),
            name=name,
            kind=kind,
            index=fields.pop("index", n),
            memory_total=fields.pop("memory_total", 80 * 1024**3),
        )
        device = device_upsert(info=info, host=settings.GPUSCHEDULER["HOST"])
        if speed is not None:
            learned_curve(device, per_image=1.0 / speed)
        fields = {"last_seen": timezone.now(), **fields}
        if worker:
            fields = {
                "worker_name": f"worker-{n}",
                "worker_host": fields.get("host", settings.GPUSCHEDULER["HOST"]),
                "worker_seen_at": timezone.now(),
                "worker_state": "idle",
                **fields,
            }
        Device.objects.filter(pk=device.pk).update(health=health, **fields)
        device.refresh_from_db()
        if worker:
            # A worker warms the default model at start (gpuscheduler/worker.py run_worker); `warm`
            # names the models it holds instead (keys; () for none).
            from gpuscheduler.device_models import model_loaded
            from personas.image_models import default_model, spec_of

            for key in (spec_of(default_model())["key"],) if warm is None else warm:
                model_loaded(device_id=device.pk, model=key, seconds=0.0, memory_bytes=None)
        return device

    return make


@pytest.fixture
def user_factory(db: None) -> Callable[..., User]:
    def make(*, staff: bool = True, perms: tuple[str, ...] = (), superuser: bool = False) -> User:
        n = next(_counter)
        user = User.objects.create_user(
            username=f"user{n}", password="pw-123456", is_staff=staff, is_superuser=superuser
        )
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return user

    return make


class PrivateRedis:
    """A redis-server of this test's own, which the test may stop, restart or flush."""

    def __init__(self, directory: Path) -> None:
        import socket

        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Any = None

    def start(self) -> None:
        import shutil
        import subprocess

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH: apt-get install redis-server")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, "the private redis-server to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url)


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.exceptions.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path, settings: Any) -> Iterator[PrivateRedis]:
    from gpuscheduler import queues

    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.start()
    settings.REDIS_URL = server.url
    queues._connection.cache_clear()
    try:
        yield server
    finally:
        server.stop()
        queues._connection.cache_clear()


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _gpu_present():
        skip = pytest.mark.skip(
            reason="needs an NVIDIA GPU (NVML finds none); run with `pytest -m gpu` on a GPU machine"
        )
        for item in gpu_items:
            item.add_marker(skip)
