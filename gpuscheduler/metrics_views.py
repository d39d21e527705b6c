"""`/metrics` for Prometheus: who may read it, and the exposition.

With METRICS_TOKEN set, the `Authorization: Bearer <token>` header is the only way in (a scraper
has no session, and a signed-in admin gains nothing over the token). Without it, only a signed-in
staff user with the GPU status permission reads it, in a browser. Anyone else gets 401 or 403
with no data.
"""

from __future__ import annotations

import hmac
import logging

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client.exposition import choose_encoder

from gpuscheduler.admin import STATUS_PERMISSION
from gpuscheduler.metrics import scrape_registry

log = logging.getLogger(__name__)


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    refused = _refused(request)
    if refused is not None:
        return refused
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    try:
        body = encoder(scrape_registry())
    except DatabaseError as exc:
        # Prometheus records the failed scrape (up == 0); the error goes to the log, not to the scraper.
        log.error("/metrics: the database did not answer (%s)", exc)
        return _plain("The database did not answer; no metrics this time.", 503)
    return HttpResponse(body, content_type=content_type)


def _refused(request: HttpRequest) -> HttpResponse | None:
    token: str = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        response = _plain("A bearer token is required: Authorization: Bearer <METRICS_TOKEN>.", 401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    user = request.user
    if not user.is_authenticated:
        return _plain(f"Sign in to the admin as staff with {STATUS_PERMISSION}, or set METRICS_TOKEN.", 401)
    if not (user.is_active and user.is_staff and user.has_perm(STATUS_PERMISSION)):
        return _plain(f"Only staff with {STATUS_PERMISSION} may read the metrics.", 403)
    return None


def _plain(text: str, status: int) -> HttpResponse:
    return HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")
