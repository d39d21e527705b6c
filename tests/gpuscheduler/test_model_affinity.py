"""Model affinity in placement: a device that has the request's model warm is preferred unless
waiting for it costs more than loading the model elsewhere; a model that failed to load on a
device takes only that pair out of service."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from gpuscheduler.models import Device, DeviceModel, ModelState
from gpuscheduler.placement import NoDeviceAvailable, assignments_place
from gpuscheduler.placement_reads import LOAD_GUESS_SECONDS, device_views, will_have
from personas.models import SampleRequest

MODEL = "portrait@0badcafe"
STEPS = 2


@pytest.fixture
def place(persona_factory: Any) -> Any:
    def run(count: int = 1, model: str = MODEL) -> list[int]:
        request = SampleRequest.objects.create(
            persona=persona_factory(), count=count, first_seed=0, model=model, steps=STEPS
        )
        with transaction.atomic():
            placed = assignments_place(request_id=request.pk, count=count, model=model, steps=STEPS)
        return [a.planned_device_id for a in placed]

    return run


def loaded(device: Device, state: str = ModelState.WARM, *, seconds: float | None = 4.0, reason: str = "") -> None:
    DeviceModel.objects.create(device=device, model=MODEL, state=state, load_seconds=seconds, loads=1, reason=reason)


def queue_images(device: Device, images: int, persona_factory: Any, model: str = MODEL) -> None:
    """`images` of `model` queued on `device`, as an earlier placement would have left them."""
    from gpuscheduler.models import Assignment

    request = SampleRequest.objects.create(
        persona=persona_factory(), count=images, first_seed=0, model=model, steps=STEPS
    )
    Assignment.objects.create(
        request=request,
        image_count=images,
        job_id=f"queued-{request.pk}",
        queue_name=f"gpu.{device.pk}",
        planned_device=device,
        policy="balanced",
        reason="test",
    )


def test_an_idle_device_with_the_model_warm_is_chosen_over_an_idle_one_without(device_factory, place):
    cold = device_factory("H100", worker=True)
    warm = device_factory("H100", worker=True)
    assert cold.pk < warm.pk  # without affinity the tie goes to the lower id
    loaded(warm)

    assert place() == [warm.pk]


def test_affinity_off_ignores_warm_models(device_factory, place, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_AFFINITY": False}
    cold = device_factory("H100", worker=True)
    warm = device_factory("H100", worker=True)
    loaded(warm)

    assert place() == [cold.pk]


def test_a_warm_device_whose_queue_takes_longer_than_a_load_elsewhere_is_passed_over(
    device_factory, place, persona_factory
):
    cold = device_factory("H100", worker=True)
    warm = device_factory("H100", worker=True)
    loaded(warm)
    loaded(cold, ModelState.EVICTED, seconds=4.0)  # it loaded the model once, in 4 s
    # By the prior curve (1 s an image) the warm device's 8 queued images take 8 s; loading on the
    # idle device takes 4 s, and the image 1 s more.
    queue_images(warm, 8, persona_factory)

    assert place() == [cold.pk]


def test_a_warm_device_is_still_chosen_while_waiting_for_it_costs_less_than_a_load(
    device_factory, place, persona_factory
):
    cold = device_factory("H100", worker=True)
    warm = device_factory("H100", worker=True)
    loaded(warm)
    loaded(cold, ModelState.EVICTED, seconds=4.0)
    queue_images(warm, 2, persona_factory)  # 2 s of work against a 4 s load

    assert place() == [warm.pk]


def test_the_load_guess_is_the_devices_own_then_its_peers_then_the_default(device_factory):
    own = device_factory("H100", worker=True)
    peer = device_factory("H100", worker=True)
    never = device_factory("H100", worker=True)
    DeviceModel.objects.create(device=own, model=MODEL, state=ModelState.EVICTED, load_seconds=3.0)
    DeviceModel.objects.create(device=peer, model=MODEL, state=ModelState.EVICTED, load_seconds=7.0)

    views = {v.id: v for v in device_views(model=MODEL, steps=STEPS)}
    assert (views[own.pk].warm, views[own.pk].load_seconds) == (False, 3.0)
    assert views[never.pk].load_seconds == 5.0  # the median of the two measured loads

    other = {v.id: v for v in device_views(model="never-loaded@00000000", steps=STEPS)}
    assert {v.load_seconds for v in other.values()} == {LOAD_GUESS_SECONDS}


def test_a_model_that_failed_to_load_takes_only_that_pair_out_of_service(device_factory, place):
    broken = device_factory("H100", worker=True)
    fine = device_factory("H100", worker=True)
    loaded(broken, ModelState.FAILED, seconds=None, reason="no model_index.json in /models/portrait")

    assert place() == [fine.pk]
    assert place(model="another@12345678") == [broken.pk]  # the device still serves other models
    view = next(v for v in device_views(model=MODEL, steps=STEPS) if v.id == broken.pk)
    assert not view.healthy
    assert view.blocked == "unable to load this model (no model_index.json in /models/portrait)"


def test_when_every_device_failed_to_load_the_model_placement_says_why(device_factory, place):
    only = device_factory("H100", worker=True)
    loaded(only, ModelState.FAILED, seconds=None, reason="ModelError: bad weights")

    with pytest.raises(NoDeviceAvailable, match=r"unable to load this model \(ModelError: bad weights\)"):
        place()


def test_the_status_page_and_gpustatus_show_each_devices_models(device_factory, user_factory, client):
    from io import StringIO

    from django.core.management import call_command
    from django.urls import reverse

    one = device_factory("H100")
    two = device_factory("T4")
    loaded(one, seconds=2.25)
    DeviceModel.objects.create(device=one, model="tiny-128@12345678", state=ModelState.EVICTED, load_seconds=0.5)
    loaded(two, ModelState.FAILED, seconds=None, reason="cannot load model '/m/x': no model_index.json")
    client.force_login(user_factory(perms=("gpuscheduler.view_gpu_status",)))

    data = client.get(reverse("admin:gpuscheduler_gpustatuspage_data")).json()
    page = client.get(reverse("admin:gpuscheduler_gpustatuspage_changelist")).content.decode()
    out = StringIO()
    call_command("gpustatus", stdout=out)

    cards = {d["id"]: d for d in data["devices"]}
    assert [(m["name"], m["state"]) for m in cards[one.pk]["models"]] == [("portrait", "warm"), ("tiny-128", "evicted")]
    assert cards[one.pk]["models"][0]["text"] == "loaded in 2.2 s, 1 load"
    assert [(m["name"], m["state"]) for m in cards[two.pk]["models"]] == [("portrait", "failed")]
    assert "portrait (warm)" in page and "tiny-128 (evicted)" in page
    assert "portrait (failed: cannot load model &#x27;/m/x&#x27;: no model_index.json)" in page
    assert "models: portrait (warm), tiny-128 (evicted)" in out.getvalue()
    assert "models: portrait (failed: cannot load model '/m/x': no model_index.json)" in out.getvalue()


def test_a_device_with_queued_work_of_the_model_counts_as_having_it_warm(device_factory, place, persona_factory):
    # Neither device has reported the model: in a burst, placement runs before any load.
    holding = device_factory("H100", worker=True)
    idle = device_factory("H100", worker=True)
    queue_images(holding, 2, persona_factory)  # 2 s of the same model ahead (the prior curve)

    assert place() == [holding.pk]  # against 5 s (the guess) to load it on the idle one
    assert place(model="another@12345678") == [idle.pk]  # another model: both would load it


def test_without_affinity_queued_work_of_the_model_counts_for_nothing(device_factory, place, persona_factory, settings):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_AFFINITY": False}
    holding = device_factory("H100", worker=True)
    idle = device_factory("H100", worker=True)
    queue_images(holding, 2, persona_factory)

    assert place() == [idle.pk]


@pytest.mark.parametrize(
    ("warm_now", "live", "slots", "expected"),
    [
        (True, None, 1, True),  # nothing ahead of it: what is warm now
        (False, None, 2, False),
        (False, ("m", frozenset({"m"})), 1, True),  # its newest work loads the model
        (True, ("other", frozenset({"other"})), 1, False),  # the work ahead evicts it from a cache of one
        (True, ("other", frozenset({"other"})), 2, True),  # ... but not from a cache of two
        (False, ("other", frozenset({"m", "other"})), 2, True),  # loaded by earlier work, kept beside the other
        (False, ("c", frozenset({"m", "b", "c"})), 2, False),  # three models through a cache of two
        (False, ("other", frozenset({"other"})), 2, False),  # nobody loads it
    ],
)
def test_will_have_counts_what_the_work_ahead_loads_and_evicts(warm_now, live, slots, expected):
    assert will_have("m", warm_now=warm_now, live=live, slots=slots) is expected


def test_queued_work_of_another_model_ahead_takes_the_warm_model_away_from_a_cache_of_one(
    device_factory, place, persona_factory, settings
):
    settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, "MODEL_CACHE": 1}
    busy = device_factory("H100", worker=True)
    other = device_factory("H100", worker=True)
    loaded(busy)
    loaded(other, ModelState.EVICTED, seconds=4.0)
    queue_images(busy, 1, persona_factory, model="another@12345678")  # 1 s ahead, then a load back

    assert next(v for v in device_views(model=MODEL, steps=STEPS) if v.id == busy.pk).warm is False
    assert place() == [other.pk]  # 4 s to load here against 1 s + 4 s there


def test_a_split_that_makes_two_devices_load_the_model_to_save_one_image_does_not_pay():
    from gpuscheduler.curves import Curve
    from gpuscheduler.planning import plan_chunks
    from gpuscheduler.policies import DeviceView, balanced

    def view(id: int, warm: bool) -> DeviceView:
        curve = Curve(fixed=0.0, per_image=0.1, calls=10, sizes=2)  # 0.1 s an image, nothing per call
        return DeviceView(
            id=id,
            label=f"SIM {id}",
            kind="simulated",
            healthy=True,
            worker_alive=True,
            curve=curve,
            batch=1,
            warm=warm,
            load_seconds=5.0,
        )

    cold = [view(1, False), view(2, False)]
    warm = [view(1, True), view(2, True)]
    assert [(c.device_id, c.size) for c in plan_chunks(2, balanced(cold), max_batch=16, by_finish=True)] == [(1, 2)]
    assert [(c.device_id, c.size) for c in plan_chunks(2, balanced(warm), max_batch=16, by_finish=True)] == [
        (1, 1),
        (2, 1),
    ]
