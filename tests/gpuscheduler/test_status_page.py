from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.templatetags.static import static
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from gpuscheduler.models import Assignment, AssignmentState, Device, DeviceKind, Snapshot, WorkerState
from gpuscheduler.page_reads import snapshot_history
from gpuscheduler.queues import device_queue_name
from gpuscheduler.services import snapshots_compact
from gpuscheduler.status import Point, history_points, line_paths
from personas.models import Persona, SampleRequest

PAGE = "admin:gpuscheduler_gpustatuspage_changelist"
DATA = "admin:gpuscheduler_gpustatuspage_data"
PERM = ("gpuscheduler.view_gpu_status",)
GIB = 1024**3
_jobs = itertools.count(1)


@pytest.fixture
def operator(user_factory: Callable[..., Any]) -> Any:
    return user_factory(perms=PERM)


@pytest.fixture
def operator_client(client: Any, operator: Any) -> Any:
    client.force_login(operator)
    return client


@pytest.fixture
def assignment_factory(db: None) -> Callable[..., Assignment]:
    def make(persona: Persona | None, on: Device, **fields: Any) -> Assignment:
        request = None
        if persona is not None:
            request = SampleRequest.objects.create(
                persona=persona,
                count=4,
                first_seed=1,
                model="tiny",
                steps=2,
                state=fields.pop("request_state", "succeeded"),
            )
        n = next(_jobs)
        defaults: dict[str, Any] = {
            "request": request,
            "first_index": 0,
            "image_count": 4,
            "job_id": f"job-{n}",
            "queue_name": device_queue_name(on.pk),
            "planned_device": on,
            "device": on,
            "policy": "balanced",
            "reason": "least busy",
            "state": AssignmentState.SUCCEEDED,
        }
        return Assignment.objects.create(**{**defaults, **fields})

    return make


def snapshots(
    device: Device, *, start: datetime, count: int, every: float = 5.0, bucket: int = 0, **values: Any
) -> None:
    fields = {
        "memory_used": 10 * GIB,
        "memory_total": 80 * GIB,
        "utilization": 50.0,
        "temperature": 60.0,
        "health": "healthy",
    }
    Snapshot.objects.bulk_create(
        Snapshot(
            device=device, taken_at=start + timedelta(seconds=i * every), bucket_seconds=bucket, **{**fields, **values}
        )
        for i in range(count)
    )


def attach_worker(device: Device, *, state: str = WorkerState.IDLE, assignment: Assignment | None = None) -> None:
    Device.objects.filter(pk=device.pk).update(
        worker_name=f"gpu-{device.pk}",
        worker_pid=os.getpid(),  # a live process of this host: a dead pid shows the worker missing
        worker_state=state,
        worker_seen_at=timezone.now(),
        current_assignment=assignment,
    )


# --- who may see it ------------------------------------------------------------------------------


def test_anonymous_visitor_is_sent_to_login_from_page_and_json(client: Any, db: None) -> None:
    for name in (PAGE, DATA):
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_the_permission_gets_403_from_page_and_json(
    client: Any, user_factory: Callable[..., Any]
) -> None:
    client.force_login(user_factory())
    assert client.get(reverse(PAGE)).status_code == 403
    response = client.get(reverse(DATA))
    assert response.status_code == 403
    assert "view_gpu_status" in response.json()["error"]


def test_signed_in_user_who_is_not_staff_gets_403(client: Any, user_factory: Callable[..., Any]) -> None:
    client.force_login(user_factory(staff=False, perms=PERM))
    assert client.get(reverse(PAGE)).status_code == 403
    assert client.get(reverse(DATA)).status_code == 403


def test_staff_with_the_permission_and_superusers_see_page_and_json(
    client: Any, user_factory: Callable[..., Any], device_factory: Callable[..., Device]
) -> None:
    device_factory("H100")
    for user in (user_factory(perms=PERM), user_factory(superuser=True)):
        client.force_login(user)
        page = client.get(reverse(PAGE))
        assert page.status_code == 200
        assert "admin/base_site.html" in [t.name for t in page.templates]
        html = page.content.decode()
        assert '<div class="breadcrumbs">' in html
        assert f'<a href="{reverse("admin:app_list", args=["gpuscheduler"])}">' in html
        assert client.get(reverse(DATA)).json()["devices"][0]["name"] == "H100"


