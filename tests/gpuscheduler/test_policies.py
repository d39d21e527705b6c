"""The placement and admission rules as pure functions: no database, no settings, no hardware."""

from __future__ import annotations

from typing import Any

import pytest

from gpuscheduler.curves import Curve
from gpuscheduler.planning import plan_chunks, plan_pinned
from gpuscheduler.policies import (
    GIB,
    POLICIES,
    DeviceView,
    Limits,
    admit,
    balanced,
    eligible,
    get_policy,
    least_memory,
    round_robin,
    steal_pays,
)

LIMITS = Limits(max_temperature=85.0, min_free_memory=2 * GIB)


def curve(speed: float = 1.0, saturation: int = 8) -> Curve:
    """A learned curve: a call of up to `saturation` images takes 1/speed seconds, and each image
    above that 1/(saturation*speed) more (the H100's shape, made round)."""
    return Curve(fixed=0.0, per_image=1.0 / (saturation * speed), knee=float(saturation), calls=10, sizes=3)


def gpu(id: int, **fields: Any) -> DeviceView:
    """An idle, healthy CUDA device with a live worker whose learned curve saturates at 8 images
    per call (`speed` and `saturation` shape its curve)."""
    shape = curve(fields.pop("speed", 1.0), fields.pop("saturation", 8))
    fields.setdefault("curve", shape)
    fields.setdefault("batch", shape.best_size(16))
    defaults: dict[str, Any] = {
        "label": f"GPU {id} H100",
        "kind": "cuda",
        "healthy": True,
        "worker_alive": True,
        "memory_used": 1 * GIB,
        "memory_total": 80 * GIB,
        "utilization": 0.0,
        "temperature": 35.0,
    }
    return DeviceView(id=id, **{**defaults, **fields})


def linear(id: int, **fields: Any) -> DeviceView:
    """A device whose call time grows with every image (CPU, simulated)."""
    return gpu(id, kind="simulated", label=f"SIM {id} sim", saturation=1, **fields)


def ids(ranked: list[Any]) -> list[int]:
    return [r.device.id for r in ranked]


def sizes(chunks: list[Any]) -> list[tuple[int, int, int]]:
    return [(c.device_id, c.first_index, c.size) for c in chunks]


# --- eligibility ----------------------------------------------------------------------------


def test_unhealthy_devices_are_not_eligible():
    assert [d.id for d in eligible([gpu(1, healthy=False), gpu(2), gpu(3, healthy=False)])] == [2]


def test_devices_with_a_live_worker_are_preferred():
    assert [d.id for d in eligible([gpu(1, worker_alive=False), gpu(2), gpu(3)])] == [2, 3]


def test_healthy_devices_without_workers_are_used_when_no_worker_is_alive():
    # Their queues are read by every worker that comes up, so work placed there is not lost.
    assert [d.id for d in eligible([gpu(1, worker_alive=False), gpu(2, worker_alive=False)])] == [1, 2]


def test_a_live_worker_on_an_unhealthy_device_does_not_make_it_eligible():
    assert [d.id for d in eligible([gpu(1, healthy=False), gpu(2, worker_alive=False)])] == [2]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_excludes_unhealthy_devices(name):
    ranked = POLICIES[name]([gpu(1, healthy=False), gpu(2), gpu(3, healthy=False)], 0)
    assert ids(ranked) == [2]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_nothing_when_no_device_is_healthy(name):
    assert POLICIES[name]([gpu(1, healthy=False)], 5) == []


def test_get_policy_names_the_choices_for_an_unknown_policy():
    assert get_policy("balanced") is balanced
    with pytest.raises(
        ValueError, match="Unknown GPU_POLICY 'fastest': use one of balanced, least_memory, round_robin"
    ):
        get_policy("fastest")


# --- least_memory ------------------------------------------------------------------------------


def test_least_memory_ranks_by_memory_occupancy():
    devices = [gpu(1, memory_used=60 * GIB), gpu(2, memory_used=8 * GIB), gpu(3, memory_used=30 * GIB)]
    ranked = least_memory(devices)
    assert ids(ranked) == [2, 3, 1]
    assert ranked[0].reason.startswith("least memory: GPU 2 H100: 10% memory used")


def test_least_memory_compares_fractions_not_bytes():
    # 20 GiB of 80 is emptier than 10 GiB of 24.
    ranked = least_memory([gpu(1, memory_used=10 * GIB, memory_total=24 * GIB), gpu(2, memory_used=20 * GIB)])
    assert ids(ranked) == [2, 1]


def test_least_memory_puts_devices_without_a_reading_last():
    ranked = least_memory([gpu(1, memory_used=None), gpu(2, memory_used=70 * GIB)])
    assert ids(ranked) == [2, 1]


# --- round_robin -------------------------------------------------------------------------------


