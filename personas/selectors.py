"""Reads of the personas app: galleries and request progress."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from django.core.paginator import Paginator
from django.db.models import Count, F
from django.urls import reverse

from gpuscheduler.models import Assignment, AssignmentKind, AssignmentState
from personas.image_models import spec_name
from personas.models import Persona, RequestState, SampleImage, SampleRequest

# Images per gallery page: a persona with 500 images opens as fast as one with 5.
GALLERY_PAGE_SIZE = 48
_SENTINEL = 987654321012  # an id no URL prefix holds


def url_maker(name: str) -> Callable[[int], str]:
    """The URL of an image view by id, reversed once: two reverse() calls per image cost about 5 ms
    a gallery page, and more per progress poll of a large request."""
    template = reverse(name, args=[_SENTINEL])
    return lambda pk: template.replace(str(_SENTINEL), str(int(pk)))


@dataclass
class GalleryGroup:
    """The images of one request on a gallery page (a request may continue on the next page)."""

    request: SampleRequest | None
    images: list[SampleImage]
    made: int  # of the request's images, on every page
    model_name: str


def persona_latest_request(*, persona: Persona) -> SampleRequest | None:
    """The persona's newest sample request, if it has one."""
    return SampleRequest.objects.filter(persona=persona).select_related("device").first()


def persona_gallery(*, persona: Persona, page: str | int | None = None) -> dict[str, Any]:
    """One page of a persona's images, grouped by request: newest request first, request order
    within it. A page number out of range or not a number gives the last or the first page."""
    # Request order, not creation order: chunks finish in any order, and the page's live
    # updates insert each new image at its index, so a reload must show the same order.
    images = (
        SampleImage.objects.filter(persona=persona)
        .select_related("device", "request")
        .defer("prompt", "negative_prompt", "request__error")
        .order_by(F("request_id").desc(nulls_last=True), "index", "-created")
    )
    shown = Paginator(images, GALLERY_PAGE_SIZE).get_page(page)
    rows = list(shown.object_list)
    made = dict(
        SampleImage.objects.filter(request_id__in={image.request_id for image in rows if image.request_id})
        .order_by()
        .values_list("request_id")
        .annotate(n=Count("id"))
    )
    full, thumbnail = url_maker("admin:personas_persona_image"), url_maker("admin:personas_persona_thumbnail")
    for image in rows:
        image.full_url, image.thumbnail_url = full(image.pk), thumbnail(image.pk)  # type: ignore[attr-defined]
    groups: list[GalleryGroup] = []
    for request_id, members in groupby(rows, key=lambda image: image.request_id):
        together = list(members)
        request = together[0].request
        # The caption's model: the name its request recorded (the model may be renamed or gone since).
        name = spec_name(request.model_spec if request else {}, together[0].model)
        for image in together:
            image.model_name = name  # type: ignore[attr-defined]
        groups.append(GalleryGroup(request, together, made.get(request_id, len(together)), name))
    return {
        "latest_request": persona_latest_request(persona=persona),
        "sample_groups": groups,
        "sample_page": shown,
        "sample_image_total": shown.paginator.count,
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
    full, thumbnail = url_maker("admin:personas_persona_image"), url_maker("admin:personas_persona_thumbnail")
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
                "url": full(image.pk),
                "thumbnail": thumbnail(image.pk),
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
