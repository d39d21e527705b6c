from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from gpuscheduler.models import Device
from personas.services import validate_count


class GenerateSamplesForm(forms.Form):
    """The Generate sample images button: how many, and optionally on which device."""

    count = forms.CharField(max_length=12, strip=True)
    device = forms.ModelChoiceField(
        queryset=Device.objects.all(),
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
