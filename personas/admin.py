from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import AdminTextareaWidget
from django.core.exceptions import PermissionDenied, SuspiciousOperation, ValidationError
from django.db import DatabaseError, InterfaceError, models
from django.db.models import Count, QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from config.storage import samples_storage, storage_errors, storage_signed_url
from gpuscheduler.assignments import NoDeviceAvailable
from gpuscheduler.clock import db_now
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Device
from gpuscheduler.views import OutOfRangeLookupMixin, staff_view
from personas.forms import GenerateSamplesForm, PersonaAdminForm
from personas.models import ACTIVE_REQUEST_STATES, Persona, RequestSource, RequestState, SampleImage, SampleRequest
from personas.selectors import persona_gallery, persona_latest_request, request_progress
from personas.services import (
    RequestAlreadyActive,
    Submitted,
    sample_images_delete,
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
        f"The database answered late ({database_error_text(exc)}), but the request for {saved.count} images of "
        f"{persona} was saved: its jobs are queued within seconds."
    )


def _explain_active_requests(request: HttpRequest, perms_needed: set[str]) -> set[str]:
    """Say why a delete is refused when it would take an active sample request with it."""
    name = str(SampleRequest._meta.verbose_name)
    if name in perms_needed and request.user.has_perm("personas.delete_samplerequest"):
        return (perms_needed - {name}) | {f"{name} that is queued or running (cancel it first)"}
    return perms_needed


class ActiveRequestFilter(admin.SimpleListFilter):
    title = "sample request"
    parameter_name = "samples"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Queued or running"), ("none", "No images yet")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Persona]) -> QuerySet[Persona]:
        if self.value() == "active":
            return queryset.filter(requests__state__in=ACTIVE_REQUEST_STATES).distinct()
        if self.value() == "none":
            return queryset.filter(sample_images__isnull=True)
        return queryset


