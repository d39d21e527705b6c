"""A press may plan on this process's read of the devices up to GPU_PLACEMENT_READ_SECONDS old
(gpuscheduler/placement_reads.py recent_device_reads); the work on each device is read anew in
every turn, and retries and pinned work read the devices anew.

The rest of the suite runs with the setting at 0 (tests/settings.py): its tests change a device
and place at once.
"""

from __future__ import annotations

import itertools
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from gpuscheduler import placement_reads
from gpuscheduler.checks import check_settings
from gpuscheduler.models import Assignment, Device
from gpuscheduler.placement import assignments_place
from gpuscheduler.services import device_set_unhealthy
from gpuscheduler.workloads import default_key_and_steps
from personas.models import SampleRequest


class Clock:
    """time.monotonic for placement_reads, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(placement_reads, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


@pytest.fixture
def reuse(settings: Any) -> Iterator[None]:
    """Reads reused for half a second, as deployed; none of another test's devices, before or after."""
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "PLACEMENT_READ_SECONDS": 0.5, "POLICY": "balanced"}
    placement_reads.forget_device_reads()
    yield
    placement_reads.forget_device_reads()


@pytest.fixture
def request_factory(persona_factory: Callable[..., Any]) -> Callable[[], SampleRequest]:
    def make() -> SampleRequest:
        return SampleRequest.objects.create(persona=persona_factory(), count=4, first_seed=0, model="m", steps=1)

    return make


_first_index = itertools.count(0, 100)
SAVEPOINTS = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE")


def press(request: SampleRequest, count: int = 1, **options: Any) -> tuple[list[Assignment], list[str]]:
    """Place `count` images as a press does (for the default model unless told); the placement
    and the statements it ran."""
    if "model" not in options:
        options["model"], options["steps"] = default_key_and_steps()
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        placed = assignments_place(request_id=request.pk, count=count, first_index=next(_first_index), **options)
    return placed, [q["sql"] for q in captured.captured_queries if q["sql"].split()[0] not in SAVEPOINTS]


def test_a_press_within_the_window_reuses_the_read_and_still_sees_every_placement_before_it(
    reuse, clock, device_factory, request_factory
):
    devices = [device_factory("H100", worker=True, speed=1.0) for _ in range(2)]
    request = request_factory()

    placed, first = press(request)
    clock.now += 0.2
    reused = [press(request) for _ in range(3)]
    clock.now += 0.31  # 0.51 s after the first read: read anew
    again, after = press(request)

    assert len(first) == 3 and len(after) == 3, (first, after)  # devices, backlogs, insert
    assert [len(statements) for _, statements in reused] == [2, 2, 2]  # backlogs, insert
    # Each reused read still counted the work placed before it: one image to each device in turn.
    on = Counter(a.planned_device_id for a in [*placed, *[a for p, _ in reused for a in p], *again])
    assert on == {devices[0].pk: 3, devices[1].pk: 2} or on == {devices[0].pk: 2, devices[1].pk: 3}


def test_a_device_that_turns_unhealthy_within_the_window_is_seen_at_once_by_retries_and_pinned_work(
    reuse, clock, device_factory, request_factory
):
    fast = device_factory("H100", worker=True, speed=4.0)
    slow = device_factory("T4", worker=True, speed=1.0)
    request = request_factory()
    assert press(request)[0][0].planned_device_id == fast.pk  # and the devices are read

    device_set_unhealthy(device=fast, reason="Xid 79: GPU has fallen off the bus")
    clock.now += 0.1

    # A retry reads the devices anew and goes to the healthy one; work pinned to the device is
    # told it waits for the device to recover.
    (retry,), statements = press(request, whole=True)
    assert retry.planned_device_id == slow.pk and len(statements) == 3
    (pinned,), statements = press(request, pinned_device=Device.objects.get(pk=fast.pk))
    assert "(unhealthy: the images wait for it to recover)" in pinned.reason and len(statements) == 3
    # A press within the window still plans on the read from before (its worker admits no work
    # while its device is unhealthy, and the other workers steal it); once the window has passed,
    # presses pass the device by.
    (within,), statements = press(request)
    assert within.planned_device_id == fast.pk and len(statements) == 2
    clock.now += 0.5
    assert [a.planned_device_id for a in press(request, count=2)[0]] == [slow.pk]


def test_at_zero_every_press_reads_the_devices(settings, clock, device_factory, request_factory):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "PLACEMENT_READ_SECONDS": 0}
    device_factory("H100", worker=True, speed=1.0)
    request = request_factory()

    assert [len(press(request)[1]) for _ in range(3)] == [3, 3, 3]


def test_a_read_is_not_reused_for_another_model_or_another_lease(
    reuse, clock, device_factory, request_factory, settings
):
    device_factory("H100", worker=True, speed=1.0)
    request = request_factory()
    press(request)

    assert len(press(request, model="other@1", steps=25)[1]) >= 3  # another model's curves: read anew
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "LEASE_SECONDS": 30.0}
    assert len(press(request)[1]) == 3  # liveness is judged by the lease: read anew


@pytest.mark.parametrize("value", [-1, 10.5, "0.5", None, True])
def test_a_bad_read_age_in_code_is_error_e008(settings, value):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "PLACEMENT_READ_SECONDS": value}
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E008"
    assert f"GPU_PLACEMENT_READ_SECONDS={value!r}" in problem.msg
    assert "0.5" in problem.hint


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "GPU_PLACEMENT_READ_SECONDS=-1.0 is too small: it must be at least 0"),
        ("11", "GPU_PLACEMENT_READ_SECONDS=11.0 is too large: it must be at most 10"),
        ("soon", "GPU_PLACEMENT_READ_SECONDS='soon' is not a number"),
    ],
)
def test_a_bad_read_age_in_the_environment_stops_the_import_naming_it(tmp_path, value, message):
    from tests.processes import settings_in_a_fresh_process

    result = settings_in_a_fresh_process(
        tmp_path, "s.GPUSCHEDULER['PLACEMENT_READ_SECONDS']", GPU_PLACEMENT_READ_SECONDS=value
    )
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {message}" in result.stderr


def test_the_read_age_is_half_a_second_unless_the_environment_says_otherwise(tmp_path):
    from tests.processes import settings_in_a_fresh_process

    def read_age(**env: str) -> float:
        values = "s.GPUSCHEDULER['PLACEMENT_READ_SECONDS']"
        result = settings_in_a_fresh_process(tmp_path, values, unset=("GPU_PLACEMENT_READ_SECONDS",), **env)
        assert result.returncode == 0, result.stderr
        return float(result.stdout)

    assert read_age() == 0.5
    assert read_age(GPU_PLACEMENT_READ_SECONDS="0") == 0.0
    assert read_age(GPU_PLACEMENT_READ_SECONDS="2") == 2.0
