"""/metrics for Prometheus: values parsed back with prometheus_client's own parser and checked
against the database, who may read it, Redis down, and a query count that does not grow with devices."""

from __future__ import annotations

import itertools
import socket
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count
from django.db.models.functions import Coalesce
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from gpuscheduler import metrics
from gpuscheduler.costs import curve_from_row
from gpuscheduler.metrics_collect import CALL_BUCKETS, CALL_WINDOW_ROWS
from gpuscheduler.models import (
    Assignment,
    AssignmentState,
    CostCurve,
    Device,
    DeviceModel,
    Health,
    Host,
    ModelState,
    PipelineCall,
    Snapshot,
    WorkerState,
)
from gpuscheduler.queues import device_queue_name, queue_key
from personas.metrics import LATENCY_BUCKETS
from personas.models import RequestState, SampleRequest
from tests.conftest import learned_curve
from tests.processes import settings_in_a_fresh_process

TOKEN = "test-token-0123456789abcdef"
PERM = ("gpuscheduler.view_gpu_status",)
MIB = 1024**2
GIB = 1024**3
_jobs = itertools.count(1)


@pytest.fixture
def token(settings: Any) -> str:
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


@pytest.fixture
def no_token(settings: Any) -> None:
    settings.METRICS_TOKEN = ""


