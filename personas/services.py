"""Writes of the personas app: sample requests from button to finished images."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.template.defaultfilters import pluralize

from config.storage import PART_SUFFIX, samples_storage, storage_errors
from gpuscheduler import assignments as scheduler
from gpuscheduler import queues
from gpuscheduler.clock import DbNow
from gpuscheduler.conf import samples_config
from gpuscheduler.models import LIVE_STATES, Assignment, AssignmentState, Device
from personas.image_models import model_for, spec_of
from personas.models import (
    ACTIVE_REQUEST_STATES,
    MAX_SEED,
    ImageModel,
    Persona,
    RequestSource,
    RequestState,
    SampleImage,
    SampleRequest,
)
from personas.thumbnails import THUMBNAIL_FORMATS, thumbnail_name

log = logging.getLogger(__name__)


class RequestAlreadyActive(Exception):
    def __init__(self, request: SampleRequest) -> None:
        super().__init__(f"{request.persona} already has {request.count} images {request.get_state_display().lower()}.")
        self.request = request


@dataclass
class Submitted:
    """What a press of the button did: the request, where its chunks went, whether Redis has them."""

    request: SampleRequest
    assignments: list[Assignment]
    enqueued: int = 0
    by_device: dict[str, int] = field(default_factory=dict)

    @property
    def waiting_for_redis(self) -> bool:
        return self.enqueued < len(self.assignments)

    def summary(self) -> str:
        where = ", ".join(f"{n} on {label}" for label, n in self.by_device.items())
        return f"{images_text(self.request.count)} of {self.request.persona}: {where}"


def images_text(count: int) -> str:
    """ "1 image", "4 images"."""
    return f"{count} image{pluralize(count)}"


def validate_count(count: object) -> int:
    """A sample count from a form or a command line: a whole number in 1..SAMPLES_MAX_PER_REQUEST."""
    from config.numbers import parse_ascii_int, shown

    maximum = int(samples_config()["MAX_PER_REQUEST"])
    try:
        # ASCII digits only: int() also reads '٤', '1_6' and '+4' as numbers.
        number = parse_ascii_int(count, what="The count", signed=True)
    except ValueError:
        raise ValidationError(
            f"The count must be a whole number from 1 to {maximum}. Write it with the digits 0-9, like 4; "
            f"got {shown(count)}.",
            code="invalid",
        ) from None
    if not 1 <= number <= maximum:
        raise ValidationError(
            f"The count must be from 1 to {maximum} (SAMPLES_MAX_PER_REQUEST); {number} is out of range.",
            code="range",
        )
    return number


def sample_request_submit(
    *,
    persona: Persona,
    count: int,
    device: Device | None = None,
    user: Any = None,
    source: str = RequestSource.ADMIN,
    enqueue: bool = True,
    require_worker: bool = True,
    model: ImageModel | None = None,
) -> Submitted:
    """Create a request, place its chunks and enqueue them once the transaction commits.

    `model` (a command's --model) is used instead of the persona's own model. Raises
    RequestAlreadyActive when the persona already has a queued or running request (enforced by
    a unique constraint, so it holds for simultaneous presses too), NoDeviceAvailable when no
    device may take work, and ModelUnavailable when the model is disabled (or `model` was
    deleted). Either way nothing is written. The request records the model as it is now
    (personas/image_models.py): later edits of the model or the persona do not change it.
    """
    count = validate_count(count)
    with transaction.atomic():
        locked = Persona.objects.select_for_update().get(pk=persona.pk)
        # `model`, its own or the default; ModelUnavailable if disabled.
        image_model = model_for(locked, override=model)
        spec = spec_of(image_model)
        try:
            with transaction.atomic():
                request = SampleRequest.objects.create(
                    persona=locked,
                    count=count,
                    device=device,
                    requested_by=user if getattr(user, "pk", None) else None,
                    source=source,
                    first_seed=(locked.base_seed + locked.images_requested) % (MAX_SEED + 1),
                    model=spec["key"],
                    image_model=image_model,
                    model_spec=spec,
                    steps=image_model.steps,
                )
        except IntegrityError:
            active = SampleRequest.objects.filter(persona=locked, state__in=ACTIVE_REQUEST_STATES).first()
            if active is None:
                raise
            raise RequestAlreadyActive(active) from None
        Persona.objects.filter(pk=locked.pk).update(images_requested=F("images_requested") + count)
        assignments = scheduler.assignments_place(
            request_id=request.pk,
            count=count,
            pinned_device=device,
            require_worker=require_worker,
            model=request.model,
            steps=request.steps,
        )
        submitted = Submitted(request=request, assignments=assignments)
        labels = Device.objects.in_bulk([a.planned_device_id for a in assignments])
        tally: Counter[str] = Counter()
        for a in assignments:
            tally[labels[a.planned_device_id].label] += a.image_count
        submitted.by_device = dict(sorted(tally.items()))

        if enqueue:
            scheduler.enqueue_on_commit(assignments, on_done=lambda done: setattr(submitted, "enqueued", done))
    log.info("request %s: %s", request.pk, submitted.summary())
    return submitted


def sample_request_refresh(*, request_id: int) -> SampleRequest | None:
    """Derive a request's state from its chunks' latest attempts."""
    sample_requests_refresh(request_ids=[request_id])
    return SampleRequest.objects.filter(pk=request_id).first()


def sample_requests_refresh(*, request_ids: Iterable[int], complete: Iterable[int] = ()) -> None:
    """Derive each request's state from its chunks' latest attempts: three queries for any number of
    requests of the same outcome (a worker refreshes every request of a batched call at once).

    `complete`: requests among them that an attempt covering every image has just committed (a
    request of one chunk, the most common kind): SUCCEEDED, without reading their chunks.
    """
    done = set(complete)
    if done:
        now = DbNow()
        SampleRequest.objects.filter(pk__in=done, state__in=ACTIVE_REQUEST_STATES).update(
            state=RequestState.SUCCEEDED, finished_at=now, error="", started_at=Coalesce("started_at", now)
        )
    pending = set(request_ids) - done
    if not pending:
        return
    requests = [r for r in SampleRequest.objects.filter(pk__in=pending) if r.is_active]
    if not requests:
        return
    latest: dict[int, dict[int, dict[str, Any]]] = {r.pk: {} for r in requests}
    attempts: Counter[int] = Counter()
    rows = Assignment.objects.filter(request_id__in=list(latest)).order_by("request_id", "first_index", "-attempt")
    for row in rows.values("request_id", "first_index", "state", "error"):
        latest[row["request_id"]].setdefault(row["first_index"], dict(row))
        attempts[row["request_id"]] += 1
    # Requests that move alike (most often: each to SUCCEEDED) are written by one conditional UPDATE.
    moves: dict[tuple[str, str, bool, bool, str], list[int]] = {}
    for request in requests:
        chunks = latest[request.pk]
        states = [row["state"] for row in chunks.values()]
        if any(s in LIVE_STATES for s in states):
            started = any(s != AssignmentState.QUEUED for s in states) or attempts[request.pk] > len(chunks)
            new: str = RequestState.RUNNING if started else RequestState.QUEUED
            finished, error = False, ""
            start = new == RequestState.RUNNING and request.started_at is None
        else:
            failed = [row for row in chunks.values() if row["state"] != AssignmentState.SUCCEEDED]
            new, finished = (RequestState.FAILED if failed or not states else RequestState.SUCCEEDED), True
            error = "; ".join(f"images from {r['first_index']}: {r['error'][:200]}" for r in failed)
            error = error or ("no images were placed" if not states else "")
            start = request.started_at is None
        if new != request.state or finished or start:
            moves.setdefault((request.state, new, start, finished, error), []).append(request.pk)
    now = DbNow()  # the database's time, as every start and end of the cluster's work
    for (old, new, start, finished, error), pks in moves.items():
        changes: dict[str, object] = {"state": new}
        if start:
            changes["started_at"] = now
        if finished:
            changes.update(finished_at=now, error=error)
        SampleRequest.objects.filter(pk__in=pks, state=old).update(**changes)


def sample_request_cancel(*, request: SampleRequest) -> int:
    """Cancel a queued or running request: queued chunks are dropped everywhere, made images kept.

    Returns how many queued chunks were cancelled (a running chunk finishes and keeps its images).
    """
    with transaction.atomic():
        won = SampleRequest.objects.filter(pk=request.pk, state__in=ACTIVE_REQUEST_STATES).update(
            state=RequestState.CANCELLED, finished_at=DbNow(), error=""
        )
        if not won:
            return 0
        waiting = list(request.assignments.filter(state=AssignmentState.QUEUED).values_list("job_id", "queue_name"))
        cancelled = request.assignments.filter(state=AssignmentState.QUEUED).update(
            state=AssignmentState.CANCELLED, finished_at=DbNow(), error="request cancelled"
        )

        def remove_jobs() -> None:
            for job_id, queue in waiting:
                queues.cancel_job(job_id, queue)

        transaction.on_commit(remove_jobs)
    request.refresh_from_db()
    return cancelled


def sample_request_mark_started(*, request_id: int) -> None:
    sample_requests_mark_started(request_ids=[request_id])


def sample_requests_mark_started(*, request_ids: Iterable[int]) -> None:
    """Mark the queued ones of these requests as running (one UPDATE for a whole batched call)."""
    SampleRequest.objects.filter(pk__in=set(request_ids), state=RequestState.QUEUED).update(
        state=RequestState.RUNNING, started_at=DbNow()
    )


def sample_image_path(*, persona_id: int, request_id: int, index: int, assignment_id: int) -> str:
    """An image's name in the samples storage: built from database ids only, never user input."""
    return f"samples/persona-{int(persona_id)}/r{int(request_id)}-i{int(index)}-a{int(assignment_id)}.png"


def sample_attempt_files_remove(*, assignment: Assignment) -> int:
    """Remove the files an abandoned attempt may have renamed into place before it lost its lease.

    Their names are known (ids only), so no folder is scanned. Committed images of the same
    positions belong to other attempts and have other names.
    """
    if assignment.request_id is None or assignment.request is None:
        return 0
    if Assignment.objects.filter(pk=assignment.pk, state=AssignmentState.SUCCEEDED).exists():
        return 0  # the database has its images: they are not the caller's to remove
    storage = samples_storage()
    removed = 0
    for index in assignment.indexes:
        name = sample_image_path(
            persona_id=assignment.request.persona_id,
            request_id=assignment.request_id,
            index=index,
            assignment_id=assignment.pk,
        )
        # Its thumbnail in either format: the setting may have changed since it was written.
        thumbs = [thumbnail_name(name, fmt) for fmt in THUMBNAIL_FORMATS]
        for candidate in (name, *thumbs, *(n + PART_SUFFIX for n in (name, *thumbs))):
            try:
                if storage.exists(candidate):
                    storage.delete(candidate)
                    removed += 1
            except storage_errors() as exc:
                # The reconciler goes on: the orphan sweep removes it once the store answers.
                log.error("could not remove %s of abandoned attempt %s: %s", candidate, assignment.pk, exc)
    return removed


def sample_images_delete(*, images: list[SampleImage]) -> int:
    """Delete image rows and, once the outermost transaction commits, their files.

    Admin deletions run inside the admin's own transaction: files removed at once would be gone
    for good if that transaction rolled back, leaving rows without files.
    """
    names = [name for img in images for name in (img.image.name, img.thumbnail) if name]
    with transaction.atomic():
        deleted, _ = SampleImage.objects.filter(pk__in=[img.pk for img in images]).delete()
        transaction.on_commit(lambda: _remove(names))
    return deleted


def _remove(names: list[str]) -> None:
    storage = samples_storage()
    for name in names:
        try:
            storage.delete(name)
        except storage_errors() as exc:
            # The rows are gone for good: a file left behind is an orphan the sweep removes later.
            log.error("could not remove %s after its image was deleted: %s", name, exc)