def test_status_page_is_listed_on_the_admin_index_only_for_permitted_users(
    client: Any, user_factory: Callable[..., Any]
) -> None:
    link = f'href="{reverse(PAGE)}"'
    client.force_login(user_factory(perms=("gpuscheduler.view_device",)))
    assert link not in client.get(reverse("admin:index")).content.decode()
    client.force_login(user_factory(perms=PERM))
    index = client.get(reverse("admin:index")).content.decode()
    assert link in index
    assert "GPU status" in index


def test_status_page_has_no_add_change_or_delete_views(operator_client: Any) -> None:
    assert operator_client.get("/admin/gpuscheduler/gpustatuspage/add/").status_code == 404
    assert operator_client.get("/admin/gpuscheduler/gpustatuspage/1/change/").status_code == 404


# --- what it shows -------------------------------------------------------------------------------


def test_json_shows_latest_snapshot_and_running_job_of_a_device(
    operator_client: Any,
    device_factory: Callable[..., Device],
    persona: Persona,
    assignment_factory: Callable[..., Any],
) -> None:
    device = device_factory("H100", health_reason="canary passed")
    now = timezone.now()
    snapshots(device, start=now - timedelta(seconds=20), count=2, every=10)
    Snapshot.objects.create(
        device=device,
        taken_at=now - timedelta(seconds=1),
        memory_used=20 * GIB,
        memory_total=80 * GIB,
        utilization=97.0,
        temperature=71.0,
        power_watts=350.0,
        throttle_reasons="sw_power_cap",
        health="healthy",
    )
    job = assignment_factory(
        persona, device, state=AssignmentState.RUNNING, started_at=now - timedelta(seconds=30), request_state="running"
    )
    attach_worker(device, state=WorkerState.BUSY, assignment=job)

    data = operator_client.get(reverse(DATA)).json()

    [card] = data["devices"]
    assert card["short_uuid"] == device.short_uuid
    assert card["health_reason"] == "canary passed"
    assert card["snapshot"]["utilization"] == 97.0
    assert card["snapshot"]["memory_percent"] == 25.0
    assert card["snapshot"]["throttle_reasons"] == ["sw_power_cap"]
    assert card["snapshot"]["power_watts"] == 350.0
    assert card["worker"]["state"] == "busy"
    assert card["current_job"]["persona"] == "Ada Lovelace"
    assert card["current_job"]["persona_url"] == reverse("admin:personas_persona_change", args=[persona.pk])
    assert card["current_job"]["images"] == 4
    assert card["current_job"]["running_seconds"] >= 29
    assert card["history"]["points"][-1][1] > 50  # the 97 % reading is in the newest slot
    [span] = card["chart"]["jobs"]
    assert span["assignment"] == job.pk and span["state"] == "running"
    assert span["x"] + span["width"] == pytest.approx(600, abs=0.5)  # a running job reaches "now"
    assert "html" not in data


def test_chart_draws_the_job_that_made_the_gpu_busy_and_not_older_ones(
    operator_client: Any,
    device_factory: Callable[..., Device],
    persona_factory: Callable[..., Persona],
    assignment_factory: Callable[..., Any],
) -> None:
    device = device_factory("H100")
    now = timezone.now()
    snapshots(device, start=now - timedelta(minutes=50), count=600, every=5)
    recent = assignment_factory(
        persona_factory(name="Grace Hopper"),
        device,
        image_count=3,
        started_at=now - timedelta(minutes=30),
        finished_at=now - timedelta(minutes=20),
    )
    assignment_factory(
        persona_factory(name="Old Timer"),
        device,
        started_at=now - timedelta(hours=3),
        finished_at=now - timedelta(hours=2, minutes=50),
    )

    html = operator_client.get(reverse(PAGE)).content.decode()

    svg = re.search(r'<svg class="gpu-chart".*?</svg>', html, re.S).group(0)
    span = re.search(rf'<g class="job state-succeeded" data-assignment="{recent.pk}">.*?</g>', svg, re.S).group(0)
    assert "Grace Hopper, images 1-3, succeeded" in span
    assert f'href="{reverse("admin:personas_persona_change", args=[recent.request.persona_id])}"' in svg
    x, width = (float(v) for v in re.search(r'<rect x="([\d.]+)" y="\d+" width="([\d.]+)"', span).groups())
    assert x == pytest.approx(300, abs=1) and width == pytest.approx(100, abs=1)  # 30 to 20 minutes ago
    assert "Old Timer" not in svg
    assert re.search(r'<path class="line utilization" d="M[\d.]+,[\d.]+ L', svg)


