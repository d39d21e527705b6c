"""Reads of the personas app: galleries and request progress."""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.db.models import F
from django.urls import reverse

from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState
from personas.image_models import spec_name
from personas.models import Persona, RequestState, SampleImage, SampleRequest

GALLERY_SIZE = 60


def persona_latest_request(*, persona: Persona) -> SampleRequest | None:
    """The persona's newest sample request, if it has one."""
    return SampleRequest.objects.filter(persona=persona).select_related("device").first()


def persona_gallery(*, persona: Persona) -> dict[str, Any]:
    """The newest images of a persona, newest request first and in request order within it."""
    # Request order, not creation order: chunks finish in any order, and the page's live
    # updates insert each new image at its index, so a reload must show the same order.
    images = list(
        SampleImage.objects.filter(persona=persona)
        .select_related("device", "request")
        .order_by(F("request_id").desc(nulls_last=True), "index", "-created")[:GALLERY_SIZE]
    )
    for image in images:
        # The caption's model: the name its request recorded (the model may be renamed or gone since).
        spec = image.request.model_spec if image.request else {}
        image.model_name = spec_name(spec, image.model)  # type: ignore[attr-defined]
    return {
        "latest_request": persona_latest_request(persona=persona),
        "sample_images": images,
        "sample_image_total": SampleImage.objects.filter(persona=persona).count(),
    }


def request_state_shown(*, request: SampleRequest, attempts: list[Assignment], done: int) -> str:
    """The request's state as its attempts show it. A worker claims an attempt (RUNNING) and marks
    the request started only a few writes later (its heartbeat on the device row, which can wait
    behind the monitor's lock on the device rows, or SQLite's single writer), and the request row
    was read before the attempts: so the summary could say "Queued, 0 of 16" while the table below
    it, from the same answer, showed both attempts running, until the next poll."""
    if request.state == RequestState.QUEUED and (done or any(a.state != AssignmentState.QUEUED for a in attempts)):
        return RequestState.RUNNING
    return str(request.state)


def request_progress(*, request: SampleRequest) -> dict[str, Any]:
    """Images done / asked, the device of each image and each attempt, and errors, as plain data."""
    # Attempts first, images second: an attempt's images commit with its SUCCEEDED state, so the
    # count read after the table is never behind it.
    attempts = list(
        request.assignments.filter(kind=AssignmentKind.SAMPLES)
        .select_related("planned_device", "device")
        .order_by("first_index", "attempt")
    )
    images = list(request.images.select_related("device").order_by("index"))
    by_device = Counter(image.device.label if image.device else "unknown device" for image in images)
    model_name = spec_name(request.model_spec, request.model)
    state = request_state_shown(request=request, attempts=attempts, done=len(images))
    return {
        "id": request.pk,
        "persona": request.persona_id,
        "state": state,
        "state_label": RequestState(state).label,
        "active": request.is_active,
        "asked": request.count,
        "done": len(images),
        "error": request.error,
        "model": {"name": model_name, "key": request.model},
        "running": sum(1 for a in attempts if a.state == AssignmentState.RUNNING),
        "by_device": [{"device": label, "images": n} for label, n in sorted(by_device.items())],
        "created": request.created.isoformat(),
        "finished": request.finished_at.isoformat() if request.finished_at else None,
        "images": [
            {
                "id": image.pk,
                "request": request.pk,
                "index": image.index,
                "seed": image.seed,
                "device": image.device.label if image.device else "",
                "url": reverse("admin:personas_persona_image", args=[image.pk]),
                "width": image.width,
                "height": image.height,
                "model": model_name,  # the caption's model, as the page renders it
            }
            for image in images
        ],
        "attempts": [
            {
                "job_id": a.job_id,
                "images": a.images_label,
                "attempt": a.attempt,
                "state": a.state,
                "state_label": a.get_state_display(),
                "planned": a.planned_device.label,
                "device": a.device.label if a.device else "",
                "reason": a.reason,
                "error": a.error.splitlines()[0][:300] if a.error else "",
            }
            for a in attempts
        ],
    }
