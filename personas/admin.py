from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from gpuscheduler.conf import samples_config
from gpuscheduler.models import Device
from gpuscheduler.services import NoDeviceAvailable
from gpuscheduler.views import staff_view
from personas.forms import GenerateSamplesForm
from personas.models import Persona, RequestSource, SampleImage, SampleRequest
from personas.selectors import persona_gallery, request_progress
from personas.services import RequestAlreadyActive, Submitted, sample_images_delete, sample_request_submit


def submitted_message(submitted: Submitted) -> tuple[int, str]:
    """The message level and text that tell an admin where a request went."""
    if submitted.waiting_for_redis:
        return messages.WARNING, (
            f"Saved {submitted.summary()}. Redis is unavailable right now, so the jobs are not queued yet: "
            "they will be queued automatically as soon as Redis answers again."
        )
    return messages.SUCCESS, f"Queued {submitted.summary()}."


class ActiveRequestFilter(admin.SimpleListFilter):
    title = "sample request"
    parameter_name = "samples"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Queued or running"), ("none", "No images yet")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Persona]) -> QuerySet[Persona]:
        if self.value() == "active":
            return queryset.filter(requests__state__in=["queued", "running"]).distinct()
        if self.value() == "none":
            return queryset.filter(sample_images__isnull=True)
        return queryset


@admin.register(Persona)
class PersonaAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "default_sample_count", "image_total", "updated"]
    list_filter = [ActiveRequestFilter, "created", "updated"]
    search_fields = ["name", "slug", "description", "appearance_prompt"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["images_requested", "created", "updated"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        ("Sample images", {"fields": ["appearance_prompt", "negative_prompt", "default_sample_count", "base_seed"]}),
        ("Record", {"classes": ["collapse"], "fields": ["images_requested", "created", "updated"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Persona]:
        return super().get_queryset(request).annotate(image_total=Count("sample_images", distinct=True))

    @admin.display(description="Images", ordering="image_total")
    def image_total(self, obj: Persona) -> int:
        return getattr(obj, "image_total", 0)

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/generate/",
                staff_view(self.admin_site, require_POST(self.generate_view)),
                name="%s_%s_generate" % info,
            ),
            path(
                "image/<int:image_id>/",
                staff_view(self.admin_site, self.image_view),
                name="%s_%s_image" % info,
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
            context["progress"] = request_progress(request=context["latest_request"]) if context["latest_request"] else None
            context["can_generate"] = self.has_change_permission(request, persona)
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

    def image_view(self, request: HttpRequest, image_id: int) -> HttpResponse:
        image = SampleImage.objects.select_related("persona").filter(pk=image_id).first()
        if image is None or not self.has_view_permission(request, image.persona):
            raise Http404("No such image.")
        media = Path(settings.MEDIA_ROOT).resolve()
        file_path = (media / image.image.name).resolve()
        if not file_path.is_relative_to(media) or not file_path.is_file():
            raise Http404("The image file is missing.")
        response = FileResponse(open(file_path, "rb"), content_type="image/png")
        response["Cache-Control"] = "private, max-age=3600"
        return response

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Persona]) -> None:
        sample_images_delete(images=list(SampleImage.objects.filter(persona__in=queryset)))
        super().delete_queryset(request, queryset)

    def delete_model(self, request: HttpRequest, obj: Persona) -> None:
        sample_images_delete(images=list(obj.sample_images.all()))
        super().delete_model(request, obj)


@admin.register(SampleRequest)
class SampleRequestAdmin(admin.ModelAdmin):
    list_display = ["id", "persona_link", "count", "state", "device", "source", "requested_by", "created", "finished_at"]
    list_filter = ["state", "source", "created"]
    search_fields = ["persona__name", "persona__slug"]
    list_select_related = ["persona", "device", "requested_by"]
    readonly_fields = [f.name for f in SampleRequest._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Persona", ordering="persona__name")
    def persona_link(self, obj: SampleRequest) -> str:
        url = reverse("admin:personas_persona_change", args=[obj.persona_id])
        return format_html('<a href="{}">{}</a>', url, obj.persona.name)