def test_history_uses_downsampled_averages_where_the_hour_reaches_older_data(
    operator_client: Any, device_factory: Callable[..., Device]
) -> None:
    device = device_factory("H100")
    now = timezone.now()
    snapshots(device, start=now - timedelta(minutes=55), count=25, every=60, bucket=60, utilization=10.0)
    snapshots(device, start=now - timedelta(minutes=30), count=300, every=5, utilization=90.0)

    [card] = operator_client.get(reverse(DATA)).json()["devices"]

    points = card["history"]["points"]
    # The page's "now" is a little later than the test's: split between the last average and the first raw slot.
    older = [p for p in points if p[0] < 29.6 * 60]
    newer = [p for p in points if p[0] >= 29.6 * 60]
    assert len(older) == 25 and {p[1] for p in older} == {10.0}
    assert newer and {p[1] for p in newer} == {90.0}
    assert len(newer) <= 121  # 25 minutes of raw readings folded into 15 s slots


def test_assignments_table_filters_by_device_and_state(
    operator_client: Any,
    device_factory: Callable[..., Device],
    persona_factory: Callable[..., Persona],
    assignment_factory: Callable[..., Any],
) -> None:
    first, second = device_factory("H100"), device_factory("T4")
    now = timezone.now()
    a_ok = assignment_factory(persona_factory(), first, started_at=now, finished_at=now)
    a_failed = assignment_factory(
        persona_factory(), first, state=AssignmentState.FAILED, started_at=now, finished_at=now
    )
    b_ok = assignment_factory(persona_factory(), second, started_at=now, finished_at=now)
    b_queued = assignment_factory(
        persona_factory(), second, device=None, state=AssignmentState.QUEUED, request_state="queued"
    )

    def ids(**params: Any) -> set[int]:
        return {row["id"] for row in operator_client.get(reverse(DATA), params).json()["assignments"]}

    assert ids() == {a_ok.pk, a_failed.pk, b_ok.pk, b_queued.pk}
    assert ids(device=first.pk) == {a_ok.pk, a_failed.pk}
    assert ids(device=second.pk) == {b_ok.pk, b_queued.pk}
    assert ids(state="failed") == {a_failed.pk}
    assert ids(device=second.pk, state="succeeded") == {b_ok.pk}
    assert ids(device="nonsense", state="nonsense") == ids()
    assert ids(device="²", state="") == ids()  # a digit to isdigit(), not to int()

    html = operator_client.get(reverse(PAGE), {"device": first.pk, "state": "failed"}).content.decode()
    assert f'class="assignment state-failed" data-assignment="{a_failed.pk}"' in html
    assert f'class="assignment state-succeeded" data-assignment="{a_ok.pk}"' not in html
    persona_url = reverse("admin:personas_persona_change", args=[a_failed.request.persona_id])
    assert f'<a href="{persona_url}">' in html
    assert f'<option value="{first.pk}" selected>' in html


