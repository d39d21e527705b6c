"""Liveness and readiness probes for load balancers, systemd and Kubernetes: no login, no data.

/healthz says only that this process answers (it touches neither the database nor Redis, so a
database outage never gets a healthy web server restarted). /readyz says whether it can serve:
the database answers, Redis answers and every migration this code knows is applied. A failing
part is named with a short fixed reason and the exception's class, never its message: a driver's
message can carry host names, user names or a password in a URL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from gpuscheduler import queues

log = logging.getLogger(__name__)

Check = Callable[[], str | None]  # None when the part is fine, else a short reason


def _failed(part: str, what: str, exc: Exception) -> str:
    log.warning("readiness: %s: %s: %s", part, what, exc)  # the full message in the log only
    return f"{what} ({type(exc).__name__})"


def database_check() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver's error: a probe answers, it never raises
        return _failed("database", "the database does not answer", exc)
    return None


def redis_check() -> str | None:
    try:
        queues.redis_connection().ping()
    except Exception as exc:
        return _failed("redis", "Redis does not answer", exc)
    return None


def pending_migrations() -> list[str]:
    """The migrations this code has that the database has not applied (`app.name`), oldest first."""
    # Every node of the graph against the applied ones: migration_plan() stops at an applied leaf,
    # so a migration missing below one (a restore, a hand-edited table) went unnoticed.
    loader = MigrationExecutor(connection).loader
    applied = set(loader.applied_migrations)
    pending: dict[tuple[str, str], None] = {}
    for leaf in loader.graph.leaf_nodes():
        for node in loader.graph.forwards_plan(leaf):
            if node not in applied:
                pending[node] = None
    return [f"{app}.{name}" for app, name in pending]


def migrations_check() -> str | None:
    try:
        pending = pending_migrations()
    except Exception as exc:
        return _failed("migrations", "the applied migrations cannot be read", exc)
    if pending:
        shown = ", ".join(pending[:3]) + (f" and {len(pending) - 3} more" if len(pending) > 3 else "")
        return f"{len(pending)} migration(s) not applied: {shown}; run `manage.py migrate`"
    return None


CHECKS: dict[str, Check] = {"database": database_check, "redis": redis_check, "migrations": migrations_check}


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, dict[str, str]] = {}
    for part, check in CHECKS.items():
        if part == "migrations" and checks["database"]["status"] != "ok":
            checks[part] = {"status": "unknown", "reason": "the database does not answer"}
            continue
        reason = check()
        checks[part] = {"status": "ok"} if reason is None else {"status": "failing", "reason": reason}
    failing = [part for part, result in checks.items() if result["status"] != "ok"]
    if failing:
        return JsonResponse({"status": "not ready", "failing": failing, "checks": checks}, status=503)
    return JsonResponse({"status": "ready", "checks": checks})
