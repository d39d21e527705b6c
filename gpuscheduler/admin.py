from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from gpuscheduler.models import Assignment, Device


class ReadOnlyAdmin(admin.ModelAdmin):
    """The scheduler writes these rows; people only read them."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Device)
class DeviceAdmin(ReadOnlyAdmin):
    list_display = ["label", "short_uuid", "host", "kind", "health", "health_reason", "worker_state", "worker_seen_at", "last_seen"]
    list_filter = ["health", "kind", "host", "worker_state"]
    search_fields = ["uuid", "name", "host", "pci_bus_id"]


@admin.register(Assignment)
class AssignmentAdmin(ReadOnlyAdmin):
    list_display = [
        "job_id",
        "kind",
        "request_link",
        "images",
        "attempt",
        "state",
        "planned_device",
        "device",
        "worker_name",
        "queued_at",
        "started_at",
        "finished_at",
    ]
    list_filter = ["state", "kind", "device", "planned_device", "policy"]
    search_fields = ["job_id", "worker_name", "request__persona__name", "reason", "error"]
    list_select_related = ["request__persona", "planned_device", "device"]
    date_hierarchy = "queued_at"

    @admin.display(description="Images")
    def images(self, obj: Assignment) -> str:
        return f"{obj.first_index + 1}-{obj.last_index + 1}" if obj.image_count > 1 else str(obj.first_index + 1)

    @admin.display(description="Request")
    def request_link(self, obj: Assignment) -> str:
        if obj.request is None:
            return "–"
        url = reverse("admin:personas_persona_change", args=[obj.request.persona_id])
        return format_html('<a href="{}">{} #{}</a>', url, obj.request.persona.name, obj.request_id)