@pytest.mark.parametrize(
    "layout",
    [
        [("cpu", DeviceKind.CPU)],
        [("NVIDIA H100 80GB HBM3", DeviceKind.CUDA)],
        [(f"H100 #{i}", DeviceKind.SIMULATED) for i in range(8)],
    ],
    ids=["cpu-only", "one-gpu", "eight-simulated"],
)
def test_page_renders_a_card_and_a_chart_for_every_device(
    operator_client: Any, device_factory: Callable[..., Device], layout: list[tuple[str, str]]
) -> None:
    now = timezone.now()
    devices = [device_factory(name, kind=kind) for name, kind in layout]
    for device in devices:
        snapshots(device, start=now - timedelta(minutes=10), count=120)
        attach_worker(device)

    html = operator_client.get(reverse(PAGE)).content.decode()

    for device in devices:
        assert f'id="gpu-card-{device.pk}"' in html
        assert f"<h3>{device.label}</h3>" in html
    assert html.count('<svg class="gpu-chart"') == len(devices)
    assert html.count('class="badge worker-idle"') == len(devices)
    data = operator_client.get(reverse(DATA), {"fragments": "1"}).json()
    assert len(data["devices"]) == len(devices)
    assert data["html"]["cards"].count('<svg class="gpu-chart"') == len(devices)
    assert set(data["html"]) == {"storage", "cards", "queues", "assignments"}


def test_page_ships_its_refresh_script_and_the_places_it_fills(operator_client: Any) -> None:
    html = operator_client.get(reverse(PAGE)).content.decode()

    assert f'data-url="{reverse(DATA)}"' in html
    assert f'<script src="{static("gpuscheduler/status.js")}" defer>' in html
    for target in ("gpu-storage", "gpu-cards", "gpu-queues", "gpu-assignments"):
        assert f'id="{target}"' in html
    script = (Path(__file__).resolve().parents[2] / "gpuscheduler/static/gpuscheduler/status.js").read_text()
    assert "fragments" in script and "innerHTML" in script


def test_page_without_devices_says_how_to_register_them(operator_client: Any) -> None:
    assert "No device is registered yet" in operator_client.get(reverse(PAGE)).content.decode()


def test_queue_depths_show_database_backlog_and_redis_lengths(
    operator_client: Any,
    device_factory: Callable[..., Device],
    persona: Persona,
    assignment_factory: Callable[..., Any],
    redis_db: Any,
) -> None:
    device = device_factory("H100")
    assignment_factory(
        persona, device, device=None, state=AssignmentState.QUEUED, image_count=6, request_state="queued"
    )
    redis_db.rpush(f"rq:queue:gpu.{device.pk}", "a", "b")
    redis_db.rpush(f"rq:queue:gpu.{device.pk}.pinned", "c")

    data = operator_client.get(reverse(DATA)).json()

    assert data["redis_available"] is True
    [queue] = data["queues"]
    assert (queue["queued_images"], queue["redis_jobs"], queue["redis_pinned_jobs"]) == (6, 2, 1)


def test_redis_down_shows_unavailable_instead_of_failing(
    operator_client: Any, device_factory: Callable[..., Device], settings: Any
) -> None:
    device_factory("H100")
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

    page = operator_client.get(reverse(PAGE))
    data = operator_client.get(reverse(DATA)).json()

    assert page.status_code == 200
    assert "Redis unavailable" in page.content.decode()
    assert data["redis_available"] is False
    assert data["queues"][0]["redis_jobs"] is None


