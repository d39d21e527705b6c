"""Helpers shared by the admin views of both apps."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import admin
from django.contrib.admin import AdminSite
from django.contrib.admin.options import IS_FACETS_VAR, IS_POPUP_VAR, TO_FIELD_VAR
from django.contrib.admin.views.main import ALL_VAR, ERROR_FLAG, ORDER_VAR, PAGE_VAR, SEARCH_VAR
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.db import models
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.template.response import SimpleTemplateResponse
from django.urls import reverse

from config.numbers import is_ascii_int, parse_ascii_int

ID_MAX = 2**63 - 1  # the largest id a BigAutoField (and SQLite) can hold


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
    """Ids and numbers in admin URLs are ASCII digits; ids too large for the database answer like bad lookups.

    Django reads them with int(), which takes '٣' (and full-width digits, '+3', '3_0') for 3: the
    change page of '/٣/change/' showed object 3 and `?device=٣` filtered on device 3. Here such an
    id finds no object (the admin's usual "doesn't exist" answer) and such a filter goes back to the
    list with `?e=1` ("Database error" banner), as the admin answers other bad lookups. A 30-digit
    id used to reach SQLite as an integer it cannot hold and raised OverflowError, a 500: it gets
    the same answers.
    """

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Any:
        field = self.opts.pk if from_field is None else self.opts.get_field(from_field)
        if _holds_integers(field):
            try:
                if parse_ascii_int(object_id, what="The id") > ID_MAX:
                    return None  # SQLite raised OverflowError (a 500) for ids it cannot hold
            except ValueError:
                return None
        return super().get_object(request, object_id, from_field)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if not _numbers_are_ascii(self.model, request):
            if ERROR_FLAG in request.GET:  # what Django answers a bad lookup that already has ?e=1
                return SimpleTemplateResponse("admin/invalid_setup.html", {"title": "Database error"})
            return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")
        try:
            return super().changelist_view(request, extra_context)
        except OverflowError:
            return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")


# Transforms that compare a number (`?queued_at__year=2024`, the date hierarchy's links).
_NUMBER_TRANSFORMS = frozenset(
    ("year", "iso_year", "quarter", "month", "week", "week_day", "iso_week_day", "day", "hour", "minute", "second")
)
_ORDERING = re.compile(r"-?[0-9]+(?:\.-?[0-9]+)*", re.ASCII)


def _numbers_are_ascii(model: type[models.Model], request: HttpRequest) -> bool:
    """Whether every number in a changelist's query string (filters, page, ordering) is ASCII digits."""
    for key, values in request.GET.lists():
        if key in (SEARCH_VAR, IS_POPUP_VAR, TO_FIELD_VAR, ALL_VAR, IS_FACETS_VAR, ERROR_FLAG):
            continue
        for value in values:
            if key == PAGE_VAR and not is_ascii_int(value):
                return False
            if key == ORDER_VAR and not _ORDERING.fullmatch(value):
                return False
            if key not in (PAGE_VAR, ORDER_VAR) and _lookup_takes_integers(model, key):
                items = value.split(",") if key.endswith(("__in", "__range")) else [value]
                if not all(is_ascii_int(item) for item in items):
                    return False
    return True


def _lookup_takes_integers(model: type[models.Model], key: str) -> bool:
    """Whether a changelist lookup such as `persona__id__exact` or `device` compares whole numbers."""
    opts: Any = model._meta
    field: Any = None
    parts = key.split(LOOKUP_SEP)
    rest: list[str] = []
    for position, part in enumerate(parts):
        try:
            field = opts.pk if part == "pk" else opts.get_field(part)
        except FieldDoesNotExist:
            rest = parts[position:]
            break
        if field.is_relation and field.related_model is not None:
            opts = field.related_model._meta
    if "isnull" in rest:
        return False
    if _NUMBER_TRANSFORMS.intersection(rest):
        return True
    return field is not None and _holds_integers(field)


def _holds_integers(field: Any) -> bool:
    if isinstance(field, models.ForeignKey):
        field = field.target_field
    elif field.is_relation and field.related_model is not None:  # a reverse or many-to-many relation
        field = field.related_model._meta.pk
    return isinstance(field, models.IntegerField)
