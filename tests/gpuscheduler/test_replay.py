"""replay_schedule: recorded requests replayed through every policy as a discrete-event simulation."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from gpuscheduler.curves import Curve
from gpuscheduler.models import Assignment, Device
from gpuscheduler.policies import POLICIES
from gpuscheduler.replay import (
    Scenario,
    SimDevice,
    SimRequest,
    Workload,
    all_scenarios,
    baseline,
    replay,
    simulate,
)
from gpuscheduler.replay_trace import ReplayInputError, trace_parse
from gpuscheduler.workloads import default_key_and_steps
from personas.models import SampleRequest
from tests.conftest import learned_curve

H100 = Curve(fixed=0.11, per_image=0.17, knee=6.5, calls=40, sizes=4)
_jobs = itertools.count(1)


def workload(curves: list[Curve], requests: list[tuple[float, int]]) -> Workload:
    return Workload(
        devices=tuple(SimDevice(f"dev#{i + 1}", (c,)) for i, c in enumerate(curves)),
        requests=tuple(SimRequest(at, images) for at, images in sorted(requests)),
    )


def linear(per_image: float) -> Curve:
    return Curve(fixed=0.0, per_image=per_image, knee=1.0, calls=10, sizes=2)


# --- the simulator ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", all_scenarios(), ids=lambda s: f"{s.policy}-{s.steal}-{'on' if s.batching else 'off'}"
)
def test_two_equal_devices_share_a_burst_for_the_ideal_makespan(scenario: Scenario) -> None:
    # 8 one-image requests at once on two devices of 0.5 s an image: 4 images each, 2 s.
    outcome = simulate(workload([linear(0.5)] * 2, [(0.0, 1)] * 8), scenario, max_batch=16)
    assert outcome.makespan == pytest.approx(4 * 0.5)
    assert outcome.images == (4, 4)
    assert outcome.busy == pytest.approx((2.0, 2.0))
    assert outcome.calls == 8  # a linear curve gains nothing from a bigger call: its best size is 1
    assert outcome.load(0) == pytest.approx(1.0)


def test_every_request_is_made_once_and_the_busy_time_is_what_the_calls_cost() -> None:
    requests = [(0.3 * i, 1 + (i * 7) % 16) for i in range(60)]
    load = workload([H100, H100, linear(1.2)], requests)
    for scenario in all_scenarios():
        outcome = simulate(load, scenario, max_batch=16)
        assert sum(outcome.images) == load.images
        assert outcome.latency_p50 <= outcome.latency_p90 <= outcome.makespan
        # A device is never busy longer than the replay lasts.
        assert max(outcome.busy) <= outcome.makespan + 1e-9


def test_batching_makes_an_h100_burst_in_fewer_fuller_calls() -> None:
    load = workload([H100], [(0.0, 1)] * 32)
    on = simulate(load, Scenario("balanced", "speed", True), max_batch=16)
    off = simulate(load, Scenario("balanced", "speed", False), max_batch=16)
    best = H100.best_size(16)
    assert best > 1
    full, rest = divmod(32, best)
    assert on.calls == full + (1 if rest else 0)
    assert on.makespan == pytest.approx(full * H100.cost(best) + H100.cost(rest))
    assert off.calls == 32
    assert off.makespan == pytest.approx(32 * H100.cost(1))
    assert on.makespan < off.makespan / 3
    assert on.latency_p90 < off.latency_p90


def test_batching_joins_only_requests_of_the_same_model_and_steps() -> None:
    device = SimDevice("h100#1", (H100, H100))
    requests = tuple(SimRequest(0.0, 1, key=i % 2) for i in range(8))
    load = Workload(devices=(device,), requests=requests, keys=(("a", 25), ("b", 25)))
    outcome = simulate(load, Scenario("balanced", "speed", True), max_batch=16)
    assert outcome.calls == 2  # four of each model, one call each
    assert outcome.makespan == pytest.approx(2 * H100.cost(4))


def test_round_robin_is_worse_than_balanced_on_mixed_speeds() -> None:
    # One request every half second on a fast and a slow device: balanced keeps them on the fast
    # one, round robin sends every other one to the slow device, which is idle and starts it.
    load = workload([linear(0.1), linear(1.0)], [(0.5 * i, 1) for i in range(40)])
    balanced = simulate(load, Scenario("balanced", "speed", True), max_batch=16)
    rotated = simulate(load, Scenario("round_robin", "speed", True), max_batch=16)
    assert balanced.images == (40, 0)
    assert balanced.latency_p90 == pytest.approx(0.1)
    assert rotated.latency_p90 == pytest.approx(1.0)
    assert rotated.makespan > balanced.makespan


def test_speed_aware_stealing_leaves_a_fast_devices_work_to_it() -> None:
    # Everything is placed on the fast device; the slow one may take a chunk only where it would
    # finish it before the fast device is done with its own work.
    load = workload([linear(0.1), linear(2.0)], [(0.0, 1)] * 6)
    speed = simulate(load, Scenario("least_memory", "speed", False), max_batch=16)
    always = simulate(load, Scenario("least_memory", "always", False), max_batch=16)
    assert speed.images == (6, 0)
    assert speed.makespan == pytest.approx(0.6)
    assert always.images[1] >= 1
    assert always.makespan == pytest.approx(2.0)


def test_the_default_scenario_is_the_baseline() -> None:
    load = workload([H100, linear(1.0)], [(0.0, 4), (0.1, 8)])
    outcomes = replay(load, list(reversed(all_scenarios())), max_batch=16)
    assert baseline(outcomes).scenario == Scenario("balanced", "speed", True)


# --- the trace ----------------------------------------------------------------------------------


TRACE: dict[str, Any] = {
    "devices": [
        {"name": "H100", "fixed": 0.11, "per_image": 0.17, "knee": 6.5, "count": 2},
        {"name": "T4", "per_image": 1.2},
    ],
    "requests": [{"at": 0.0, "images": 4}, {"at": 0.4, "images": 16}, {"at": 0.2, "images": 1, "model": "tiny"}],
}


def test_a_trace_names_each_device_and_sorts_the_requests() -> None:
    load = trace_parse(TRACE)
    assert [d.name for d in load.devices] == ["H100#1", "H100#2", "T4#3"]
    assert load.devices[2].curves[0].per_image == 1.2
    assert [r.at for r in load.requests] == [0.0, 0.2, 0.4]
    assert load.keys == (("", 0), ("tiny", 0))
    assert load.images == 21


def test_an_unsorted_trace_replays_as_its_sorted_self() -> None:
    shuffled = {**TRACE, "requests": list(reversed(TRACE["requests"]))}
    scenario = Scenario("balanced", "speed", True)
    a = simulate(trace_parse(TRACE), scenario, max_batch=16)
    b = simulate(trace_parse(shuffled), scenario, max_batch=16)
    assert (a.makespan, a.latency_p90, a.busy) == (b.makespan, b.latency_p90, b.busy)


def with_device(**fields: Any) -> dict[str, Any]:
    return {**TRACE, "devices": [{**TRACE["devices"][0], **fields}]}


def with_request(**fields: Any) -> dict[str, Any]:
    return {**TRACE, "requests": [{"at": 0.0, "images": 1, **fields}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"requests": TRACE["requests"]}, '"devices" must be a non-empty list'),
        ({**TRACE, "devices": []}, '"devices" must be a non-empty list'),
        ({**TRACE, "requests": []}, '"requests" must be a non-empty list'),
        ({**TRACE, "extra": 1}, "unknown field(s) extra"),
        (
            with_device(per_image="fast"),
            'devices[0].per_image must be a number (seconds per image, above 0), not "fast"',
        ),
        (with_device(per_image=0), "devices[0].per_image is 0: it must be seconds per image, above 0"),
        (with_device(fixed=-1), "devices[0].fixed is -1"),
        (with_device(knee=0.5), "devices[0].knee is 0.5"),
        (with_device(count=0), "devices[0].count must be a whole number of devices from 1"),
        (with_device(count=True), "devices[0].count must be a whole number"),
        (with_device(name=""), "devices[0].name must be a short text"),
        (with_device(speed=2), "devices[0] has unknown field(s) speed: the fields are name, fixed, per_image"),
        ({**TRACE, "devices": [{"name": "H100"}]}, "devices[0].per_image is missing"),
        (with_request(images=-2), "requests[0].images must be a whole number from 1"),
        (with_request(images=2.5), "requests[0].images must be a whole number"),
        (with_request(at="soon"), 'requests[0].at must be a number (seconds, 0 or more), not "soon"'),
        (with_request(at=-1), "requests[0].at is -1"),
        (with_request(steps="many"), "requests[0].steps must be a whole number of steps"),
        ({**TRACE, "requests": [{"images": 1}]}, "requests[0].at is missing"),
        ({**TRACE, "requests": [4]}, 'requests[0] must be an object like {"at": 0.0, "images": 4}'),
    ],
)
def test_a_bad_trace_is_refused_naming_the_field_and_the_fix(data: Any, message: str) -> None:
    with pytest.raises(ReplayInputError) as caught:
        trace_parse(data)
    assert message in str(caught.value)


def write(tmp_path: Path, data: Any, name: str = "trace.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def run(*args: str) -> str:
    out = StringIO()
    call_command("replay_schedule", *args, stdout=out)
    return out.getvalue()


def test_the_command_replays_a_trace_under_every_combination(tmp_path: Path) -> None:
    output = run("--trace", write(tmp_path, TRACE))
    assert "Replaying 3 request(s), 21 image(s)" in output
    assert "H100#1 (H100): 1.22 s a call up to 6.5 images" in output
    rows = [line for line in output.splitlines() if line.split(" ")[0] in POLICIES]
    assert len(rows) == len(POLICIES) * 2 * 2
    default = next(r for r in rows if r.split()[:3] == ["balanced", "speed", "on"])
    assert default.split()[4] == "1.00"
    assert "T4#3" in default


def test_the_command_prints_json_that_parses(tmp_path: Path) -> None:
    report = json.loads(run("--trace", write(tmp_path, TRACE), "--json", "--policies", "balanced,round_robin"))
    assert report["requests"] == 3 and report["images"] == 21
    assert [d["name"] for d in report["devices"]] == ["H100#1", "H100#2", "T4#3"]
    assert len(report["results"]) == 2 * 2 * 2
    first = report["results"][0]
    assert (first["policy"], first["steal"], first["batching"], first["ratio"]) == ("balanced", "speed", True, 1.0)
    assert sum(d["images"] for d in first["devices"]) == 21
    assert first["latency_p50_seconds"] <= first["latency_p90_seconds"] <= first["makespan_seconds"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: give the path of a JSON trace"),
        ("{not json", "is not JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
        (json.dumps(with_request(images=-1)), "requests[0].images must be a whole number from 1"),
    ],
)
def test_the_command_refuses_a_bad_trace_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, content)
    with pytest.raises(CommandError) as caught:
        run("--trace", path)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "fastest"], "--policies: unknown fastest; use one or more of balanced"),
        (["--steal", "never"], "--steal: unknown never"),
        (["--batching", "maybe"], "--batching 'maybe': use on, off or both"),
        (["--max-batch", "0"], "--max-batch '0': give a whole number of images from 1 to 1024"),
        (["--since", "-3"], "--since '-3': give a number of hours above 0"),
        (["--since", "2", "--from", "2024-05-01"], "--since and --from both give the start"),
        (["--from", "yesterday"], "--from 'yesterday' is not a time: use ISO 8601"),
        (["--from", "2024-05-02", "--to", "2024-05-01"], "is not before --to"),
        (["--trace", "x.json", "--since", "2"], "give one or the other"),
    ],
)
def test_bad_options_are_refused_with_the_fix(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as caught:
        run(*args)
    assert message in str(caught.value)


# --- the history -----------------------------------------------------------------------------------


def placed(
    persona: Any, device: Device, *, images: list[int], minutes_ago: float, attempt: int = 1, **request: Any
) -> SampleRequest:
    """A sample request placed `minutes_ago` in chunks of `images`, as assignments_place stores it
    (of the default model at its steps unless `request` says otherwise)."""
    model, steps = default_key_and_steps()
    fields = {"model": model, "steps": steps, **request}
    row = SampleRequest.objects.create(persona=persona, count=sum(images), first_seed=1, state="succeeded", **fields)
    at = timezone.now() - timedelta(minutes=minutes_ago)
    first = 0
    for size in images:
        assignment = Assignment.objects.create(
            request=row,
            first_index=first,
            image_count=size,
            attempt=attempt,
            job_id=f"replay-{next(_jobs)}",
            queue_name=f"gpu-{device.pk}",
            planned_device=device,
            device=device,
            policy="balanced",
            reason="test",
            state="succeeded",
        )
        Assignment.objects.filter(pk=assignment.pk).update(queued_at=at)
        first += size
    return row


@pytest.mark.django_db
def test_the_command_replays_the_history_with_the_learned_curves(
    device_factory: Callable[..., Device], persona_factory: Callable[..., Any]
) -> None:
    fast = device_factory("H100")
    learned_curve(fast, fixed=0.11, per_image=0.17, knee=6.5)
    slow = device_factory("T4", speed=0.8)
    retired = device_factory("K80", speed=0.1, retired_at=timezone.now())
    placed(persona_factory(), fast, images=[4, 4], minutes_ago=50)
    placed(persona_factory(), slow, images=[1], minutes_ago=20)
    retry = placed(persona_factory(), fast, images=[2], minutes_ago=10)
    placed(retry.persona, slow, images=[2], minutes_ago=9, attempt=2)  # a retry: not a new request
    steps = default_key_and_steps()[1]
    placed(persona_factory(), fast, images=[3], minutes_ago=5, steps=steps * 2)
    placed(persona_factory(), fast, images=[16], minutes_ago=180)  # before the window

    output = run("--since", "1", "--steal", "speed", "--batching", "on")
    assert "Replaying 4 request(s), 14 image(s) (sample requests placed from" in output
    assert f"H100#{fast.pk} ({fast.label} on {fast.host}): 1.22 s a call up to 6.5 images" in output
    assert f"K80#{retired.pk}" not in output
    assert f"at {steps * 2} steps:" in output  # a second step count, its own curves
    rows = [line.split()[0] for line in output.splitlines() if line.split(" ")[0] in POLICIES]
    assert sorted(rows) == sorted(POLICIES)

    report = json.loads(run("--since", "1", "--json", "--policies", "balanced", "--batching", "off"))
    assert (report["requests"], report["images"]) == (4, 14)
    devices = {d["name"]: d for d in report["devices"]}
    assert set(devices) == {f"H100#{fast.pk}", f"T4#{slow.pk}"}
    slow_curves = {c["steps"]: c["per_image"] for c in devices[f"T4#{slow.pk}"]["curves"]}
    assert slow_curves[steps] == pytest.approx(1 / 0.8)
    assert slow_curves[2 * steps] == pytest.approx(2 / 0.8)  # borrowed from its own curve, scaled by the steps
    assert all(sum(d["images"] for d in r["devices"]) == 14 for r in report["results"])


@pytest.mark.django_db
def test_an_empty_window_says_how_to_widen_it(device_factory: Callable[..., Device]) -> None:
    device_factory("H100", speed=1.0)
    with pytest.raises(CommandError) as caught:
        run("--from", "2020-01-01", "--to", "2020-01-02T00:00")
    assert "No sample request was placed from 2020-01-01" in str(caught.value)
    assert "--since HOURS" in str(caught.value)


def test_percentiles_are_by_nearest_rank() -> None:
    from gpuscheduler.replay import percentile

    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([], 0.9) == 0.0
    assert math.isclose(percentile([float(i) for i in range(11)], 0.9), 9.0)


# As the workers learn them: a millisecond of fixed cost (an exact zero hides the ties the split
# rule meets on learned curves).
MIXED = tuple(
    SimDevice(name, (Curve(fixed=0.001, per_image=0.3 / speed, knee=1.0),))
    for name, speed in (("A", 1.0), ("B", 1.0), ("C", 0.5), ("D", 0.25))
)
IDEAL = 96 * 0.3 / 2.75  # every image spread in proportion to speed: 10.47 s


@pytest.mark.parametrize(("requests", "images"), [(24, 4), (6, 16)], ids=["24x4", "6x16"])
def test_a_mixed_speed_burst_ends_within_the_granularity_of_one_image_of_the_ideal(requests, images):
    burst = Workload(devices=MIXED, requests=tuple(SimRequest(at=0.0, images=images) for _ in range(requests)))
    outcome = simulate(burst, Scenario("balanced", "speed", True), max_batch=16)
    # 10.8 s (36 + 36 + 18 + 9 images at 0.3, 0.3, 0.6 and 1.2 s) is the first whole-image finish
    # that holds 96. It was 12.0 s (24 x 4) and 11.4 s (6 x 16) before.
    assert outcome.makespan < 1.04 * IDEAL
