"""Prometheus metrics, read from the database (and Redis) when Prometheus scrapes `/metrics`.

Nothing is counted in the web process: with several gunicorn workers on several machines each
process would count only the requests it served, and a restart would lose the counts. Every value
is read at scrape time from the rows all processes write, so any web process answers the same.

The scheduler's own metrics come from gpuscheduler/metrics_collect.py. Apps above the scheduler
add theirs with `register_collector` in their AppConfig.ready() (personas: request latency), as
they register housekeeping chores, so this app imports nothing of theirs.

Histograms over stored rows are computed in SQL (a count per bucket, in one query) over a bounded
window, and exposed as gauge histograms: the distribution of the window's rows now, not counters
since the process started. histogram_quantile() works on their buckets as they are (no rate()).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.models import F, FloatField, Func, QuerySet
from prometheus_client.core import GaugeHistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gpuscheduler.clock import db_now

# A collector gets the database's time, read once per scrape, and yields metric families.
Collect = Callable[[datetime], Iterable[Metric]]

_collectors: dict[str, Collect] = {}


def register_collector(name: str, fn: Collect) -> None:
    """Add `fn`'s metric families to every scrape (registering a name again replaces it)."""
    _collectors[name] = fn


def registered() -> list[str]:
    return list(_collectors)


class _Scrape(Collector):
    """One scrape: the database's time read once, then the scheduler's metrics and each app's."""

    def collect(self) -> Iterator[Metric]:
        from gpuscheduler.metrics_collect import scheduler_metrics  # it uses this module's helpers

        now = db_now()
        yield from scheduler_metrics(now)
        for fn in list(_collectors.values()):
            yield from fn(now)


def scrape_registry() -> CollectorRegistry:
    """A registry whose collect() reads everything afresh (a new one per scrape costs nothing)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape())
    return registry


# --- histograms computed in SQL ------------------------------------------------------------------


class SecondsBetween(Func):
    """`end - start` in seconds, as a float, computed by the database itself. Django's own
    subtraction of two datetimes calls a Python function per row and comparison on SQLite: 1.2 s
    for the latency histogram of 20,000 requests, against milliseconds here."""

    arity = 2
    output_field = FloatField()
    template = "EXTRACT(EPOCH FROM (%(expressions)s))::double precision"  # PostgreSQL
    arg_joiner = " - "

    def __init__(self, end: Any, start: Any) -> None:
        super().__init__(end, start)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Whole seconds, then the microseconds Django writes after them ('... HH:MM:SS.ffffff'):
        # JULIANDAY's doubles are off by up to 0.1 ms at today's dates, enough to move a row across
        # a bucket's bound.
        end, end_params = compiler.compile(self.source_expressions[0])
        start, start_params = compiler.compile(self.source_expressions[1])
        sql = (
            f"((STRFTIME('%%s', {end}) - STRFTIME('%%s', {start})) "
            f"+ (CAST(SUBSTR({end}, 20) AS REAL) - CAST(SUBSTR({start}, 20) AS REAL)))"
        )
        return sql, (*end_params, *start_params, *end_params, *start_params)


def histogram_counts(
    rows: QuerySet[Any], *, value: str, bounds: Sequence[float], by: Sequence[str] = ()
) -> list[tuple[tuple[Any, ...], list[int], float]]:
    """Per group of `by`: the cumulative count of rows whose `value` (seconds) is at most each
    bound (the last entry counts every row, +Inf), and the sum of `value`. One query.

    `value` is worked out once per row in a materialized CTE, then compared with each bound: as
    a FILTER on each count the database computed it once per bound (SQLite, 20,000 requests: 134 ms
    against 28 ms), and the ORM has no way to aggregate over a subquery.
    """
    inner = rows.order_by().values(**{f"g{i}": F(name) for i, name in enumerate(by)}, v=F(value))
    sql, params = inner.query.sql_with_params()
    # Only the ORM's own SQL (its values as parameters) and our aliases go into the text.
    groups = ", ".join(f"g{i}" for i in range(len(by)))
    counts = ", ".join("SUM(CASE WHEN v <= %s THEN 1 ELSE 0 END)" for _ in bounds)
    select = f"{groups}, {counts}" if by else counts
    query = f"WITH t AS MATERIALIZED ({sql}) SELECT {select}, COUNT(*), SUM(v) FROM t"  # noqa: S608
    if by:
        query += f" GROUP BY {groups} ORDER BY {groups}"
    with connections[rows.db].cursor() as cursor:
        cursor.execute(query, (*params, *bounds))
        found = cursor.fetchall()
    result = []
    for row in found:
        keys, numbers = tuple(row[: len(by)]), row[len(by) :]
        cumulative = [int(n or 0) for n in numbers[: len(bounds) + 1]]
        if cumulative[-1]:
            result.append((keys, cumulative, float(numbers[-1] or 0.0)))
    return result


def gauge_histogram(
    name: str,
    documentation: str,
    labels: Sequence[str],
    bounds: Sequence[float],
    groups: Iterable[tuple[Sequence[str], list[int], float]],
) -> GaugeHistogramMetricFamily:
    """A gauge histogram family from histogram_counts' groups (their label values given as strings)."""
    family = GaugeHistogramMetricFamily(name, documentation, labels=list(labels))
    edges = [floatToGoString(b) for b in bounds] + ["+Inf"]
    for label_values, counts, total in groups:
        family.add_metric(list(label_values), list(zip(edges, counts, strict=True)), total)
    return family
