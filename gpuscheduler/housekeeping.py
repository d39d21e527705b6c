"""Periodic chores, run by gpumonitor once per interval, cluster-wide.

Each app registers its chores in its AppConfig.ready() (gpuscheduler: snapshot compaction and
retention, device retirement; personas: the orphan sweep; the scheduler imports nothing of the
apps above it), and gpumonitor calls run_due() every tick. Each chore runs in its own Redis turn,
so with a monitor on every host one of them runs it per interval. While Redis is down every
monitor runs each chore once per interval of its own, so a chore must be safe to run on two
hosts at once (compaction checks that it folds each reading once: services.snapshots_compact).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpuscheduler import queues

log = logging.getLogger(__name__)


@dataclass
class _Chore:
    name: str
    every_seconds: float
    fn: Callable[[], object]
    last_run: float | None = None  # time.monotonic() of this process's last run


_chores: dict[str, _Chore] = {}


def register(name: str, every_seconds: float, fn: Callable[[], object]) -> None:
    """Run `fn` once per `every_seconds` across the cluster (registering a name again replaces it)."""
    if not every_seconds > 0:
        raise ValueError(f"housekeeping chore {name!r}: every_seconds must be positive, not {every_seconds!r}")
    _chores[name] = _Chore(name=name, every_seconds=float(every_seconds), fn=fn)


def registered() -> list[str]:
    return list(_chores)


def run_due() -> list[str]:
    """Run each chore whose turn this process wins; a failing chore is logged and the rest go on.

    Returns the names of the chores run.
    """
    ran = []
    for chore in list(_chores.values()):
        now = time.monotonic()
        # take_turn answers True to everyone while Redis is down; this process's own clock then
        # still keeps each monitor to one run per interval.
        if chore.last_run is not None and now - chore.last_run < chore.every_seconds:
            continue
        if not queues.take_turn(f"housekeeping:{chore.name}", chore.every_seconds):
            continue
        chore.last_run = now
        ran.append(chore.name)
        try:
            chore.fn()
        except Exception:
            log.exception("housekeeping chore %s failed; it runs again in %.0f s", chore.name, chore.every_seconds)
    return ran
