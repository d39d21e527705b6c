"""The scheduler sits below personas: it imports nothing of it and runs sample work through the
job kind personas registers (gpuscheduler/workloads.py SampleWork)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils.module_loading import import_string

from gpuscheduler import queues, workloads
from gpuscheduler.assignments import assignment_claim, assignment_fail, assignments_place
from gpuscheduler.models import Assignment, AssignmentState
from gpuscheduler.recovery import assignments_recover
from personas.jobs import generate_samples
from personas.models import RequestState, SampleRequest
from personas.sample_work import SAMPLE_WORK
from personas.services import sample_request_submit

PACKAGE = Path(workloads.__file__).resolve().parent
# A dotted path into a module of personas (what rq or importlib would import), not a model label
# such as "personas.SampleRequest" (a foreign key's target) or a URL name.
MODULE_PATH = re.compile(r"^personas\.[a-z_]+\.[A-Za-z_]+")


def upward_references(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "personas"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "personas":
            found.append(f"from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.match(node.value):
            found.append(node.value)
    return found


def test_the_checker_finds_what_it_looks_for():
    source = (
        "import personas.models\nfrom personas.services import x\n"
        "def f():\n    from personas import jobs\n    return 'personas.jobs.generate_samples'\n"
    )
    assert upward_references(source) == [
        "personas.models",
        "from personas.services",
        "from personas",
        "personas.jobs.generate_samples",
    ]
    assert upward_references("x = 'personas.SampleRequest'\nfrom .models import Device\n") == []


def test_the_scheduler_imports_nothing_of_personas():
    files = [p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts]
    assert len(files) > 30
    upward = {
        str(p.relative_to(PACKAGE)): refs for p in files if (refs := upward_references(p.read_text(encoding="utf-8")))
    }
    assert upward == {}


def test_without_a_registered_sample_kind_the_scheduler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(workloads, "_sample_work", None)
    with pytest.raises(ImproperlyConfigured, match="add 'personas' to INSTALLED_APPS"):
        workloads.sample_work()


def test_personas_registers_its_sample_kind_at_start():
    assert workloads.sample_work() is SAMPLE_WORK
    assert import_string(SAMPLE_WORK.job) is generate_samples  # the path rq imports names the job


@pytest.fixture
def recorded(monkeypatch):
    """SAMPLE_WORK with every hook recorded (and the request reported inactive)."""
    calls: list[tuple[str, object]] = []

    def attempt_ended(attempt, discard_files):
        calls.append(("ended", (attempt.pk, discard_files)))
        SAMPLE_WORK.attempt_ended(attempt, discard_files)

    def repair_requests(now):
        calls.append(("repair", type(now).__name__))
        return [4242]

    work = dataclasses.replace(
        SAMPLE_WORK,
        job="tests.jobs.recorded",
        request_active=lambda request_id: calls.append(("active?", request_id)) or False,
        attempt_ended=attempt_ended,
        repair_requests=repair_requests,
    )
    monkeypatch.setattr(workloads, "_sample_work", work)
    return calls


@pytest.mark.django_db(transaction=True)
def test_the_scheduler_runs_sample_work_through_the_registered_hooks(recorded, persona, device_factory, redis_db):
    device = device_factory("H100", worker=True)
    request = sample_request_submit(persona=persona, count=1, enqueue=False).request
    (attempt,) = Assignment.objects.filter(request=request)
    assert assignment_claim(assignment_id=attempt.pk, device=device, worker_name="w", host="testhost", timeout=600)

    # The request is still active in the database; the hook says it is not: no retry is placed.
    assert assignment_fail(assignment_id=attempt.pk, error="boom") is None
    assert recorded[:2] == [("active?", request.pk), ("ended", (attempt.pk, False))]
    assert Assignment.objects.get(pk=attempt.pk).state == AssignmentState.FAILED
    # The hook the recording one forwards to refreshed the request: its one chunk failed.
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.FAILED

    # Recovery asks the registered kind to repair requests left without live work.
    assert assignments_recover().repaired_requests == [4242]
    assert ("repair", "datetime") in recorded

    # The job a queued attempt runs is the one registered.
    with transaction.atomic():
        (queued,) = assignments_place(request_id=request.pk, count=1, first_index=0, attempt=2)
    queues.enqueue_assignment(queued)
    job = queues.get_queue(queued.queue_name).fetch_job(queued.job_id)
    assert job is not None and job.func_name == "tests.jobs.recorded"
