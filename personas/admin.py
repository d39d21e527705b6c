from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import AdminTextareaWidget
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.db.models import Count, QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from gpuscheduler.assignments import NoDeviceAvailable
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
            context["devices"] = Device.objects.all()
            context["samples_max"] = samples_config()["MAX_PER_REQUEST"]
        return super().change_view(request, object_id, form_url, extra_context=context)

    def generate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
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
        try:
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
        else:
            level, text = submitted_message(submitted)
            self.message_user(request, text, level)
        return back

    def progress_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
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
        cancelled = sample_request_cancel(request=sample_request)
        if not was_active or sample_request.state != RequestState.CANCELLED:
            self.message_user(
                request,
                f"Nothing was cancelled: the request for {sample_request.count} images is already "
                f"{sample_request.get_state_display().lower()}.",
                messages.WARNING,
            )
            return back
        progress = request_progress(request=sample_request)
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
        for persona in queryset:
            try:
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
        if submitted:
            level, text = submitted_message(*submitted)
            self.message_user(request, text, level)
        if already:
            self.message_user(
                request, f"Already queued, nothing new was queued for them: {' '.join(already)}", messages.WARNING
            )
        for reason, personas in refused.items():
            self.message_user(request, f"Nothing was queued for {_names(personas)}. {reason}", messages.ERROR)

    def image_view(self, request: HttpRequest, image_id: int) -> HttpResponseBase:
        image = SampleImage.objects.select_related("persona").filter(pk=image_id).first()
        if image is None or not self.has_view_permission(request, image.persona):
            raise Http404("No such image.")
        media = Path(settings.MEDIA_ROOT).resolve()
        file_path = (media / image.image.name).resolve()
        if not file_path.is_relative_to(media) or not file_path.is_file():
            raise Http404("The image file is missing.")
        # FileResponse closes the file once the response is sent.
        response = FileResponse(open(file_path, "rb"), content_type="image/png")  # noqa: SIM115
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
