"""Reads that run on every press, compiled once per process and, on PostgreSQL, prepared once
per connection (gpuscheduler/placement_reads.py uses them)."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

from django.db import connection
from django.db.models import QuerySet

# Placement runs the same two reads for every press, and Django compiles a queryset anew each time
# it is evaluated: on a 2-core machine, building and compiling the device read took 4 ms and
# running it 1.4 ms (bench/bench_placement.py). So these are compiled once per process (for each
# database vendor and whatever else their SQL holds: model, step count, lease) and run as plain
# SQL, rows as tuples. On PostgreSQL each is also prepared once per connection (PREPARE, sent
# with its first EXECUTE: one round trip either way): parsing and planning them was half of what
# the database spent on each (0.95 ms of server time then 0.45 for the device read, 0.55 then
# 0.27 for the backlogs). Like psycopg's own prepared statements, which Django leaves off, this
# does not suit a connection pooler in transaction mode (none is used: config/env.py).
_COMPILED: dict[tuple[Any, ...], tuple[str, tuple[Any, ...]]] = {}
# The name of each statement prepared on each open connection, by key (a new connection prepares
# them again). After a failed query string none is trusted (its PREPARE may or may not have run;
# an EXECUTE may have failed because its statement is gone: DEALLOCATE, DISCARD ALL), and the next
# reads prepare them again under new names: a name is never reused.
_PREPARED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()
_NAMES = itertools.count()


def compiled_rows(
    key: tuple[Any, ...], build: Callable[[], QuerySet[Any]], *, after: str = ""
) -> list[tuple[Any, ...]]:
    """The rows of `build()` (a values_list queryset), its SQL compiled once per `key` and vendor
    (and prepared once per connection, on PostgreSQL); `after`, a statement without parameters,
    runs first, on PostgreSQL in the same round trip."""
    full_key = (connection.vendor, *key)
    if full_key not in _COMPILED:
        sql, params = build().query.sql_with_params()
        _COMPILED[full_key] = (sql, tuple(params))
    sql, params = _COMPILED[full_key]
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            if after:
                cursor.execute(after)
            cursor.execute(sql, params)
            return list(cursor.fetchall())
        prepared = _PREPARED.setdefault(connection.connection, {})
        statements = [after] if after else []
        name = prepared.get(full_key)
        if name is None:
            # PREPARE outlives a rollback of the transaction it ran in: it is the session's.
            name = f"gpuscheduler_read_{next(_NAMES)}"
            compose = connection.ops.compose_sql  # type: ignore[attr-defined]  # PostgreSQL's operations only
            statements.append(f"PREPARE {name} AS {compose(sql, params)}")
        try:
            cursor.execute("; ".join([*statements, f"EXECUTE {name}"]))
        except Exception:
            prepared.clear()  # whatever this connection had prepared is prepared again
            raise
        prepared[full_key] = name
        while cursor.nextset():  # to the rows of the last statement
            pass
        return list(cursor.fetchall())