def test_round_robin_starts_one_device_later_for_each_placement():
    devices = [gpu(3), gpu(1), gpu(2)]
    assert ids(round_robin(devices, 0)) == [1, 2, 3]
    assert ids(round_robin(devices, 1)) == [2, 3, 1]
    assert ids(round_robin(devices, 2)) == [3, 1, 2]
    assert ids(round_robin(devices, 3)) == [1, 2, 3]


def test_round_robin_ignores_load_and_says_whose_turn_it_is():
    ranked = round_robin([gpu(1, queued_images=50), gpu(2)], 4)
    assert ids(ranked) == [1, 2]
    assert ranked[0].reason.startswith("round robin turn 4 of 2: GPU 1 H100")


# --- balanced ----------------------------------------------------------------------------------


def test_balanced_prefers_the_device_with_less_work_placed():
    ranked = balanced([linear(1, queued_images=3), linear(2, running_images=1), linear(3)])
    assert ids(ranked) == [3, 2, 1]


def test_balanced_counts_running_and_queued_images_alike():
    ranked = balanced([gpu(1, queued_images=2, running_images=2), gpu(2, queued_images=3)])
    assert ids(ranked) == [2, 1]


def test_balanced_scales_backlog_by_speed():
    # Four queued images on a device four times as fast wait as long as one image on a slow one.
    fast = linear(1, queued_images=4, speed=4.0)
    slow = linear(2, queued_images=2, speed=1.0)
    assert ids(balanced([slow, fast])) == [1, 2]


def test_balanced_separates_equal_backlogs_by_utilization_memory_and_temperature():
    assert ids(balanced([gpu(1, utilization=90.0), gpu(2, utilization=5.0)])) == [2, 1]
    assert ids(balanced([gpu(1, memory_used=70 * GIB), gpu(2, memory_used=5 * GIB)])) == [2, 1]
    assert ids(balanced([gpu(1, temperature=80.0), gpu(2, temperature=45.0)])) == [2, 1]


def test_balanced_ties_go_to_the_lower_id():
    assert ids(balanced([gpu(2), gpu(1)])) == [1, 2]


def test_balanced_reason_describes_the_device():
    ranked = balanced([gpu(1, memory_used=int(9.6 * GIB), temperature=40.0, queued_images=0, utilization=None)])
    assert ranked[0].reason == "GPU 1 H100: 12% memory used, 40 C, 0 queued"


def test_balanced_reason_mentions_running_work_and_missing_readings():
    ranked = balanced([gpu(1, memory_used=None, utilization=93.0, temperature=None, queued_images=2, running_images=4)])
    assert ranked[0].reason == "GPU 1 H100: memory n/a, 93% busy, 2 queued + 4 running"


# --- plan_chunks: the split rule ---------------------------------------------------------------


def test_four_images_on_four_idle_gpus_stay_in_one_call():
    # Below saturation a call of 4 costs what a call of 1 does: splitting would not shorten the wait.
    ranked = balanced([gpu(1), gpu(2), gpu(3), gpu(4)])
    assert sizes(plan_chunks(4, ranked, max_batch=16)) == [(1, 0, 4)]


def test_sixteen_images_on_two_idle_gpus_split_eight_and_eight():
    ranked = balanced([gpu(1), gpu(2)])
    assert sizes(plan_chunks(16, ranked, max_batch=16)) == [(1, 0, 8), (2, 8, 8)]


def test_sixteen_images_on_four_idle_gpus_use_only_two():
    # Two full calls of 8 finish as soon as four calls of 4: the other two GPUs stay free.
    ranked = balanced([gpu(1), gpu(2), gpu(3), gpu(4)])
    assert sizes(plan_chunks(16, ranked, max_batch=16)) == [(1, 0, 8), (2, 8, 8)]


def test_linear_devices_split_images_one_per_device():
    ranked = balanced([linear(1), linear(2), linear(3), linear(4)])
    assert sizes(plan_chunks(4, ranked, max_batch=16)) == [(1, 0, 1), (2, 1, 1), (3, 2, 1), (4, 3, 1)]


def test_linear_devices_split_evenly_with_the_remainder_first():
    ranked = balanced([linear(1), linear(2)])
    assert sizes(plan_chunks(5, ranked, max_batch=16)) == [(1, 0, 3), (2, 3, 2)]


def test_one_image_is_never_split():
    assert sizes(plan_chunks(1, balanced([linear(1), linear(2)]), max_batch=16)) == [(1, 0, 1)]


def test_max_batch_forces_more_calls_even_on_one_device():
    ranked = balanced([gpu(1)])
    assert sizes(plan_chunks(10, ranked, max_batch=4)) == [(1, 0, 4), (1, 4, 3), (1, 7, 3)]


