"""The database connection of a long-lived process: checked before it matters, re-made after a fault.

A worker holds one connection for hours. After a pipeline call of up to SAMPLES_JOB_TIMEOUT
seconds, the connection it last used may have been closed by an idle-connection timeout, a
pooler or a failover; Django only notices when a query fails. These helpers check first, and
read again on a fresh connection when a write's outcome is unknown.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connection

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that say "the connection (or the server) failed", not "this statement is wrong": after
# one of them the same statement may succeed on a new connection.
CONNECTION_ERRORS = (OperationalError, InterfaceError)


def connection_ensure_usable() -> None:
    """Close this thread's connection if it no longer answers, so the next query opens a new one.

    Outside a transaction only: inside one, a new connection would silently drop its work.
    """
    if connection.in_atomic_block or connection.connection is None:
        return
    try:
        usable = connection.is_usable()
    except Exception:  # is_usable swallows database errors itself; anything else means "no"
        usable = False
    if not usable:
        log.info("the database connection went stale; opening a new one")
        connection.close()


def connection_reset() -> None:
    """Drop this thread's connection after a fault (whatever state it was left in)."""
    if connection.in_atomic_block:
        return
    with contextlib.suppress(DatabaseError):
        connection.close()


def read_with_reconnect(read: Callable[[], T], *, seconds: float, pause: float = 0.5) -> T:
    """Run `read` on a fresh connection, retrying connection faults for up to `seconds`.

    Raises the last connection error when the database stays unreachable.
    """
    deadline = time.monotonic() + seconds
    while True:
        connection_reset()
        try:
            return read()
        except CONNECTION_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("the database does not answer (%s); reading again in %.1f s", str(exc).strip(), pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
