from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import AdminIntegerFieldWidget, AdminTextareaWidget
from django.core.paginator import Page
from django.db import models
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from gpuscheduler.conf import samples_config
from gpuscheduler.models import Device
from gpuscheduler.views import OutOfRangeLookupMixin, staff_view
from personas import admin_views
from personas.forms import PersonaAdminForm
from personas.models import ACTIVE_REQUEST_STATES, ImageModel, Persona, SampleImage, SampleRequest
from personas.selectors import persona_gallery, request_progress
from personas.services import sample_images_delete
from personas.serving import sample_file_response, thumbnail_file_response

log = logging.getLogger(__name__)

# The product's name in every admin page's header and title (templates/admin/base_site.html adds its icon).
admin.site.site_header = admin.site.site_title = "Persona samples"


GALLERY_PARAM = "gallery"  # the gallery page's query parameter on the persona's change page


def gallery_page_links(request: HttpRequest, page: Page[Any]) -> dict[str, Any]:
    """Links to the gallery's newer and older pages; the page's other parameters (the changelist's
    filters that the admin carries along) are kept."""

    def link(number: int) -> str:
        query = request.GET.copy()
        query[GALLERY_PARAM] = str(number)
        return f"?{query.urlencode()}#persona-samples"

    return {
        "newer": link(page.previous_page_number()) if page.has_previous() else None,
        "older": link(page.next_page_number()) if page.has_next() else None,
        "number": page.number,
        "count": page.paginator.num_pages,
    }


def _explain_active_requests(request: HttpRequest, perms_needed: set[str]) -> set[str]:
    """Say why a delete is refused when it would take an active sample request with it."""
    name = str(SampleRequest._meta.verbose_name)
    if name in perms_needed and request.user.has_perm("personas.delete_samplerequest"):
        return (perms_needed - {name}) | {f"{name} that is queued or running (cancel it first)"}
    return perms_needed


class ImageModelChoiceField(forms.ModelChoiceField):  # type: ignore[type-arg]
    def label_from_instance(self, obj: Any) -> str:
        return str(obj.name) + ("" if obj.enabled else " (disabled)")


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
    list_display = ["name", "newest_sample", "slug", "model_name", "default_sample_count", "image_total", "updated"]
    list_filter = [ActiveRequestFilter, "image_model", "created", "updated"]
    list_select_related = ["image_model"]
    search_fields = ["name", "slug", "description", "appearance_prompt"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["images_requested", "created", "updated"]
    actions = ["regenerate_samples"]
    # Prompts are a line or two: ten-row boxes push the samples panel off the screen.
    formfield_overrides = {models.TextField: {"widget": AdminTextareaWidget(attrs={"rows": 3})}}
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        (
            "Image prompt",
            {"fields": ["appearance_prompt", "negative_prompt", "image_model", "default_sample_count", "base_seed"]},
        ),
        ("Record", {"classes": ["collapse"], "fields": ["images_requested", "created", "updated"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Persona]:
        queryset = super().get_queryset(request)
        # Only the list shows the count; the change page and its 1.5 s progress poll need no GROUP BY.
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name == f"{self.opts.app_label}_{self.opts.model_name}_changelist":
            default = ImageModel.objects.filter(is_default=True).values("name")[:1]
            newest = SampleImage.objects.filter(persona=OuterRef("pk")).order_by("-id").values("pk")[:1]
            queryset = queryset.annotate(
                image_total=Count("sample_images", distinct=True),
                default_model_name=Subquery(default),
                newest_image_id=Subquery(newest),
            )
        return queryset

    @admin.display(description="Newest sample")
    def newest_sample(self, obj: Persona) -> str | None:
        image_id = getattr(obj, "newest_image_id", None)
        if image_id is None:
            return None  # the admin's empty value
        return format_html(
            '<img class="persona-thumbnail" src="{}" alt="Newest sample of {}" width="48" height="48" loading="lazy">',
            reverse("admin:personas_persona_thumbnail", args=[image_id]),
            obj.name,
        )

    @admin.display(description="Images", ordering="image_total")
    def image_total(self, obj: Persona) -> int:
        return getattr(obj, "image_total", 0)

    @admin.display(description="Model", ordering="image_model__name")
    def model_name(self, obj: Persona) -> str:
        if obj.image_model is not None:
            return obj.image_model.name + ("" if obj.image_model.enabled else " (disabled)")
        return f"{getattr(obj, 'default_model_name', None) or 'the default'} (default)"

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "default_sample_count":
            # 1 to SAMPLES_MAX_PER_REQUEST in the HTML too; the model field's 0 floor (a positive
            # integer) showed there and refused -1 with "greater than or equal to 0" before
            # validate_count could say the rule: the form's clean_default_sample_count says it.
            maximum = int(samples_config()["MAX_PER_REQUEST"])
            kwargs.update(min_value=None, widget=AdminIntegerFieldWidget(attrs={"min": 1, "max": maximum}))
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "image_model":
            default = ImageModel.objects.filter(is_default=True).first()
            kwargs["empty_label"] = f"Default model ({default.name})" if default else "Default model"
            kwargs["form_class"] = ImageModelChoiceField
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

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
            path(
                "image/<int:image_id>/thumbnail/",
                staff_view(self.admin_site, self.thumbnail_view),
                name=f"{prefix}_thumbnail",
            ),
            *super().get_urls(),
        ]

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        persona = self.get_object(request, unquote(object_id))
        context = dict(extra_context or {})
        if persona is not None:
            context.update(persona_gallery(persona=persona, page=request.GET.get(GALLERY_PARAM)))
            context["gallery_pages"] = gallery_page_links(request, context["sample_page"])
            latest = context["latest_request"]
            context["progress"] = request_progress(request=latest) if latest else None
            context["can_generate"] = self.has_change_permission(request, persona)
            context["progress_url"] = reverse("admin:personas_persona_progress", args=[persona.pk])
            context["devices"] = Device.objects.filter(retired_at__isnull=True)
            context["samples_max"] = samples_config()["MAX_PER_REQUEST"]
        return super().change_view(request, object_id, form_url, extra_context=context)

    def generate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return admin_views.generate_view(self, request, object_id)

    def progress_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return admin_views.progress_view(self, request, object_id)

    def cancel_view(self, request: HttpRequest, object_id: str, request_id: int) -> HttpResponse:
        return admin_views.cancel_view(self, request, object_id, request_id)

    @admin.action(description="Regenerate sample images", permissions=["change"])
    def regenerate_samples(self, request: HttpRequest, queryset: QuerySet[Persona]) -> None:
        admin_views.regenerate_samples(self, request, queryset)

    def image_view(self, request: HttpRequest, image_id: int) -> HttpResponseBase:
        image = self._viewable_image(request, image_id)
        return sample_file_response(image.image.name, image_id=image.pk)

    def thumbnail_view(self, request: HttpRequest, image_id: int) -> HttpResponseBase:
        image = self._viewable_image(request, image_id)
        return thumbnail_file_response(image.image.name, image.thumbnail, image_id=image.pk)

    def _viewable_image(self, request: HttpRequest, image_id: int) -> SampleImage:
        image = SampleImage.objects.select_related("persona").filter(pk=image_id).first()
        if image is None or not self.has_view_permission(request, image.persona):
            raise Http404("No such image.")
        return image

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


# The image models' admin (personas/admin_models.py) registers itself on import.
from personas import admin_models  # noqa: E402, F401
