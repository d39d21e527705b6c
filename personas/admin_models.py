"""The admin of image models (personas/image_models.py): validation with named errors, one default,
and no deletion of the default model or of a model personas use."""

from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.db import transaction
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from gpuscheduler.views import OutOfRangeLookupMixin
from personas.image_models import (
    ModelNotDeletable,
    image_model_delete_refusal,
    image_model_save,
    image_models_delete,
    model_key,
    size_errors,
    source_check,
    spec_of,
)
from personas.models import ImageModel, Persona

log = logging.getLogger(__name__)


class ImageModelForm(forms.ModelForm):  # type: ignore[type-arg]
    """An image model's fields, checked as a worker would read them; the default must stay enabled.
    Default is the form's own field: with the model's, the form would check the one-default constraint
    first and refuse every new default (saving unsets the previous default in the same transaction)."""

    default = forms.BooleanField(
        required=False, label="Default", help_text=ImageModel._meta.get_field("is_default").help_text
    )

    class Meta:
        model = ImageModel
        fields = [
            "name",
            "source",
            "enabled",
            "width",
            "height",
            "steps",
            "guidance_scale",
            "scheduler",
            "dtype",
            "safety_checker",
        ]
        error_messages = {
            "scheduler": {
                "invalid_choice": "%(value)s is not a scheduler diffusers ships: pick one from the list, or leave "
                "it empty for the scheduler the model was saved with."
            },
            "dtype": {"invalid_choice": "%(value)s is not a dtype: pick auto, float16, bfloat16 or float32."},
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial.setdefault("default", self.instance.is_default)

    def clean_source(self) -> str:
        return source_check(self.cleaned_data["source"])

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        for field, message in size_errors(data.get("width"), data.get("height")).items():
            if field in data:
                self.add_error(field, message)
        stored_default = ImageModel.objects.filter(pk=self.instance.pk or 0, is_default=True).exists()
        if stored_default and not data.get("default"):
            self.add_error(
                "default",
                "One model is always the default: to change it, open the model that should be the default and "
                "tick Default there.",
            )
        elif data.get("default") and not data.get("enabled"):
            self.add_error(
                "enabled",
                "The default model cannot be disabled: make another model the default first, then disable this one."
                if stored_default
                else "A model made the default must be enabled: tick Enabled too, or leave Default unticked.",
            )
        return data


@admin.register(ImageModel)
class ImageModelAdmin(OutOfRangeLookupMixin):
    form = ImageModelForm
    list_display = [
        "name",
        "source",
        "size",
        "steps",
        "scheduler_name",
        "safety_checker",
        "enabled",
        "is_default",
        "persona_total",
    ]
    list_filter = ["enabled", "safety_checker", "dtype"]
    search_fields = ["name", "source"]
    readonly_fields = ["key", "created", "updated"]
    fieldsets = [
        (None, {"fields": ["name", "source", "enabled", "default"]}),
        ("How images are made", {"fields": ["width", "height", "steps", "guidance_scale", "scheduler", "dtype"]}),
        ("Safety", {"fields": ["safety_checker"]}),
        ("Record", {"classes": ["collapse"], "fields": ["key", "created", "updated"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ImageModel]:
        used = Persona.objects.filter(image_model=OuterRef("pk")).values("image_model").annotate(n=Count("pk"))
        return super().get_queryset(request).annotate(persona_total=Subquery(used.values("n")))

    @admin.display(description="Size")
    def size(self, obj: ImageModel) -> str:
        return f"{obj.width}x{obj.height}" if obj.width and obj.height else "the model's own"

    @admin.display(description="Scheduler", ordering="scheduler")
    def scheduler_name(self, obj: ImageModel) -> str:
        return obj.scheduler or "the model's own"

    @admin.display(description="Personas", ordering="persona_total")
    def persona_total(self, obj: ImageModel) -> int:
        return getattr(obj, "persona_total", None) or 0

    @admin.display(description="Key")
    def key(self, obj: ImageModel) -> str:
        # What requests made now record and what workers, cost curves and placement know it by.
        return model_key(spec_of(obj)) if obj.pk else "(given on save)"

    def save_model(self, request: HttpRequest, obj: ImageModel, form: Any, change: bool) -> None:
        obj.is_default = form.cleaned_data["default"]
        image_model_save(image_model=obj)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        obj = self.get_object(request, unquote(object_id))
        allowed = obj is not None and self.has_delete_permission(request, obj)
        refusal = image_model_delete_refusal(image_model=obj) if allowed else None
        try:
            if refusal is None:
                return super().delete_view(request, object_id, extra_context)
        except ModelNotDeletable as exc:  # made the default or chosen by a persona since the check
            refusal = str(exc)
        self.message_user(request, refusal, messages.ERROR)
        return HttpResponseRedirect(reverse("admin:personas_imagemodel_change", args=[object_id]))

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[Any, Any], set[Any], list[Any]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # The bulk delete's page lists what stops it; a default model stops it too.
        refusals = [image_model_delete_refusal(image_model=obj) for obj in objs if obj.is_default]
        return deleted, counts, perms_needed, [*protected, *filter(None, refusals)]

    def delete_model(self, request: HttpRequest, obj: ImageModel) -> None:
        image_models_delete(image_models=[obj])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ImageModel]) -> None:
        image_models_delete(image_models=list(queryset))

    def response_action(self, request: HttpRequest, queryset: QuerySet[ImageModel]) -> HttpResponse | None:
        # One transaction: a refused bulk delete leaves no "deleted" entries in the admin's log.
        try:
            with transaction.atomic():
                return super().response_action(request, queryset)
        except ModelNotDeletable as exc:
            self.message_user(request, f"Nothing was deleted. {exc}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
