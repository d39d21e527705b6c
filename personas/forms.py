from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db import models

from config.numbers import parse_ascii_int
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Device
from personas.models import Persona
from personas.services import validate_count


class AsciiIntegerField(forms.IntegerField):
    """A whole number written with the digits 0-9: Django's IntegerField reads '٤', '1_6' and '+4' too."""

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        try:
            return parse_ascii_int(value, what="The number", signed=True)
        except ValueError as exc:
            raise ValidationError(str(exc), code="invalid") from None


class AsciiModelChoiceField(forms.ModelChoiceField):  # type: ignore[type-arg]
    """A choice by id written with the digits 0-9: an IntegerField lookup took '٣' for object 3."""

    def to_python(self, value: Any) -> Any:
        if value not in self.empty_values and not isinstance(value, models.Model):
            try:
                parse_ascii_int(value, what="The id")
            except ValueError:
                raise ValidationError(
                    self.error_messages["invalid_choice"], code="invalid_choice", params={"value": value}
                ) from None
        return super().to_python(value)


class GenerateSamplesForm(forms.Form):
    """The Generate sample images button: how many, and optionally on which device."""

    count = forms.CharField(max_length=12, strip=True)
    device = AsciiModelChoiceField(
        queryset=Device.objects.filter(retired_at__isnull=True),
        required=False,
        empty_label="Any healthy GPU (policy)",
        error_messages={"invalid_choice": "That device does not exist (any more): pick one from the list."},
    )

    def clean_count(self) -> int:
        try:
            return validate_count(self.cleaned_data["count"])
        except ValidationError as exc:
            raise ValidationError(exc.messages[0]) from None

    def error_text(self) -> str:
        parts: list[str] = []
        for field, errors in self.errors.items():
            label = "Count" if field == "count" else "Device" if field == "device" else "Form"
            parts.extend(f"{label}: {error}" for error in errors)
        return " ".join(parts)


class PersonaAdminForm(forms.ModelForm):  # type: ignore[type-arg]
    """The persona change form: its default count must fit one request (SAMPLES_MAX_PER_REQUEST)."""

    class Meta:
        model = Persona
        fields = [
            "name",
            "slug",
            "description",
            "appearance_prompt",
            "negative_prompt",
            "default_sample_count",
            "base_seed",
        ]
        field_classes = {"default_sample_count": AsciiIntegerField, "base_seed": AsciiIntegerField}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields.get("default_sample_count")
        if field is not None:
            maximum = int(samples_config()["MAX_PER_REQUEST"])
            field.widget.attrs["max"] = maximum
            field.help_text = f"Images per press of Generate sample images: 1 to {maximum} (SAMPLES_MAX_PER_REQUEST)."

    def clean_default_sample_count(self) -> int:
        try:
            return validate_count(self.cleaned_data["default_sample_count"])
        except ValidationError as exc:
            raise ValidationError(exc.messages[0], code=exc.code) from None
