"""Cost curves: the fit from timed calls, the best call size, and the fallbacks when nothing is known."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuscheduler import costs
from gpuscheduler.curves import PRIOR, Curve, Timing, fit, peer_curve
from gpuscheduler.models import CostCurve, PipelineCall
from gpuscheduler.workloads import default_key_and_steps
from personas.imagegen import h100_call_factor, parse_model, simulated_call_seconds

H100 = [(1, 1.23), (4, 1.26), (8, 1.48), (16, 2.85)]


def test_the_h100_measurements_give_a_knee_and_best_call_size():
    curve = fit(H100)
    assert curve is not None
    for size, seconds in H100:
        assert curve.cost(size) == pytest.approx(seconds, rel=0.05)
    assert 6 <= curve.knee <= 7
    # Calls of 7-8 reach 90 % of the throughput of 16 at half the wait; 4 are far below it.
    assert curve.best_size(16) in (7, 8)
    assert curve.throughput(4) < 0.7 * curve.throughput(16)
    assert "best at" in curve.describe(16) and "rests on 4 calls" in curve.describe(16)


def test_a_linear_device_is_a_line_through_zero_and_batching_gains_nothing():
    curve = fit([(1, 0.4), (2, 0.8), (4, 1.6), (4, 1.6)])
    assert curve is not None
    assert curve.fixed == pytest.approx(0.0, abs=1e-9)
    assert curve.per_image == pytest.approx(0.4)
    assert curve.best_size(16) == 1
    assert curve.describe(16).startswith("0.400 s per image")


def test_one_slow_call_moves_nothing():
    calls = [(4, 1.6)] * 9 + [(4, 30.0)] + [(1, 0.4)] * 5
    curve = fit(calls)
    assert curve is not None
    assert curve.cost(4) == pytest.approx(1.6, rel=0.01)


def test_only_the_latest_calls_of_a_size_count():
    # Newest first: the device got 2x faster (a driver update); the old calls fall out of the window.
    calls = [(1, 0.2)] * 25 + [(1, 0.4)] * 100
    curve = fit(calls)
    assert curve is not None
    assert curve.cost(1) == pytest.approx(0.2)


def test_one_call_size_alone_assumes_no_batching_gain():
    curve = fit([(4, 2.0)])
    assert curve == Curve(fixed=0.0, per_image=0.5, knee=1.0, calls=1, sizes=1)


def test_nothing_usable_gives_no_curve():
    assert fit([]) is None
    assert fit([(0, 1.0), (3, float("nan")), (2, -1.0)]) is None


@given(
    fixed=st.floats(0.0, 2.0),
    per_image=st.floats(0.01, 1.0),
    knee=st.integers(1, 12),
)
def test_the_fit_recovers_a_noise_free_curve(fixed, per_image, knee):
    truth = Curve(fixed=fixed, per_image=per_image, knee=float(knee))
    learned = fit([(n, truth.cost(n)) for n in (1, 2, 4, 8, 12, 16)])
    assert learned is not None
    for n in range(1, 17):
        assert learned.cost(n) == pytest.approx(truth.cost(n), rel=0.03)


def test_work_splits_into_calls_of_the_batch():
    curve = Curve(fixed=1.0, per_image=0.1, knee=1.0)
    assert curve.work(0, 8) == 0
    assert curve.work(20, 8) == pytest.approx(2 * curve.cost(8) + curve.cost(4))


def test_peers_median_stands_in_for_an_unknown_device():
    assert peer_curve([]) is PRIOR
    borrowed = peer_curve([Curve(0, 0.2, calls=5), Curve(0, 0.4, calls=5), Curve(0, 1.0, calls=5)])
    assert borrowed.per_image == pytest.approx(0.4)
    assert borrowed.source == "peers" and borrowed.calls == 0


# --- the simulated models: their truth, which only the generator knows ---------------------


def test_simulated_h100_follows_the_measured_curve():
    spec = parse_model("simulated-h100:1.23")
    assert spec.kind == "simulated" and spec.curve == "h100"
    assert h100_call_factor(1) == 1.0
    assert h100_call_factor(16) * 1.23 == pytest.approx(2.85)
    assert h100_call_factor(12) == pytest.approx((1.48 + 2.85) / 2 / 1.23)
    for size, seconds in H100:
        assert simulated_call_seconds(spec, size, 1.0) == pytest.approx(seconds, rel=0.04)
    # Half the speed: every call takes twice as long.
    assert simulated_call_seconds(parse_model("simulated:0.5"), 3, 0.5) == pytest.approx(3.0)


def test_the_learned_curve_of_a_noisy_simulated_h100_is_within_ten_percent():
    spec = parse_model("simulated-h100:1.23")
    rng = random.Random(7)
    calls = [(n, simulated_call_seconds(spec, n, 1.0)) for n in rng.choices([1, 2, 4, 8, 12, 16], k=60)]
    learned = fit(calls)
    assert learned is not None
    for size, seconds in H100:
        assert learned.cost(size) == pytest.approx(seconds, rel=0.10)


# --- stored curves ---------------------------------------------------------------------------


def test_recorded_calls_are_fitted_into_the_devices_curve(device_factory):
    device = device_factory("T4")
    model, steps = default_key_and_steps()
    for size in (1, 2, 4):
        costs.call_record(device=device, model=model, steps=steps, timing=Timing(size, 0.5 * size, 64, 64))
    row = CostCurve.objects.get(device=device, model=model, steps=steps)
    assert row.per_image_seconds == pytest.approx(0.5)
    assert (row.calls, row.sizes) == (3, 3)
    assert PipelineCall.objects.filter(device=device).count() == 3
    assert costs.curves_for([device.pk])[device.pk].per_image == pytest.approx(0.5)
    assert not costs.needs_calibration(device=device, model=model, steps=steps)


def test_devices_without_calls_borrow_from_their_peers_then_from_other_step_counts(device_factory):
    from tests.conftest import learned_curve

    model, steps = default_key_and_steps()
    known, new = device_factory("H100"), device_factory("H100")
    assert costs.curves_for([new.pk])[new.pk] is PRIOR
    learned_curve(known, per_image=0.25)
    curves = costs.curves_for([known.pk, new.pk])
    assert curves[known.pk].source == "learned"
    assert curves[new.pk].source == "peers" and curves[new.pk].per_image == pytest.approx(0.25)
    # Its own curve at another step count beats its peers': scaled by the steps.
    CostCurve.objects.create(
        device=new, model=model, steps=steps * 2, fixed_seconds=0.0, per_image_seconds=1.0, calls=3, sizes=2
    )
    assert costs.curves_for([new.pk])[new.pk].per_image == pytest.approx(0.5)
    assert costs.needs_calibration(device=new, model=model, steps=steps)


def test_a_model_nobody_has_timed_costs_what_the_devices_other_models_cost(device_factory):
    from gpuscheduler.costs import curves_for
    from gpuscheduler.models import CostCurve

    timed, fresh = device_factory("H100"), device_factory("T4")
    CostCurve.objects.create(
        device=timed, model="other@00000000", steps=10, fixed_seconds=1.0, per_image_seconds=0.2, calls=30, sizes=3
    )

    curves = curves_for([timed.pk, fresh.pk], model="new@11111111", steps=20)

    assert curves[timed.pk].source == "models"
    assert (curves[timed.pk].fixed, curves[timed.pk].per_image) == pytest.approx((2.0, 0.4))  # twice the steps
    assert "no calls of this model yet: as its other models cost" in curves[timed.pk].describe(16)
    assert curves[fresh.pk].source == "prior"  # it has timed nothing