@admin.register(Persona)
class PersonaAdmin(OutOfRangeLookupMixin):
    form = PersonaAdminForm
    list_display = ["name", "slug", "default_sample_count", "image_total", "updated"]
    list_filter = [ActiveRequestFilter, "created", "updated"]
    search_fields = ["name", "slug", "description", "appearance_prompt"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["images_requested", "created", "updated"]
    actions = ["regenerate_samples"]
    # Prompts are a line or two: ten-row boxes push the samples panel off the screen.
    formfield_overrides = {models.TextField: {"widget": AdminTextareaWidget(attrs={"rows": 3})}}
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        ("Image prompt", {"fields": ["appearance_prompt", "negative_prompt", "default_sample_count", "base_seed"]}),
        ("Record", {"classes": ["collapse"], "fields": ["images_requested", "created", "updated"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Persona]:
        queryset = super().get_queryset(request)
        # Only the list shows the count; the change page and its 1.5 s progress poll need no GROUP BY.
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == f"{self.opts.app_label}_{self.opts.model_name}_changelist":
            queryset = queryset.annotate(image_total=Count("sample_images", distinct=True))
        return queryset

    @admin.display(description="Images", ordering="image_total")
    def image_total(self, obj: Persona) -> int:
        return getattr(obj, "image_total", 0)

    def get_urls(self) -> list[Any]:
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path(
                "<path:object_id>/generate/",
                staff_view(self.admin_site, require_POST(self.generate_view)),
                name=f"{prefix}_generate",
            ),
            path(
                "<path:object_id>/progress/",
                staff_view(self.admin_site, self.progress_view),
                name=f"{prefix}_progress",
            ),
            path(
                "<path:object_id>/requests/<int:request_id>/cancel/",
                staff_view(self.admin_site, require_POST(self.cancel_view)),
                name=f"{prefix}_cancel",
            ),
            path(
                "image/<int:image_id>/",
                staff_view(self.admin_site, self.image_view),
                name=f"{prefix}_image",
            ),
            *super().get_urls(),
        ]

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        persona = self.get_object(request, unquote(object_id))
        context = dict(extra_context or {})
        if persona is not None:
            context.update(persona_gallery(persona=persona))
            latest = context["latest_request"]
            context["progress"] = request_progress(request=latest) if latest else None
            context["can_generate"] = self.has_change_permission(request, persona)
            context["progress_url"] = reverse("admin:personas_persona_progress", args=[persona.pk])
            context["devices"] = Device.objects.filter(retired_at__isnull=True)
            context["samples_max"] = samples_config()["MAX_PER_REQUEST"]
        return super().change_view(request, object_id, form_url, extra_context=context)

    def generate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        try:
            return self._generate(request, object_id)
        except DATABASE_ERRORS as exc:  # reading the persona or the form's device
            return self._database_failed(request, exc, object_id, "nothing was queued")

    def _database_failed(self, request: HttpRequest, exc: Exception, object_id: str, outcome: str) -> HttpResponse:
        """A deadlock, a lost connection, a failover: say so and go back, never a 500. The message
        goes into the message cookie (FallbackStorage), so saying so needs no database."""
        log.warning("%s %s: %s", request.method, request.path, exc, exc_info=True)
        self.message_user(request, database_error_message(exc, outcome), messages.ERROR)
        return HttpResponseRedirect(reverse("admin:personas_persona_change", args=[object_id]))

    def _generate(self, request: HttpRequest, object_id: str) -> HttpResponse:
        persona = self.get_object(request, unquote(object_id))
        if persona is None:
            raise Http404("No such persona.")
        if not self.has_change_permission(request, persona):
            raise PermissionDenied
        back = HttpResponseRedirect(reverse("admin:personas_persona_change", args=[persona.pk]))
        form = GenerateSamplesForm(request.POST)
        if not form.is_valid():
            self.message_user(request, f"Nothing was queued. {form.error_text()}", messages.ERROR)
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
            self.message_user(request, f"Already queued: {exc} Nothing new was queued.", messages.WARNING)
        except NoDeviceAvailable as exc:
            self.message_user(request, f"Nothing was queued. {exc}", messages.ERROR)
        except DATABASE_ERRORS as exc:
            # The submit's transaction rolled back, unless only the reply to its COMMIT was lost.
            saved = _saved_after_all(persona, request.user, since)
            if saved is None:
                return self._database_failed(request, exc, object_id, "nothing was queued")
            log.warning("generate for persona %s: %s", persona.pk, exc, exc_info=True)
            self.message_user(request, _saved_late_message(exc, saved, persona), messages.WARNING)
        else:
            level, text = submitted_message(submitted)
            self.message_user(request, text, level)
        return back

    def progress_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        try:
            return self._progress(request, object_id)
        except DATABASE_ERRORS as exc:
            # The page polls every 1.5 s: a database restart must read as "not updating, retrying"
            # there (the script backs off on any error status), not as a 500 in the error log.
            log.warning("progress of persona %s: %s", object_id, database_error_text(exc))
            response = JsonResponse({"error": database_error_message(exc, "progress is not updating")}, status=503)
            response["Retry-After"] = "5"
            return response

    def _progress(self, request: HttpRequest, object_id: str) -> HttpResponse:
        persona = self.get_object(request, unquote(object_id))
        if persona is None:
            raise Http404("No such persona.")
        if not self.has_view_permission(request, persona):
            raise PermissionDenied
        latest = persona_latest_request(persona=persona)
        if latest is None:
            return JsonResponse({"id": None, "persona": persona.pk, "active": False, "images": [], "attempts": []})
        return JsonResponse(request_progress(request=latest))

    def cancel_view(self, request: HttpRequest, object_id: str, request_id: int) -> HttpResponse:
        try:
            return self._cancel(request, object_id, request_id)
        except DATABASE_ERRORS as exc:  # reading the persona or the request
            return self._database_failed(request, exc, object_id, "nothing was cancelled")

    def _cancel(self, request: HttpRequest, object_id: str, request_id: int) -> HttpResponse:
        persona = self.get_object(request, unquote(object_id))
        if persona is None:
            raise Http404("No such persona.")
        if not self.has_change_permission(request, persona):
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
                return self._database_failed(request, exc, object_id, "nothing was cancelled")
            log.warning("cancel of request %s: %s", sample_request.pk, exc, exc_info=True)
            text = f"The database answered late ({database_error_text(exc)}), but the request was cancelled."
            self.message_user(request, text, messages.WARNING)
            return back
        if not was_active or sample_request.state != RequestState.CANCELLED:
            self.message_user(
                request,
                f"Nothing was cancelled: the request for {sample_request.count} images is already "
                f"{sample_request.get_state_display().lower()}.",
                messages.WARNING,
            )
            return back
        running = (
            f" {progress['running']} running job(s) will finish and keep their images." if progress["running"] else ""
        )
        self.message_user(
            request,
            f"Cancelled the request for {sample_request.count} images of {persona}: {cancelled} queued job(s) "
            f"cancelled on every device; the {progress['done']} image(s) already made are kept.{running}",
            messages.SUCCESS,
        )
        return back

    @admin.action(description="Regenerate sample images", permissions=["change"])
    def regenerate_samples(self, request: HttpRequest, queryset: QuerySet[Persona]) -> None:
        submitted: list[Submitted] = []
        already: list[str] = []
        refused: defaultdict[str, list[Persona]] = defaultdict(list)
        faults: list[tuple[int, str]] = []
        try:
            personas = list(queryset)
        except DATABASE_ERRORS as exc:
            log.warning("regenerate action: %s", exc, exc_info=True)
            self.message_user(request, database_error_message(exc, "nothing was queued"), messages.ERROR)
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
            except (NoDeviceAvailable, ValidationError) as exc:
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
            self.message_user(request, text, level)
        if already:
            self.message_user(
                request, f"Already queued, nothing new was queued for them: {' '.join(already)}", messages.WARNING
            )
        for reason, group in refused.items():
            self.message_user(request, f"Nothing was queued for {_names(group)}. {reason}", messages.ERROR)
        for level, text in faults:
            self.message_user(request, text, level)

    def image_view(self, request: HttpRequest, image_id: int) -> HttpResponseBase:
        image = SampleImage.objects.select_related("persona").filter(pk=image_id).first()
        if image is None or not self.has_view_permission(request, image.persona):
            raise Http404("No such image.")
        storage = samples_storage()
        try:
            signed = storage_signed_url(storage, image.image.name)
            if signed is not None:
                # Object storage: the browser fetches the bytes from the bucket with a URL that works for
                # S3_SIGNED_URL_SECONDS. admin_view adds never-cache: each view gets a fresh URL.
                response: HttpResponseBase = HttpResponseRedirect(signed[0])
                response["Cache-Control"] = "private"
                return response
            handle = storage.open(image.image.name, "rb")
        except (FileNotFoundError, SuspiciousOperation):  # a row naming a path outside the store, too
            raise Http404("The image file is missing.") from None
        except storage_errors() as exc:
            log.error("image %s: the media store cannot be read: %s", image.pk, exc)
            return HttpResponse(f"The media store cannot be read: {exc}", status=503, content_type="text/plain")
        # FileResponse closes the file once the response is sent.
        response = FileResponse(handle, content_type="image/png")
        response["Cache-Control"] = "private, max-age=3600"
        return response

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[Any, Any], set[Any], list[Any]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, _explain_active_requests(request, perms_needed), protected

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Persona]) -> None:
        sample_images_delete(images=list(SampleImage.objects.filter(persona__in=queryset)))
        super().delete_queryset(request, queryset)

    def delete_model(self, request: HttpRequest, obj: Persona) -> None:
        sample_images_delete(images=list(obj.sample_images.all()))
        super().delete_model(request, obj)


@admin.register(SampleRequest)
class SampleRequestAdmin(OutOfRangeLookupMixin):
    list_display = [
        "id",
        "persona_link",
        "count",
        "state",
        "device",
        "source",
        "requested_by",
        "created",
        "finished_at",
    ]
    list_filter = ["state", "source", "created"]
    search_fields = ["persona__name", "persona__slug"]
    list_select_related = ["persona", "device", "requested_by"]
    readonly_fields = [f.name for f in SampleRequest._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting a queued or running request would cascade to the attempts its workers are
        # running; cancel it first. The check covers the bulk action and a persona's cascade too.
        if isinstance(obj, SampleRequest) and obj.is_active:
            return False
        return super().has_delete_permission(request, obj)

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[Any, Any], set[Any], list[Any]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, _explain_active_requests(request, perms_needed), protected

    @admin.display(description="Persona", ordering="persona__name")
    def persona_link(self, obj: SampleRequest) -> str:
        url = reverse("admin:personas_persona_change", args=[obj.persona_id])
        return format_html('<a href="{}">{}</a>', url, obj.persona.name)
