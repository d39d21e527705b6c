"""Login throttling (django-axes): which address a login comes from, and the page a locked-out login gets."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db.models import Max
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

LOCKOUT_TEMPLATE = "admin/locked_out.html"


def client_ip(request: HttpRequest) -> str | None:
    """The address failures are counted for: the socket's, or behind a proxy the one the proxy saw.

    Only with DJANGO_BEHIND_PROXY=1 is X-Forwarded-For read, and then only its last entry, the one
    our proxy appended: earlier entries come from the client, who could rotate them to escape the
    count (or name someone else's address to lock them out).
    """
    remote = _address(request.META.get("REMOTE_ADDR", ""))
    if getattr(settings, "BEHIND_PROXY", False):
        forwarded = [entry for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if entry.strip()]
        if forwarded:
            return _address(forwarded[-1]) or remote
    return remote


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None  # the database column holds only IP addresses


def lockout_response(request: HttpRequest, original_response: Any = None, credentials: Any = None) -> HttpResponse:
    """The page for a login refused because of too many failures: for how long, from where, whom to ask."""
    from axes.helpers import get_client_username
    from axes.models import AccessAttempt

    username = get_client_username(request, credentials) or ""
    address = getattr(request, "axes_ip_address", None) or client_ip(request)
    cool_off = settings.AXES_COOLOFF_TIME
    last = AccessAttempt.objects.filter(username=username, ip_address=address).aggregate(last=Max("attempt_time"))
    until = (last["last"] or timezone.now()) + cool_off
    minutes = max(1, math.ceil((until - timezone.now()).total_seconds() / 60))
    context = {
        **admin.site.each_context(request),
        "title": "Sign-in locked",
        "username": username,
        "address": address or "your address",
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "minutes": minutes,
        "until": until,
        "cool_off_minutes": round(cool_off.total_seconds() / 60),
    }
    return render(request, LOCKOUT_TEMPLATE, context, status=settings.AXES_HTTP_RESPONSE_CODE)
