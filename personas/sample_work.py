"""The sample job kind as the scheduler runs it (gpuscheduler.workloads.SampleWork), registered
in PersonasConfig.ready(): the scheduler below calls these and imports nothing of this app."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from gpuscheduler.models import LIVE_STATES, Assignment
from gpuscheduler.workloads import SampleWork
from personas.models import ACTIVE_REQUEST_STATES, SampleRequest
from personas.services import sample_attempt_files_remove, sample_request_refresh, sample_requests_refresh

# The rq job that runs one attempt (personas/jobs.py), by the path rq stores with each job.
JOB = "personas.jobs.generate_samples"


def request_active(request_id: int) -> bool:
    """May the request still take images? A retry of a cancelled or finished one is not placed."""
    return SampleRequest.objects.filter(pk=request_id, state__in=ACTIVE_REQUEST_STATES).exists()


def attempt_ended(attempt: Assignment, discard_files: bool) -> None:
    """An attempt of a request ended without success: its request's state, and the files it may
    have left."""
    assert attempt.request_id is not None, "the scheduler tells only of attempts of a request"
    if discard_files:
        sample_attempt_files_remove(assignment=attempt)
    sample_request_refresh(request_id=attempt.request_id)


def repair_requests(now: datetime) -> list[int]:
    """Active requests with no live attempt left (a crash between two writes) get their final
    state; at most 100 in one pass (recovery runs every few seconds), in a fixed number of queries."""
    orphaned = list(
        SampleRequest.objects.filter(state__in=ACTIVE_REQUEST_STATES, created__lt=now - timedelta(seconds=5))
        .exclude(assignments__state__in=LIVE_STATES)
        .values_list("pk", flat=True)[:100]
    )
    if orphaned:
        sample_requests_refresh(request_ids=orphaned)
    return orphaned


def generator(kind: str, uuid: str, speed: float) -> Any:
    """The Generator a worker runs its calls on (torch is imported only once it loads a model)."""
    from personas.imagegen import Generator, Target

    return Generator(Target(kind=kind, uuid=uuid, speed=speed))


SAMPLE_WORK = SampleWork(
    job=JOB,
    request_active=request_active,
    attempt_ended=attempt_ended,
    repair_requests=repair_requests,
    generator=generator,
)
