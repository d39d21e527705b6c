"""The persona admin's buttons and action: generate, follow the progress, cancel, regenerate.

PersonaAdmin (personas/admin.py) routes its URLs and its action here. Each reads its input, calls one
service or selector and says what happened; a database that fails mid-press (a deadlock, a lost connection, a
failover) is said so and never turns into a 500, and a press whose COMMIT went through while only the
reply was lost is reported as done.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import DatabaseError, InterfaceError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse

from gpuscheduler.assignments import NoDeviceAvailable
from gpuscheduler.clock import db_now
from personas.forms import GenerateSamplesForm
from personas.image_models import ModelUnavailable
from personas.models import Persona, RequestSource, RequestState, SampleRequest
from personas.selectors import persona_latest_request, request_progress
from personas.services import (
    RequestAlreadyActive,
    Submitted,
    images_text,
    sample_request_cancel,
    sample_request_submit,
)

log = logging.getLogger(__name__)

# Every way the database can fail a request: a deadlock, a lost or closed connection, a timeout.
# (Django's InterfaceError, raised for some closed connections, is no DatabaseError.)
DATABASE_ERRORS = (DatabaseError, InterfaceError)


def submitted_message(*submitted: Submitted) -> tuple[int, str]:
    """The message level and text that tell an admin where one or more requests went."""
    what = "; ".join(s.summary() for s in submitted)
    if len(submitted) > 1:
        tally: Counter[str] = Counter()
        for s in submitted:
            tally.update(s.by_device)
        where = ", ".join(f"{n} on {label}" for label, n in sorted(tally.items()))
        what += f" ({sum(s.request.count for s in submitted)} images in all: {where})"
    if any(s.waiting_for_redis for s in submitted):
        return messages.WARNING, (
            f"Saved {what}. Redis is unavailable right now, so the jobs are not queued yet: "
            "they will be queued automatically as soon as Redis answers again."
        )
    return messages.SUCCESS, f"Queued {what}."


def _names(personas: list[Persona]) -> str:
    return ", ".join(p.name for p in personas)


def database_error_text(exc: Exception) -> str:
    """What the database said, in one short line: a deadlock, a lost server, a timeout."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def database_error_message(exc: Exception, outcome: str) -> str:
    return f"The database did not answer ({database_error_text(exc)}); {outcome}. Try again in a moment."


def _saved_after_all(persona: Persona, user: Any, since: datetime | None) -> SampleRequest | None:
    """After a database error during a press that began at `since` (the database's time, as the
    request's `created` is): its request, if the COMMIT went through and only the reply was lost.
    None when there is none, or when the database still does not answer."""
    if since is None:
        return None  # the database failed before the press began
    try:
        latest = persona_latest_request(persona=persona)
    except DATABASE_ERRORS:
        return None
    if latest is None or latest.created < since or latest.requested_by_id != getattr(user, "pk", None):
        return None
    return latest


def _saved_late_message(exc: Exception, saved: SampleRequest, persona: Persona) -> str:
    # Its on-commit enqueue never ran; the reconciler queues attempts that Redis lacks.
    return (
        f"The database answered late ({database_error_text(exc)}), but the request for {images_text(saved.count)} of "
        f"{persona} was saved: its jobs are queued within seconds."
    )


def generate_view(model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str) -> HttpResponse:
    try:
        return _generate(model_admin, request, object_id)
    except DATABASE_ERRORS as exc:  # reading the persona or the form's device
        return _database_failed(model_admin, request, exc, object_id, "nothing was queued")


def _database_failed(
    model_admin: admin.ModelAdmin[Persona], request: HttpRequest, exc: Exception, object_id: str, outcome: str
) -> HttpResponse:
    """A deadlock, a lost connection, a failover: say so and go back, never a 500. The message
    goes into the message cookie (FallbackStorage), so saying so needs no database."""
    log.warning("%s %s: %s", request.method, request.path, exc, exc_info=True)
    model_admin.message_user(request, database_error_message(exc, outcome), messages.ERROR)
    return HttpResponseRedirect(reverse("admin:personas_persona_change", args=[object_id]))


def _generate(model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str) -> HttpResponse:
    persona = model_admin.get_object(request, unquote(object_id))
    if persona is None:
        raise Http404("No such persona.")
    if not model_admin.has_change_permission(request, persona):
        raise PermissionDenied
    back = HttpResponseRedirect(reverse("admin:personas_persona_change", args=[persona.pk]))
    form = GenerateSamplesForm(request.POST)
    if not form.is_valid():
        model_admin.message_user(request, f"Nothing was queued. {form.error_text()}", messages.ERROR)
        return back
    since: datetime | None = None
    try:
        since = db_now()
        submitted = sample_request_submit(
            persona=persona,
            count=form.cleaned_data["count"],
            device=form.cleaned_data["device"],
            user=request.user,
            source=RequestSource.ADMIN,
        )
    except RequestAlreadyActive as exc:
        model_admin.message_user(request, f"Already queued: {exc} Nothing new was queued.", messages.WARNING)
    except (NoDeviceAvailable, ModelUnavailable) as exc:
        model_admin.message_user(request, f"Nothing was queued. {exc}", messages.ERROR)
    except DATABASE_ERRORS as exc:
        # The submit's transaction rolled back, unless only the reply to its COMMIT was lost.
        saved = _saved_after_all(persona, request.user, since)
        if saved is None:
            return _database_failed(model_admin, request, exc, object_id, "nothing was queued")
        log.warning("generate for persona %s: %s", persona.pk, exc, exc_info=True)
        model_admin.message_user(request, _saved_late_message(exc, saved, persona), messages.WARNING)
    else:
        level, text = submitted_message(submitted)
        model_admin.message_user(request, text, level)
    return back


