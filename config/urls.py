from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import django_rq.admin
import django_rq.models
import django_rq.urls
from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import URLPattern, include, path, reverse
from django.views.generic import RedirectView

from config import health
from gpuscheduler.metrics_views import metrics_view

View = Callable[..., HttpResponseBase]


def superuser_view(view: View) -> View:
    """Anonymous callers go to the admin login; signed-in users who are not superusers get a 403.

    django-rq's own views only ask for staff, yet they delete, requeue and stop jobs and empty
    whole queues: a staff user with no permission on anything could wipe every GPU's queue.
    """

    @wraps(view)
    def inner(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        if not (request.user.is_active and request.user.is_superuser):
            raise PermissionDenied("The RQ dashboard is for superusers only.")
        return view(request, *args, **kwargs)

    return inner


def superuser_only(patterns: list[Any]) -> list[URLPattern]:
    return [URLPattern(p.pattern, superuser_view(p.callback), p.default_args, p.name) for p in patterns]


class RqDashboardAdmin(django_rq.admin.QueueAdmin):
    """django-rq's admin index entry and its copy of the dashboard under /admin/django_rq/, for superusers."""

    # The model behind the entry has no table: its add/change/delete/history URLs could only fail.
    _CRUD = ("add", "history", "delete", "change")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        crud = {f"{self.opts.app_label}_{self.opts.model_name}_{name}" for name in self._CRUD}
        return superuser_only([p for p in super().get_urls() if p.name and p.name not in crud])


if admin.site.is_registered(django_rq.models.Dashboard):
    admin.site.unregister(django_rq.models.Dashboard)
    admin.site.register(django_rq.models.Dashboard, RqDashboardAdmin)

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/rq/", include((superuser_only(django_rq.urls.urlpatterns), "django_rq"))),
    path("admin/", admin.site.urls),
    # Prometheus: a bearer token (METRICS_TOKEN) or a staff session with the GPU status permission.
    path("metrics", metrics_view, name="metrics"),
]
