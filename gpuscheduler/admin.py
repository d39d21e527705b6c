from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from config.numbers import is_ascii_int, parse_ascii_int
from gpuscheduler.clock import DbNow
from gpuscheduler.models import Assignment, AssignmentState, Device, GpuStatusPage
from gpuscheduler.policies import stale_reason
from gpuscheduler.selectors import STALE, device_stale, worker_alive
from gpuscheduler.status import status_page
from gpuscheduler.views import OutOfRangeLookupMixin, staff_view

STATUS_PERMISSION = "gpuscheduler.view_gpu_status"
STATUS_TEMPLATE = "admin/gpuscheduler/gpustatuspage/status.html"
# The fragments the page's script swaps in; each is also part of the full page.
STATUS_FRAGMENTS = {
    "storage": "admin/gpuscheduler/gpustatuspage/storage.html",
    "cards": "admin/gpuscheduler/gpustatuspage/cards.html",
    "queues": "admin/gpuscheduler/gpustatuspage/queues.html",
    "assignments": "admin/gpuscheduler/gpustatuspage/assignments.html",
}
REFRESH_SECONDS = 5


class ReadOnlyAdmin(OutOfRangeLookupMixin):
    """The scheduler writes these rows; people only read them."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Device)
class DeviceAdmin(ReadOnlyAdmin):
    list_display = [
        "label",
        "short_uuid",
        "host",
        "kind",
        "health_now",
        "health_reason",
        "worker",
        "worker_seen_at",
        "last_seen",
        "retired_at",
    ]
    list_filter = ["health", "kind", "host", "worker_state", ("retired_at", admin.EmptyFieldListFilter)]
    search_fields = ["uuid", "name", "host", "pci_bus_id"]

    def get_queryset(self, request: HttpRequest) -> Any:
        # The database's time with every row (one clock for the cluster: gpuscheduler/clock.py).
        return super().get_queryset(request).annotate(db_now=DbNow())

    # The stored columns say what was last written; a dead host writes nothing, so show what they mean now.
    @admin.display(description="Health", ordering="health")
    def health_now(self, obj: Device) -> str:
        silent = device_stale(obj, getattr(obj, "db_now", None))
        return obj.health if silent is None else f"{STALE} ({stale_reason(silent)}; last recorded {obj.health})"

    @admin.display(description="Worker", ordering="worker_state")
    def worker(self, obj: Device) -> str:
        return obj.worker_state if worker_alive(obj, getattr(obj, "db_now", None)) else "missing"


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
        return obj.images_label

    @admin.display(description="Request")
    def request_link(self, obj: Assignment) -> str:
        if obj.request is None:
            return "-"
        url = reverse("admin:personas_persona_change", args=[obj.request.persona_id])
        return format_html('<a href="{}">{} #{}</a>', url, obj.request.persona.name, obj.request_id)


@admin.register(GpuStatusPage)
class GpuStatusAdmin(ReadOnlyAdmin):
    """The GPU status page: no table, a page of its own behind its own permission (the django-rq way)."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(STATUS_PERMISSION)

    def get_urls(self) -> list[Any]:
        # Only the page and its data: the default add/change/history views would query a table
        # that does not exist.
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("", staff_view(self.admin_site, self.changelist_view), name=f"{prefix}_changelist"),
            path("data.json", staff_view(self.admin_site, self.data_view), name=f"{prefix}_data"),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        page = status_page(**_filters(request))
        context = {
            **self.admin_site.each_context(request),
            "title": "GPU status",
            "subtitle": None,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "page": page,
            "data_url": reverse("admin:gpuscheduler_gpustatuspage_data", current_app=self.admin_site.name),
            "refresh_seconds": REFRESH_SECONDS,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, STATUS_TEMPLATE, context)

    def data_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            return JsonResponse({"error": f"You need the {STATUS_PERMISSION} permission."}, status=403)
        page = status_page(**_filters(request))
        if request.GET.get("fragments"):
            context = {"page": page}
            page["html"] = {key: render_to_string(name, context, request) for key, name in STATUS_FRAGMENTS.items()}
        return JsonResponse(page)


def _filters(request: HttpRequest) -> dict[str, Any]:
    """The assignment table's filters from the query string; values that name nothing are ignored."""
    device = request.GET.get("device", "")
    state = request.GET.get("state", "")
    return {
        # ASCII digits only: '٣'.isdecimal() is true and int('٣') is 3.
        "device_id": parse_ascii_int(device, what="device") if is_ascii_int(device) and len(device) < 16 else None,
        "state": state if state in AssignmentState.values else None,
    }