def progress_view(model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str) -> HttpResponse:
    try:
        return _progress(model_admin, request, object_id)
    except DATABASE_ERRORS as exc:
        # The page polls every 1.5 s: a database restart must read as "not updating, retrying"
        # there (the script backs off on any error status), not as a 500 in the error log.
        log.warning("progress of persona %s: %s", object_id, database_error_text(exc))
        response = JsonResponse({"error": database_error_message(exc, "progress is not updating")}, status=503)
        response["Retry-After"] = "5"
        return response


def _progress(model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str) -> HttpResponse:
    persona = model_admin.get_object(request, unquote(object_id))
    if persona is None:
        raise Http404("No such persona.")
    if not model_admin.has_view_permission(request, persona):
        raise PermissionDenied
    latest = persona_latest_request(persona=persona)
    if latest is None:
        return JsonResponse({"id": None, "persona": persona.pk, "active": False, "images": [], "attempts": []})
    return JsonResponse(request_progress(request=latest))


def cancel_view(
    model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str, request_id: int
) -> HttpResponse:
    try:
        return _cancel(model_admin, request, object_id, request_id)
    except DATABASE_ERRORS as exc:  # reading the persona or the request
        return _database_failed(model_admin, request, exc, object_id, "nothing was cancelled")


def _cancel(
    model_admin: admin.ModelAdmin[Persona], request: HttpRequest, object_id: str, request_id: int
) -> HttpResponse:
    persona = model_admin.get_object(request, unquote(object_id))
    if persona is None:
        raise Http404("No such persona.")
    if not model_admin.has_change_permission(request, persona):
        raise PermissionDenied
    sample_request = SampleRequest.objects.filter(pk=request_id, persona=persona).first()
    if sample_request is None:
        raise Http404("No such sample request for this persona.")
    back = HttpResponseRedirect(reverse("admin:personas_persona_change", args=[persona.pk]))
    was_active = sample_request.is_active
    try:
        cancelled = sample_request_cancel(request=sample_request)
        progress = request_progress(request=sample_request)
    except DATABASE_ERRORS as exc:
        with contextlib.suppress(*DATABASE_ERRORS):  # its COMMIT may have gone through, only the reply lost
            sample_request.refresh_from_db(fields=["state"])
        if not (was_active and sample_request.state == RequestState.CANCELLED):
            return _database_failed(model_admin, request, exc, object_id, "nothing was cancelled")
        log.warning("cancel of request %s: %s", sample_request.pk, exc, exc_info=True)
        text = f"The database answered late ({database_error_text(exc)}), but the request was cancelled."
        model_admin.message_user(request, text, messages.WARNING)
        return back
    if not was_active or sample_request.state != RequestState.CANCELLED:
        model_admin.message_user(
            request,
            f"Nothing was cancelled: the request for {images_text(sample_request.count)} is already "
            f"{sample_request.get_state_display().lower()}.",
            messages.WARNING,
        )
        return back
    running = f" {progress['running']} running job(s) will finish and keep their images." if progress["running"] else ""
    model_admin.message_user(
        request,
        f"Cancelled the request for {images_text(sample_request.count)} of {persona}: {cancelled} queued job(s) "
        f"cancelled on every device; the {progress['done']} image(s) already made are kept.{running}",
        messages.SUCCESS,
    )
    return back


def regenerate_samples(
    model_admin: admin.ModelAdmin[Persona], request: HttpRequest, queryset: QuerySet[Persona]
) -> None:
    """Queue each selected persona's default number of images, and say what became of each."""
    submitted: list[Submitted] = []
    already: list[str] = []
    refused: defaultdict[str, list[Persona]] = defaultdict(list)
    faults: list[tuple[int, str]] = []
    try:
        personas = list(queryset)
    except DATABASE_ERRORS as exc:
        log.warning("regenerate action: %s", exc, exc_info=True)
        model_admin.message_user(request, database_error_message(exc, "nothing was queued"), messages.ERROR)
        return
    for position, persona in enumerate(personas):
        since: datetime | None = None
        try:
            since = db_now()
            submitted.append(
                sample_request_submit(
                    persona=persona,
                    count=persona.default_sample_count,
                    user=request.user,
                    source=RequestSource.ACTION,
                )
            )
        except RequestAlreadyActive as exc:
            already.append(str(exc))
        except (NoDeviceAvailable, ModelUnavailable, ValidationError) as exc:
            reason = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            refused[reason].append(persona)
        except DATABASE_ERRORS as exc:
            # Stop here: what was queued before stands (one transaction per persona); the
            # rest would most likely meet the same fault.
            log.warning("regenerate action at persona %s: %s", persona.pk, exc, exc_info=True)
            rest = personas[position:]
            saved = _saved_after_all(persona, request.user, since)
            if saved is not None:
                faults.append((messages.WARNING, _saved_late_message(exc, saved, persona)))
                rest = rest[1:]
            if rest:
                outcome = f"nothing was queued for {_names(rest)}"
                faults.append((messages.ERROR, database_error_message(exc, outcome)))
            break
    if submitted:
        level, text = submitted_message(*submitted)
        model_admin.message_user(request, text, level)
    if already:
        model_admin.message_user(
            request, f"Already queued, nothing new was queued for them: {' '.join(already)}", messages.WARNING
        )
    for reason, group in refused.items():
        model_admin.message_user(request, f"Nothing was queued for {_names(group)}. {reason}", messages.ERROR)
    for level, text in faults:
        model_admin.message_user(request, text, level)