def test_page_queries_do_not_grow_with_devices_or_history(
    operator_client: Any,
    device_factory: Callable[..., Device],
    persona_factory: Callable[..., Persona],
    assignment_factory: Callable[..., Any],
    django_assert_max_num_queries: Any,
) -> None:
    now = timezone.now()

    def add_devices(count: int) -> None:
        for _ in range(count):
            device = device_factory("H100")
            snapshots(device, start=now - timedelta(minutes=30), count=60, every=30)
            job = assignment_factory(
                persona_factory(),
                device,
                state=AssignmentState.RUNNING,
                started_at=now - timedelta(minutes=5),
                request_state="running",
            )
            attach_worker(device, state=WorkerState.BUSY, assignment=job)

    def count_queries(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert operator_client.get(url).status_code == 200
        return len(queries)

    add_devices(1)
    operator_client.get(reverse(PAGE))  # warm the session and permission caches alike for both counts
    one = (count_queries(reverse(PAGE)), count_queries(reverse(DATA)))
    add_devices(7)
    eight = (count_queries(reverse(PAGE)), count_queries(reverse(DATA)))

    assert one == eight
    # 14 before models were data, and four more since: each device's models (DeviceModel, one query
    # for all devices), the default model (ImageModel, whose key and steps the curves are read for),
    # while no device has timed that model the devices' curves of other models (one query), and the
    # start of the charts' active window (one aggregate).
    with django_assert_max_num_queries(18):
        operator_client.get(reverse(PAGE))
    with django_assert_max_num_queries(18):
        operator_client.get(reverse(DATA), {"fragments": "1"})


# --- the chart's geometry --------------------------------------------------------------------------


def test_line_breaks_where_the_monitor_stopped_writing() -> None:
    points = [Point(t, 15, 50.0, None, None) for t in (0, 15, 30, 600, 615)]

    paths = line_paths(points, window=3600, width=3600)

    assert paths["utilization"] == "M0.0,56.0 L15.0,56.0 L30.0,56.0 M600.0,56.0 L615.0,56.0"
    assert paths["memory"] == ""


def test_raw_readings_win_over_averages_of_the_same_time() -> None:
    # (device, bucket_seconds, slot, first, last, mean offset, memory used, total, utilization, temperature)
    rows = [
        (1, 60, 40, 600.0, 600.0, 600.0, 1.0, 4, 10.0, 40.0),
        (1, 0, 40, 601.0, 606.0, 603.5, 2.0, 4, 85.0, 60.0),
        (1, 60, 30, 420.0, 420.0, 420.0, 1.0, 4, 10.0, 40.0),
    ]

    points = history_points(rows, slot_seconds=15)

    assert [(p.t, p.utilization, p.memory, p.temperature) for p in points] == [
        (450.0, 10.0, 25.0, 40.0),  # the older average, drawn mid-bucket
        (607.5, 85.0, 50.0, 60.0),  # the raw slot, not the average that overlaps it
    ]


def test_snapshot_history_averages_readings_per_slot_in_the_database(device_factory: Callable[..., Device]) -> None:
    device = device_factory("H100")
    since = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    for seconds, utilization in ((1.5, 80.0), (6.25, 100.0), (20, 50.0)):
        snapshots(device, start=since + timedelta(seconds=seconds), count=1, utilization=utilization)
    snapshots(device, start=since - timedelta(seconds=1), count=1, utilization=0.0)  # before the window

    rows = snapshot_history(device_ids=[device.pk], since=since, until=since + timedelta(hours=1), slot_seconds=15)

    assert [(r[1], r[2], r[8]) for r in rows] == [(0, 0, 90.0), (0, 1, 50.0)]
    assert rows[0][3] == pytest.approx(1.5, abs=0.01) and rows[0][4] == pytest.approx(6.25, abs=0.01)
    assert rows[0][6] == 10 * GIB and rows[0][7] == 80 * GIB


# --- bounded history (gpuscheduler.services.snapshots_compact) -------------------------------------


def test_compaction_folds_old_raw_snapshots_into_minute_averages(
    device_factory: Callable[..., Device], settings: Any
) -> None:
    settings.GPUSCHEDULER = {
        **settings.GPUSCHEDULER,
        "SNAPSHOT_RAW_HOURS": 2,
        "SNAPSHOT_BUCKET_SECONDS": 60,
        "SNAPSHOT_RETENTION_DAYS": 7,
    }
    device = device_factory("H100")
    now = timezone.now().replace(second=0, microsecond=0)
    old = now - timedelta(hours=3)
    Snapshot.objects.bulk_create(
        Snapshot(
            device=device,
            taken_at=old + timedelta(seconds=5 * i),
            utilization=float(i),
            temperature=50.0 + i,
            memory_used=i * GIB,
            memory_total=80 * GIB,
            power_watts=100.0,
            health="probation" if i == 3 else "healthy",
            throttle_reasons="hw_slowdown" if i == 5 else "",
        )
        for i in range(24)  # two minutes at 5 s
    )
    snapshots(device, start=now - timedelta(minutes=30), count=10, utilization=42.0)

    folded, expired = snapshots_compact(now=now)

    assert (folded, expired) == (24, 0)
    averages = list(Snapshot.objects.filter(bucket_seconds=60).order_by("taken_at"))
    assert [a.taken_at for a in averages] == [old, old + timedelta(minutes=1)]
    assert [a.utilization for a in averages] == [5.5, 17.5]  # means of 0..11 and 12..23
    assert [a.temperature for a in averages] == [55.5, 67.5]
    assert averages[0].memory_used == int(5.5 * GIB)
    assert averages[0].health == "probation" and averages[1].health == "healthy"
    assert averages[0].throttle_reasons == "hw_slowdown"
    recent = Snapshot.objects.filter(bucket_seconds=0)
    assert recent.count() == 10 and set(recent.values_list("utilization", flat=True)) == {42.0}


def test_compaction_deletes_snapshots_past_retention_and_keeps_recent_ones(
    device_factory: Callable[..., Device], settings: Any
) -> None:
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "SNAPSHOT_RAW_HOURS": 2, "SNAPSHOT_RETENTION_DAYS": 7}
    device = device_factory("H100")
    now = timezone.now()
    snapshots(device, start=now - timedelta(days=8), count=3, every=60, bucket=60)
    snapshots(device, start=now - timedelta(days=7, minutes=5), count=2)
    snapshots(device, start=now - timedelta(days=6), count=4, every=60, bucket=60)
    snapshots(device, start=now - timedelta(minutes=10), count=5)

    folded, expired = snapshots_compact(now=now)

    assert (folded, expired) == (0, 5)
    assert Snapshot.objects.filter(bucket_seconds=60).count() == 4
    assert Snapshot.objects.filter(bucket_seconds=0).count() == 5
    assert not Snapshot.objects.filter(taken_at__lt=now - timedelta(days=7)).exists()