def test_max_batch_forces_more_calls_where_saturation_would_keep_them_together():
    ranked = balanced([gpu(1), gpu(2), gpu(3), gpu(4)])
    assert sizes(plan_chunks(4, ranked, max_batch=2)) == [(1, 0, 2), (2, 2, 2)]


def test_a_split_does_not_wait_behind_a_long_backlog():
    # Device 2's twelve queued images would finish the second half long after device 1 finishes all.
    ranked = balanced([linear(1), linear(2, queued_images=12)])
    assert sizes(plan_chunks(4, ranked, max_batch=16)) == [(1, 0, 4)]


def test_a_fast_device_takes_all_when_splitting_to_a_slow_one_would_not_help():
    ranked = balanced([linear(1, speed=4.0), linear(2, speed=0.25)])
    assert sizes(plan_chunks(4, ranked, max_batch=16)) == [(1, 0, 4)]


# --- steal_pays: when an idle worker takes another device's queued call -----------------------


def test_a_slow_gpu_leaves_a_busy_fast_gpus_next_call_alone():
    # The H100 finishes its running call and this one in 2 units; the T4 would need 4.
    h100 = gpu(1, running_images=8, queued_images=8)
    t4 = gpu(2, label="GPU 2 T4", speed=0.25)
    assert not steal_pays(t4, h100, 8)


def test_a_slow_gpu_steals_once_the_fast_gpus_backlog_is_deep_enough():
    h100 = gpu(1, running_images=8, queued_images=40)
    t4 = gpu(2, label="GPU 2 T4", speed=0.25)
    assert steal_pays(t4, h100, 8)


def test_an_idle_twin_takes_the_call_waiting_behind_a_running_one():
    assert steal_pays(gpu(2), gpu(1, running_images=1, queued_images=1), 1)


def test_nobody_steals_the_call_an_idle_owner_is_about_to_take():
    assert not steal_pays(linear(2), linear(1, queued_images=3), 3)


def test_an_idle_twin_takes_half_of_an_idle_owners_two_calls():
    assert steal_pays(gpu(2), gpu(1, queued_images=16), 8)


@pytest.mark.parametrize("owner", [gpu(1, healthy=False, queued_images=8), gpu(1, worker_alive=False, queued_images=8)])
def test_work_waiting_on_a_device_that_cannot_run_it_is_always_taken(owner):
    assert steal_pays(gpu(2, speed=0.01), owner, 8)


def test_chunks_carry_the_reason_of_their_device():
    ranked = balanced([linear(1), linear(2, utilization=50.0)])
    chunks = plan_chunks(2, ranked, max_batch=16)
    assert [c.reason for c in chunks] == [r.reason for r in ranked]
    assert "50% busy" in chunks[1].reason


def test_plan_chunks_refuses_an_empty_request_or_no_device():
    with pytest.raises(ValueError, match="at least 1"):
        plan_chunks(0, balanced([gpu(1)]), max_batch=16)
    with pytest.raises(ValueError, match="no device"):
        plan_chunks(4, [], max_batch=16)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 9, 16, 17, 31])
@pytest.mark.parametrize("devices", [1, 2, 3, 5])
def test_chunks_cover_every_image_exactly_once_within_the_batch_limit(count, devices):
    ranked = balanced([gpu(i) if i % 2 else linear(i) for i in range(1, devices + 1)])
    chunks = plan_chunks(count, ranked, max_batch=6)
    covered = [i for c in chunks for i in range(c.first_index, c.first_index + c.size)]
    assert covered == list(range(count))
    assert all(1 <= c.size <= 6 for c in chunks)


# --- plan_pinned -------------------------------------------------------------------------------


def test_plan_pinned_keeps_every_image_on_the_chosen_device():
    chunks = plan_pinned(6, gpu(7), max_batch=16, reason="chosen explicitly")
    assert sizes(chunks) == [(7, 0, 6)]
    assert chunks[0].reason == "chosen explicitly"


def test_plan_pinned_only_splits_at_the_batch_limit():
    chunks = plan_pinned(20, linear(3), max_batch=8, reason="chosen")
    assert sizes(chunks) == [(3, 0, 7), (3, 7, 7), (3, 14, 6)]


def test_plan_pinned_ignores_health():
    # An explicit choice waits for its device; admission, not placement, keeps work off it.
    assert sizes(plan_pinned(2, gpu(1, healthy=False, worker_alive=False), max_batch=16, reason="x")) == [(1, 0, 2)]


# --- admission ---------------------------------------------------------------------------------


def reading(**fields: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "ok": True,
        "error": "",
        "memory_used": 4 * GIB,
        "memory_total": 80 * GIB,
        "temperature": 50.0,
    }
    return {**defaults, **fields}


def test_admit_accepts_readings_within_limits():
    admission = admit(**reading(), limits=LIMITS)
    assert admission.ok
    assert admission.reason == "readings within limits"


