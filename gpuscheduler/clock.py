"""One clock for the whole cluster: the database's.

Leases, heartbeats, deadlines and "seen at" times are written by one host and judged by another
(the reconciler runs wherever it wins its turn, the status page on the web host). Each host's own
clock may be seconds off: a worker 30 s behind never counted as live, and a reconciler running
ahead abandoned every other host's attempts. So every such time is the database's:

- Writes put `DbNow()` straight into the UPDATE or INSERT (`heartbeat_at=DbNow()`), or a value of
  `db_now()` where one time is written to several columns or also shown in a message.
- Comparisons ("older than the lease") run in the database (`heartbeat_at__lt=DbNow() - lease()`)
  or against `db_now()` read once per pass (a reconcile pass, a monitor tick, a status render).
- `timezone.now()` and `time.time()` are for nothing shared: logs, and durations within one
  process (which use `time.monotonic()`).

Times shown to people are in settings.TIME_ZONE, with the zone's name where a time stands alone
(`clock_text`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db import connections
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.dateparse import parse_datetime

# SQLite: the current time as Django writes datetimes there (str() of a naive UTC datetime:
# microseconds, or none at all when they are zero), so a value written here compares equal to
# the same value read back and written again (the conditional UPDATEs of recovery and attach do
# that). SQLite computes 'now' once per statement, so the parts agree. Doubled %% as in Django's
# Now: the template is %-formatted once, then the backend turns %% into %.
_SQLITE_NOW = (
    "(CASE WHEN SUBSTR(STRFTIME('%%%%f', 'now'), -3) = '000' "
    "THEN STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%S', 'now') "
    "ELSE STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'now') || '000' END)"
)


class DbNow(Now):
    """The database's current time as an expression: STATEMENT_TIMESTAMP() on PostgreSQL (not
    now(), which is the start of the transaction), the time of the statement on SQLite."""

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        return self.as_sql(compiler, connection, template=_SQLITE_NOW, **extra_context)


def db_now(using: str = "default") -> datetime:
    """The database's current time, aware, in UTC: one query."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'now')")
            value = parse_datetime(cursor.fetchone()[0])
            assert value is not None
            return value.replace(tzinfo=UTC)
        cursor.execute("SELECT STATEMENT_TIMESTAMP()")
        value = cursor.fetchone()[0]
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


def clock_text(value: datetime, now: datetime | None = None) -> str:
    """A time for people, in TIME_ZONE with the zone's name: "14:03:04 CEST", or "Mar 02 14:03 CET"
    when it lies more than 20 hours from `now`."""
    local = timezone.localtime(value)
    if now is not None and abs((now - value).total_seconds()) > 20 * 3600:
        return f"{local:%b %d %H:%M %Z}"
    return f"{local:%H:%M:%S %Z}"