# --- learned costs and shared calls -------------------------------------------------------------


def test_each_card_shows_the_learned_cost_curve_and_how_many_calls_it_rests_on(
    operator_client: Any, device_factory: Callable[..., Device]
) -> None:
    from tests.conftest import learned_curve

    learned, new = device_factory("H100"), device_factory("T4")
    learned_curve(learned, fixed=0.11, per_image=0.17, knee=6.5, calls=40)

    page = operator_client.get(reverse(PAGE)).content.decode()
    data = operator_client.get(reverse(DATA)).json()

    cards = {d["id"]: d for d in data["devices"]}
    assert cards[learned.pk]["cost"]["text"] == (
        "1.22 s a call up to 6.5 images, + 0.170 s per image above; best at 7 (rests on 40 calls)"
    )
    assert cards[learned.pk]["cost"]["best_size"] == 7
    # A device nobody has timed borrows its peers' curve, and says so.
    assert cards[new.pk]["cost"]["source"] == "peers"
    assert "no calls of its own yet: borrowed from its peers" in cards[new.pk]["cost"]["text"]
    assert "best at 7 (rests on 40 calls)" in page


def test_the_history_shows_which_attempts_shared_a_pipeline_call(
    operator_client: Any,
    device_factory: Callable[..., Device],
    assignment_factory: Callable[..., Assignment],
    persona_factory: Callable[..., Persona],
) -> None:
    from gpuscheduler.models import PipelineCall

    device = device_factory("H100")
    call = PipelineCall.objects.create(device=device, model="tiny", steps=2, images=8, seconds=1.5)
    together = [assignment_factory(persona_factory(), device, pipeline_call=call) for _ in range(2)]
    alone = assignment_factory(persona_factory(), device)

    rows = {a["id"]: a for a in operator_client.get(reverse(DATA)).json()["assignments"]}
    assert [rows[a.pk]["call_shared_by"] for a in together] == [2, 2]
    assert rows[together[0].pk]["pipeline_call"] == call.pk
    assert rows[alone.pk]["pipeline_call"] is None
    page = operator_client.get(reverse(PAGE)).content.decode()
    assert page.count("shared by 2") == 2