def scrape(client: Any, *, token: str | None = TOKEN) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def samples(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> list[Any]:
    return [
        s
        for s in families[family].samples
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    found = samples(families, family, suffix, **labels)
    assert len(found) == 1, (family, labels, found)
    return float(found[0].value)


def assignment(on: Device, state: str, *, policy: str = "balanced", ran: bool = True, images: int = 4) -> Assignment:
    return Assignment.objects.create(
        image_count=images,
        job_id=f"metrics-{next(_jobs)}",
        queue_name=device_queue_name(on.pk),
        planned_device=on,
        device=on if ran else None,
        policy=policy,
        reason="test",
        state=state,
    )


def call(on: Device, images: int, seconds: float, **fields: Any) -> PipelineCall:
    return PipelineCall.objects.create(device=on, model="tiny@x", steps=2, images=images, seconds=seconds, **fields)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- values against the database ------------------------------------------------------------------


def test_device_readings_use_the_dcgm_exporter_names_and_labels(client, token, device_factory, redis_db):
    now = timezone.now()
    Host.objects.create(host="testhost", hostname="gpu-box-1")
    h100 = device_factory(
        "NVIDIA H100", index=0, uuid="GPU-aaaa", memory_total=80 * GIB, reading_at=now,
        memory_used=12 * GIB, utilization=87.0, temperature=61.0, worker=True,
    )  # fmt: skip
    t4 = device_factory(
        "Tesla T4", index=1, uuid="GPU-bbbb", memory_total=16 * GIB, reading_at=now,
        memory_used=3 * GIB, utilization=5.0, temperature=44.0,
    )  # fmt: skip
    old = now - timedelta(hours=1)
    silent = device_factory(
        "Tesla T4", index=2, uuid="GPU-cccc", reading_at=old, memory_used=GIB, utilization=99.0,
        temperature=70.0, last_seen=old, created=old,
    )  # fmt: skip
    Snapshot.objects.create(device=h100, taken_at=now - timedelta(seconds=10), power_watts=300.0, health="healthy")
    Snapshot.objects.create(device=h100, taken_at=now, power_watts=412.5, health="healthy")
    families = scrape(client)

    labels = value(families, "DCGM_FI_DEV_GPU_UTIL", UUID="GPU-aaaa")
    assert labels == 87.0
    (h100_sample,) = samples(families, "DCGM_FI_DEV_GPU_UTIL", UUID="GPU-aaaa")
    assert h100_sample.labels == {
        "gpu": "0",
        "UUID": "GPU-aaaa",
        "modelName": "NVIDIA H100",
        "Hostname": "gpu-box-1",
        "host": "testhost",
        "name": h100.label,
    }
    assert value(families, "DCGM_FI_DEV_FB_USED", UUID="GPU-aaaa") == 12 * 1024
    assert value(families, "DCGM_FI_DEV_FB_FREE", UUID="GPU-aaaa") == 68 * 1024
    assert value(families, "DCGM_FI_DEV_FB_TOTAL", UUID="GPU-bbbb") == 16 * 1024
    assert value(families, "DCGM_FI_DEV_GPU_TEMP", UUID="GPU-bbbb") == 44.0
    assert value(families, "DCGM_FI_DEV_POWER_USAGE", UUID="GPU-aaaa") == 412.5  # the newest snapshot
    assert samples(families, "DCGM_FI_DEV_POWER_USAGE", UUID="GPU-bbbb") == []  # no snapshot, no power
    assert value(families, "gpuscheduler_device_reading_timestamp_seconds", UUID="GPU-bbbb") == pytest.approx(
        t4.reading_at.timestamp()
    )
    # A stale device's last reading is not a current value: absent, and its health says why.
    assert samples(families, "DCGM_FI_DEV_GPU_UTIL", UUID=silent.uuid) == []
    assert value(families, "gpuscheduler_device_health", UUID=silent.uuid, state="stale") == 1
    assert value(families, "gpuscheduler_device_health", UUID=silent.uuid, state="healthy") == 0
    assert value(families, "gpuscheduler_device_health", UUID="GPU-aaaa", state="healthy") == 1
    assert value(families, "gpuscheduler_worker_state", UUID="GPU-aaaa", state=WorkerState.IDLE) == 1
    assert value(families, "gpuscheduler_worker_state", UUID="GPU-bbbb", state=WorkerState.STOPPED) == 1
    assert sum(s.value for s in samples(families, "gpuscheduler_worker_state", UUID="GPU-bbbb")) == 1


def test_every_device_has_one_health_state_and_retired_devices_are_left_out(client, token, device_factory):
    devices = [device_factory(health=h) for h in (Health.HEALTHY, Health.PROBATION, Health.UNHEALTHY)]
    retired = device_factory(retired_at=timezone.now())
    families = scrape(client)
    for device in devices:
        assert value(families, "gpuscheduler_device_health", UUID=device.uuid, state=device.health) == 1
        assert sum(s.value for s in samples(families, "gpuscheduler_device_health", UUID=device.uuid)) == 1
    assert samples(families, "gpuscheduler_device_health", UUID=retired.uuid) == []


def test_queue_depths_match_the_database_and_redis(client, token, device_factory, redis_db):
    a, b = device_factory(), device_factory()
    assignment(a, AssignmentState.QUEUED, ran=False, images=4)
    assignment(a, AssignmentState.QUEUED, ran=False, images=3)
    assignment(b, AssignmentState.RUNNING, images=2)
    redis_db.rpush(queue_key(device_queue_name(a.pk)), "job-1", "job-2")
    redis_db.rpush(queue_key(device_queue_name(b.pk, pinned=True)), "job-3")
    families = scrape(client)

    assert value(families, "gpuscheduler_queued_images", UUID=a.uuid) == 7
    assert value(families, "gpuscheduler_running_images", UUID=a.uuid) == 0
    assert value(families, "gpuscheduler_running_images", UUID=b.uuid) == 2
    assert value(families, "gpuscheduler_redis_queue_jobs", UUID=a.uuid, pinned="false") == 2
    assert value(families, "gpuscheduler_redis_queue_jobs", UUID=a.uuid, pinned="true") == 0
    assert value(families, "gpuscheduler_redis_queue_jobs", UUID=b.uuid, queue=f"gpu.{b.pk}.pinned") == 1
    assert value(families, "gpuscheduler_redis_up") == 1
    # RQ's own metrics, through django-rq's collector.
    assert value(families, "rq_jobs", queue="default", status="queued") == 0
    assert "rq_workers" in families


def test_assignments_are_counted_by_state_device_and_policy(client, token, device_factory):
    a, b = device_factory(), device_factory()
    for state in (AssignmentState.SUCCEEDED, AssignmentState.SUCCEEDED, AssignmentState.FAILED):
        assignment(a, state)
    assignment(a, AssignmentState.SUCCEEDED, policy="round_robin")
    assignment(b, AssignmentState.ABANDONED)
    assignment(b, AssignmentState.QUEUED, ran=False)
    # Older than the window: an attempt that ended is left out, one still running is counted.
    day_ago = timezone.now() - timedelta(hours=25)
    gone = assignment(b, AssignmentState.FAILED, policy="least_memory")
    running = assignment(b, AssignmentState.RUNNING, policy="least_memory")
    Assignment.objects.filter(pk__in=[gone.pk, running.pk]).update(queued_at=day_ago)
    families = scrape(client)

    expected = (
        Assignment.objects.exclude(pk=gone.pk)
        .values("state", "policy", on=Coalesce("device_id", "planned_device_id"))
        .annotate(n=Count("pk"))
        .order_by()
    )
    uuids = dict(Device.objects.values_list("pk", "uuid"))
    for row in expected:
        got = value(
            families, "gpuscheduler_assignments", UUID=uuids[row["on"]], state=row["state"], policy=row["policy"]
        )
        assert got == row["n"]
    assert len(samples(families, "gpuscheduler_assignments")) == len(expected) == 6
    assert samples(families, "gpuscheduler_assignments", state="failed", policy="least_memory") == []
    assert value(families, "gpuscheduler_assignments", UUID=a.uuid, state="succeeded", policy="balanced") == 2


def test_pipeline_call_histogram_counts_the_window_s_rows(client, token, device_factory):
    a, b = device_factory(), device_factory()
    for seconds in (0.05, 0.3, 0.9, 1.5, 500.0):
        call(a, 4, seconds)
    call(a, 8, 2.5)
    call(b, 4, 0.2)
    call(a, 4, 0.3, calibration=True)  # made at worker start: left out
    call(a, 4, 0.3, at=timezone.now() - timedelta(hours=25))  # older than the window: left out
    families = scrape(client)

    name = "gpuscheduler_pipeline_call_seconds"
    in_window = PipelineCall.objects.filter(calibration=False, at__gte=timezone.now() - timedelta(hours=24))
    assert sum(s.value for s in samples(families, name, "_bucket", le="+Inf")) == in_window.count() == 7
    count = value(families, f"{name}_gcount", UUID=a.uuid, images="4")
    assert count == in_window.filter(device=a, images=4).count() == 5
    assert value(families, f"{name}_gsum", UUID=a.uuid, images="4") == pytest.approx(0.05 + 0.3 + 0.9 + 1.5 + 500.0)
    buckets = {s.labels["le"]: s.value for s in samples(families, name, "_bucket", UUID=a.uuid, images="4")}
    assert len(buckets) == len(CALL_BUCKETS) + 1
    assert (buckets["0.1"], buckets["0.5"], buckets["1.0"], buckets["2.0"], buckets["300.0"]) == (1, 2, 3, 4, 4)
    assert buckets["+Inf"] == 5
    assert value(families, f"{name}_gcount", UUID=a.uuid, images="8") == 1
    assert value(families, f"{name}_gcount", UUID=b.uuid, images="4") == 1


def test_pipeline_call_histogram_reads_at_most_the_latest_calls(client, token, device_factory, monkeypatch):
    from gpuscheduler import metrics_collect

    monkeypatch.setattr(metrics_collect, "CALL_WINDOW_ROWS", 3)
    device = device_factory()
    for seconds in (0.05, 0.05, 5.0, 5.0, 5.0):
        call(device, 1, seconds)
    families = scrape(client)
    assert value(families, "gpuscheduler_pipeline_call_seconds_gcount", UUID=device.uuid, images="1") == 3
    assert value(families, "gpuscheduler_pipeline_call_seconds_gsum", UUID=device.uuid, images="1") == 15.0
    assert CALL_WINDOW_ROWS == 10_000


def test_request_latency_histogram_from_press_to_last_image(client, token, persona_factory, device_factory):
    device_factory()
    now = timezone.now()
    # 5.0 s lies on a bucket's bound, which counts it (le: less than or equal), to the microsecond.
    ended = [(RequestState.SUCCEEDED, 5.0), (RequestState.SUCCEEDED, 45.000001), (RequestState.FAILED, 700.0)]
    for state, seconds in ended:
        created = now - timedelta(minutes=30)
        SampleRequest.objects.create(
            persona=persona_factory(), count=4, first_seed=1, model="tiny@x", steps=2, state=state,
            created=created, finished_at=created + timedelta(seconds=seconds),
        )  # fmt: skip
    long_ago = now - timedelta(hours=30)
    SampleRequest.objects.create(
        persona=persona_factory(), count=4, first_seed=1, model="tiny@x", steps=2, state=RequestState.SUCCEEDED,
        created=long_ago, finished_at=long_ago + timedelta(seconds=5),
    )  # fmt: skip
    SampleRequest.objects.create(
        persona=persona_factory(), count=4, first_seed=1, model="tiny@x", steps=2, state=RequestState.RUNNING
    )
    families = scrape(client)

    name = "persona_samples_request_seconds"
    assert value(families, f"{name}_gcount", state="succeeded") == 2
    assert value(families, f"{name}_gsum", state="succeeded") == pytest.approx(50.000001, abs=1e-9)
    assert value(families, f"{name}_gcount", state="failed") == 1
    buckets = {s.labels["le"]: s.value for s in samples(families, name, "_bucket", state="succeeded")}
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert (buckets["2.0"], buckets["5.0"], buckets["30.0"], buckets["60.0"], buckets["+Inf"]) == (0, 1, 1, 2, 2)
    assert value(families, "persona_samples_active_requests", state="running") == 1
    assert value(families, "persona_samples_active_requests", state="queued") == 0


def test_learned_costs_and_models_per_device(client, token, device_factory, settings):
    device = device_factory(worker=True)  # its worker has the default model warm
    learned_curve(device, fixed=1.24, per_image=0.169, knee=6.5, calls=40)
    DeviceModel.objects.create(device=device, model="sdxl@abc", state=ModelState.FAILED, load_seconds=3.5, loads=2)
    families = scrape(client)

    curve = CostCurve.objects.get(device=device)
    labels = {"UUID": device.uuid, "model_key": curve.model, "steps": str(curve.steps)}
    assert value(families, "gpuscheduler_cost_fixed_seconds", **labels) == 1.24
    assert value(families, "gpuscheduler_cost_per_image_seconds", **labels) == 0.169
    assert value(families, "gpuscheduler_cost_knee_images", **labels) == 6.5
    best = curve_from_row(curve).best_size(settings.SAMPLES["MAX_BATCH"])
    assert value(families, "gpuscheduler_cost_best_images", **labels) == best
    assert value(families, "gpuscheduler_cost_fit_calls", **labels) == 40

    warm = DeviceModel.objects.get(device=device, state=ModelState.WARM)
    assert value(families, "gpuscheduler_model_warm", UUID=device.uuid, model_key=warm.model) == 1
    assert value(families, "gpuscheduler_model_warm", UUID=device.uuid, model="sdxl") == 0
    assert value(families, "gpuscheduler_model_state", UUID=device.uuid, model="sdxl", state="failed") == 1
    assert value(families, "gpuscheduler_model_load_seconds", UUID=device.uuid, model="sdxl") == 3.5
    assert value(families, "gpuscheduler_model_loads", "_total", UUID=device.uuid, model="sdxl") == 2


# --- who may read it ----------------------------------------------------------------------------


def test_with_a_token_only_the_bearer_header_opens_it(client, token, device_factory, user_factory):
    device_factory()
    assert scrape(client, token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"DCGM" not in response.content and b"gpuscheduler_" not in response.content
    client.force_login(user_factory(superuser=True))  # a session is not the token
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_without_a_token_only_staff_with_the_status_permission(client, no_token, device_factory, user_factory):
    device_factory()
    response = client.get("/metrics")
    assert response.status_code == 401  # no redirect to a login page: a scraper could not follow it
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    for user in (user_factory(), user_factory(staff=False, perms=PERM)):
        client.force_login(user)
        response = client.get("/metrics")
        assert response.status_code == 403
        assert b"gpuscheduler_" not in response.content
    for user in (user_factory(perms=PERM), user_factory(superuser=True)):
        client.force_login(user)
        assert "gpuscheduler_device_health" in scrape(client, token=None)


def test_only_get_is_answered(client, token):
    response = client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405


def test_the_token_setting_is_checked_at_start(tmp_path):
    done = settings_in_a_fresh_process(tmp_path, "[s.METRICS_TOKEN]", METRICS_TOKEN="short")
    assert done.returncode != 0
    assert "METRICS_TOKEN must be at least 16 characters" in done.stderr
    assert "short" not in done.stderr.split("ImproperlyConfigured")[-1]  # a secret is not echoed
    done = settings_in_a_fresh_process(tmp_path, "[s.METRICS_TOKEN]", METRICS_TOKEN="has a space 0123456789")
    assert done.returncode != 0
    done = settings_in_a_fresh_process(tmp_path, "[s.METRICS_TOKEN]", METRICS_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f'["{TOKEN}"]'
    done = settings_in_a_fresh_process(tmp_path, "[s.METRICS_TOKEN]", unset=("METRICS_TOKEN",))
    assert done.stdout.strip() == '[""]'


# --- Redis down, scale, layering --------------------------------------------------------------


def test_redis_down_leaves_its_numbers_out_and_says_so(client, token, device_factory, settings):
    device = device_factory(reading_at=timezone.now(), utilization=50.0)
    assignment(device, AssignmentState.QUEUED, ran=False, images=4)
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.RQ_QUEUES = {"default": {"URL": settings.REDIS_URL}}  # django-rq reads it at each use
    families = scrape(client)
    assert value(families, "gpuscheduler_redis_up") == 0
    assert samples(families, "gpuscheduler_redis_queue_jobs") == []
    assert not [name for name in families if name.startswith("rq_")]
    assert value(families, "gpuscheduler_queued_images", UUID=device.uuid) == 4  # the database still answers
    assert value(families, "DCGM_FI_DEV_GPU_UTIL", UUID=device.uuid) == 50.0


def test_rq_s_collector_failing_leaves_only_its_own_metrics_out(client, token, device_factory, settings, redis_db):
    device = device_factory()
    settings.RQ_QUEUES = {"default": {"URL": f"redis://127.0.0.1:{closed_port()}/0"}}
    families = scrape(client)
    assert value(families, "gpuscheduler_redis_up") == 1
    assert value(families, "gpuscheduler_redis_queue_jobs", UUID=device.uuid, pinned="false") == 0
    assert not [name for name in families if name.startswith("rq_")]


def test_queries_do_not_grow_with_devices(client, token, device_factory, persona_factory, redis_db):
    def fill(n: int) -> None:
        for _ in range(n):
            device = device_factory(worker=True, speed=1.0, reading_at=timezone.now(), utilization=10.0)
            Snapshot.objects.create(device=device, taken_at=timezone.now(), power_watts=100.0, health="healthy")
            assignment(device, AssignmentState.SUCCEEDED)
            call(device, 4, 1.0)

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            scrape(client)
        return len(queries)

    fill(2)
    few = count()
    fill(10)
    assert count() == few
    assert few <= 12


def test_personas_adds_its_collector_without_the_scheduler_importing_it():
    assert "personas" in metrics.registered()
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "gpuscheduler"
    for module in ("metrics.py", "metrics_collect.py", "metrics_views.py"):
        text = (root / module).read_text()
        assert "from personas" not in text and "import personas" not in text


def test_several_devices_each_get_their_own_series(client, token, device_factory):
    devices = [device_factory(reading_at=timezone.now(), utilization=float(10 * i)) for i in range(5)]
    families = scrape(client)
    got = {s.labels["UUID"]: s.value for s in samples(families, "DCGM_FI_DEV_GPU_UTIL")}
    assert got == {d.uuid: float(10 * i) for i, d in enumerate(devices)}


def test_a_collector_registered_by_an_app_is_scraped(client, token, device_factory):
    from prometheus_client.core import GaugeMetricFamily

    seen = []

    def extra(now: Any) -> Any:
        seen.append(now)
        yield GaugeMetricFamily("extra_answer", "A test's own metric.", value=42)

    metrics.register_collector("test-extra", extra)
    try:
        families = scrape(client)
    finally:
        metrics._collectors.pop("test-extra")
    assert value(families, "extra_answer") == 42
    assert len(seen) == 1  # the database's time, read once per scrape and handed to each collector


def test_the_grafana_dashboard_queries_only_names_that_metrics_exports(
    client, token, device_factory, persona_factory, redis_db
):
    import json
    import re
    from pathlib import Path

    device = device_factory(worker=True, speed=1.0, reading_at=timezone.now(), utilization=1.0, memory_used=GIB)
    Snapshot.objects.create(device=device, taken_at=timezone.now(), power_watts=100.0, health="healthy")
    call(device, 4, 1.0)
    DeviceModel.objects.filter(device=device).update(memory_bytes=GIB)
    created = timezone.now() - timedelta(minutes=1)
    SampleRequest.objects.create(
        persona=persona_factory(), count=4, first_seed=1, model="tiny@x", steps=2, state=RequestState.SUCCEEDED,
        created=created, finished_at=created + timedelta(seconds=5),
    )  # fmt: skip
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = response.content.decode()
    # Every family is declared (# TYPE) even without samples; samples add _bucket, _gcount and _total.
    exported = set(re.findall(r"^# TYPE ([A-Za-z0-9_:]+) ", text, re.MULTILINE))
    exported |= set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", text, re.MULTILINE))

    path = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "persona-samples.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\b((?:DCGM_FI|gpuscheduler|persona_samples|rq)_[A-Za-z0-9_]+)\b", expr))
    assert used - exported == set()
    families = {name.removesuffix("_bucket") for name in used}
    for wanted in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_GPU_TEMP",
        "gpuscheduler_queued_images",
        "gpuscheduler_assignments",
        "gpuscheduler_pipeline_call_seconds",
        "persona_samples_request_seconds",
        "gpuscheduler_model_load_seconds",
    ):
        assert wanted in families
    assert any("histogram_quantile(0.9" in e and "pipeline_call_seconds_bucket" in e for e in exprs)
