"""The scheduler learns each device's cost from its timed calls, never from the simulated truth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gpuscheduler import costs
from gpuscheduler.models import Assignment, CostCurve, Device, PipelineCall
from personas.image_models import default_model, spec_of
from personas.models import RequestState, SampleRequest
from personas.services import sample_request_submit
from tests.processes import wait_for

ROOT = Path(__file__).resolve().parent.parent
# Where a simulated device's speed may be read: the simulated backend, the backend interface that
# carries it to the worker, and the image generator that sleeps for it.
TRUTH_READERS = {
    "gpuscheduler/simulated.py",
    "gpuscheduler/backends.py",
    "gpuscheduler/worker.py",
    "personas/imagegen.py",
}


def test_no_scheduler_code_reads_a_device_speed():
    """Placement, stealing, batching and pages know a device only by its learned curve."""
    readers = []
    for path in sorted([*ROOT.glob("gpuscheduler/**/*.py"), *ROOT.glob("personas/**/*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative in TRUTH_READERS or "/migrations/" in relative:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "speed":
                readers.append(f"{relative}:{node.lineno}")
    assert readers == [], f"these read a device's speed: {readers}"
    assert not any(field.name == "speed" for field in Device._meta.get_fields())


def test_worker_building_its_generator_is_the_only_worker_line_that_passes_the_truth():
    source = (ROOT / "gpuscheduler/worker.py").read_text()
    lines = [line.strip() for line in source.splitlines() if ".speed" in line]
    assert lines == ["generator = workloads.sample_work().generator(info.kind, info.uuid, info.speed)"]


@pytest.mark.e2e
def test_the_scheduler_learns_speeds_it_is_never_told(cluster, persona_factory):
    # The workers run on the truth: "fast" makes an image in 0.2 s, "slow" in 2 s. This test
    # process, where placement runs, is told the opposite; a scheduler that read GPU_SIMULATED
    # (or anything derived from it) would send the work to "slow".
    cluster.configure(GPU_SIMULATED="fast:0.1,slow", SAMPLES_MODEL="simulated:0.2", SAMPLES_CALIBRATION="1")
    cluster.start("gpuworkers", env={"GPU_SIMULATED": "fast,slow:0.1"})
    cluster.wait_workers(expect=2)
    fast, slow = Device.objects.get(name="fast"), Device.objects.get(name="slow")
    default = default_model()  # what the workers calibrated: the default model, at its steps
    model, steps = spec_of(default)["key"], default.steps

    # Calibrated at start, from one timed call each.
    assert PipelineCall.objects.filter(device=fast, calibration=True).exists()
    curves = costs.curves_for([fast.pk, slow.pk], model=model, steps=steps)
    assert 0.19 <= curves[fast.pk].per_image < 0.4
    assert 1.9 <= curves[slow.pk].per_image < 3.0

    # Work goes where the learned curve says it is done soonest: 4 images on fast (0.8 s) beat
    # any split with slow (a call of 1 there takes 2 s).
    first = sample_request_submit(persona=persona_factory(), count=4).request
    assert (first.model, first.steps) == (model, steps)
    placed = list(Assignment.objects.filter(request=first).values_list("planned_device", "image_count", "reason"))
    assert {p[0] for p in placed} == {fast.pk}, (placed, curves)
    requests = [first] + [sample_request_submit(persona=persona_factory(), count=2).request for _ in range(3)]
    for request in requests:
        wait_for(
            lambda r=request: SampleRequest.objects.get(pk=r.pk).state == RequestState.SUCCEEDED,
            60,
            lambda: f"the requests to succeed\n{cluster.logs()}",
        )
    # Every real call was timed and the curves refitted from them. A sleep only ever overshoots, by
    # however busy the machine is: the learned image costs no less than the truth and tells the
    # devices apart by about their real ratio (10x); bench/bench_learning.py measures how close.
    fitted = {row.device_id: row for row in CostCurve.objects.filter(model=model, steps=steps)}
    assert fitted[fast.pk].calls > 1
    one_image = fitted[fast.pk].per_image_seconds + fitted[fast.pk].fixed_seconds
    assert 0.19 <= one_image < 0.4
    assert curves[slow.pk].per_image / curves[fast.pk].per_image > 5
    made_on_fast = PipelineCall.objects.filter(device=fast, calibration=False).count()
    assert made_on_fast >= 1
    assert (
        Assignment.objects.filter(request__in=requests, device=fast).count()
        >= Assignment.objects.filter(request__in=requests, device=slow).count()
    )


@pytest.mark.e2e
def test_a_failing_calibration_leaves_the_device_in_service(cluster, persona_factory):
    from gpuscheduler import simulated

    cluster.configure(GPU_SIMULATED="sim*1", SAMPLES_MODEL="simulated:0.1", SAMPLES_CALIBRATION="1,2")
    (info,) = simulated.describe("sim*1", cluster.settings.GPUSCHEDULER["HOST"])
    simulated.set_faults(info.uuid, fail="calibration breaks")
    cluster.start_workers(expect=1)
    device = Device.objects.get(uuid=info.uuid)
    assert device.health == "healthy", device.health_reason
    assert not PipelineCall.objects.filter(device=device).exists()
    assert "calibration failed; learning its cost from real calls" in cluster.logs()

    simulated.clear_faults(info.uuid)
    request = sample_request_submit(persona=persona_factory(), count=2).request
    wait_for(
        lambda: SampleRequest.objects.get(pk=request.pk).state == RequestState.SUCCEEDED,
        60,
        lambda: f"the request to succeed\n{cluster.logs()}",
    )
    assert PipelineCall.objects.filter(device=device, calibration=False).exists()
