"""Helpers shared by the admin views of both apps."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.contrib.admin import AdminSite
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.urls import reverse


def staff_view(site: AdminSite, view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """admin_view (login, CSRF, never-cache) that answers 403 to a signed-in user who is not staff.

    Django's admin_view sends every non-staff user to the login page; for the URLs that change
    state or return data, a signed-in user without staff rights gets a plain 403 instead.
    """

    # The staff check runs before admin_view's own, which would send a non-staff user to the login page.
    protected = site.admin_view(view)

    @wraps(view)
    def inner(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login", current_app=site.name))
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("Staff only.")
        return protected(request, *args, **kwargs)

    return inner


class OutOfRangeLookupMixin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A changelist URL with an integer too large for the database answers like any bad lookup.

    Django turns unknown URL parameters into lookups (`?device=123`); a 30-digit id reaches
    SQLite as an integer it cannot hold and raised OverflowError, a 500. Answer as the admin
    does for other bad lookups: back to the list with `?e=1` ("Database error" banner).
    """

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        try:
            return super().changelist_view(request, extra_context)
        except OverflowError:
            return HttpResponseRedirect(f"{request.path}?e=1")