def test_admit_accepts_a_device_whose_readings_are_unsupported():
    assert admit(**reading(memory_used=None, memory_total=None, temperature=None), limits=LIMITS).ok


def test_admit_refuses_a_device_nvml_cannot_read():
    admission = admit(**reading(ok=False, error="NVMLError_GpuIsLost: GPU is lost"), limits=LIMITS)
    assert not admission.ok
    assert admission.reason == "NVML error: NVMLError_GpuIsLost: GPU is lost"


def test_admit_refuses_a_failed_reading_without_error_text():
    admission = admit(**reading(ok=False, error=""), limits=LIMITS)
    assert (admission.ok, admission.reason) == (False, "NVML did not answer")


@pytest.mark.parametrize("temperature", [85.0, 97.0])
def test_admit_refuses_a_device_at_or_over_the_temperature_limit(temperature):
    admission = admit(**reading(temperature=temperature), limits=LIMITS)
    assert not admission.ok
    assert admission.reason == f"temperature {temperature:.0f} C is at or above the 85 C limit"


def test_admit_accepts_a_device_just_under_the_temperature_limit():
    assert admit(**reading(temperature=84.9), limits=LIMITS).ok


def test_admit_refuses_a_device_with_too_little_free_memory():
    admission = admit(**reading(memory_used=int(78.5 * GIB)), limits=LIMITS)
    assert not admission.ok
    assert admission.reason == "1.5 GiB free, below the 2.0 GiB the model needs"


def test_admit_accepts_exactly_the_free_memory_the_model_needs():
    assert admit(**reading(memory_used=78 * GIB), limits=LIMITS).ok


def test_an_nvml_error_is_reported_before_other_readings():
    admission = admit(**reading(ok=False, error="boom", temperature=99.0, memory_used=80 * GIB), limits=LIMITS)
    assert admission.reason == "NVML error: boom"


def test_balanced_placement_sends_chunks_where_they_finish_soonest_not_to_a_slow_device_ranked_second():
    fast_a = gpu(1, saturation=1)
    slow = gpu(2, saturation=1, speed=0.25, memory_used=0)  # emptiest, so ranked high
    fast_b = gpu(3, saturation=1, memory_used=20 * GIB)
    ranked = balanced([fast_a, slow, fast_b])
    assert [r.device.id for r in ranked][:2] == [2, 1], "the slow device ranks near the top"

    by_rank = plan_chunks(8, ranked, max_batch=16)
    by_finish = plan_chunks(8, ranked, max_batch=16, by_finish=True)

    assert sorted((c.device_id, c.size) for c in by_finish) == [(1, 4), (3, 4)]
    assert 2 in {c.device_id for c in by_rank}, "in rank order the slow device gets a share"
    assert [c.first_index for c in by_finish] == [0, 4]


def test_a_slow_device_still_helps_when_the_fast_ones_are_backed_up():
    fast = gpu(1, saturation=1, queued_images=40)
    slow = gpu(2, saturation=1, speed=0.25)
    chunks = plan_chunks(4, balanced([fast, slow]), max_batch=16, by_finish=True)
    assert {c.device_id for c in chunks} == {2}, "4 images on the idle T4 finish before 40 queued ahead on the fast one"


# --- mixed speeds: splitting behind a backlog, whole requests, calls about to end ----------------


def test_a_request_behind_a_burst_is_still_shared_where_that_shortens_its_own_wait():
    # Thirty images ahead on each: 2 + 2 ends at 32 s, 4 on one at 34 s. 6% of the whole wait, but
    # half of the request's own part of it.
    ranked = balanced([linear(1, queued_images=30), linear(2, queued_images=30)])
    assert sizes(plan_chunks(4, ranked, max_batch=16, by_finish=True)) == [(1, 0, 2), (2, 2, 2)]


def test_a_whole_request_goes_where_all_of_it_finishes_soonest_not_its_first_image():
    # The idle linear device makes one image first (1 s), but four in 4 s; the GPU behind a short
    # backlog makes all four in 2.5 s, in one call.
    idle = linear(1)
    busy = gpu(2, running_images=12)  # 1.5 s of work: its call of 12 images
    assert sizes(plan_chunks(4, balanced([idle, busy]), max_batch=16, by_finish=True)) == [(2, 0, 4)]


def test_a_slower_device_leaves_the_call_queued_behind_one_about_to_end():
    owner = linear(1, running_images=4, queued_images=4)  # 4 s running, 4 s queued
    thief = linear(2, speed=0.6)  # 6.7 s for those 4
    assert not steal_pays(thief, owner, 4, running_left=0.1)
    assert steal_pays(thief, owner, 4, running_left=4.0)
    assert not steal_pays(thief, owner, 4), "without the time left, half the running call is assumed left"
