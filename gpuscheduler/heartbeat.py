"""What a job running in a worker knows of its worker, and the heartbeat thread that keeps the
worker's leases alive.

SimpleWorker sends no heartbeat while a job runs. A daemon thread renews the leases of the
attempts in the running call (one, or several batched together) in the database (which the
reconciler reads to detect dead workers within GPU_LEASE_SECONDS instead of rq's 90-690 s), this
worker's presence on its device row and rq's own worker/execution heartbeats, every
GPU_HEARTBEAT_INTERVAL seconds, from the moment the worker attaches to its device: a real model
loads for longer than the lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import close_old_connections, connection

from gpuscheduler import batching, queues
from gpuscheduler import services as scheduler
from gpuscheduler.backends import Backend
from gpuscheduler.models import Assignment, AssignmentState, Device, WorkerState
from gpuscheduler.watchdog import Watchdog

if TYPE_CHECKING:
    from gpuscheduler.worker import GpuWorker

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a job running in this process needs to know about the worker it runs in.

    A job runs one pipeline call for one or more attempts (cross-request batching,
    personas/batch.py): the heartbeat renews every attempt of the call, and the call goes on
    while at least one of them still holds its lease.
    """

    device: Device
    name: str
    host: str
    generator: Any  # personas.imagegen.Generator: typed loosely to keep torch's adapter out of imports
    backend: Backend | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    watchdog: Watchdog | None = None
    _running: list[int] = field(default_factory=list)
    _lost_ids: set[int] = field(default_factory=set)
    _settled: set[int] = field(default_factory=set)
    _switch: threading.Lock = field(default_factory=threading.Lock)
    _admitted_until: float = 0.0
    # What a call costs this worker besides the pipeline call itself (claims, files, commit), in
    # seconds, averaged over its recent calls: batching.call_size counts it as part of every call.
    call_overhead: float = 0.0

    def overhead_observe(self, seconds: float) -> None:
        """One call's cost around the pipeline call (an exponential average: a slow moment passes)."""
        seconds = max(0.0, seconds)
        self.call_overhead = seconds if self.call_overhead == 0 else 0.8 * self.call_overhead + 0.2 * seconds

    def admitted_for(self, seconds: float) -> None:
        """The worker was just admitted (its device and media store read fine): it may take work for
        `seconds` without reading them again."""
        self._admitted_until = time.monotonic() + seconds

    def admitted_recently(self) -> bool:
        return time.monotonic() < self._admitted_until

    def admission_expire(self) -> None:
        """Read the device and the media store again before the next job (a job met a storage fault)."""
        self._admitted_until = 0.0

    @property
    def assignment_id(self) -> int | None:
        """The attempt this worker reports as its current one: the first of its call that still
        holds its lease (None when idle)."""
        with self._switch:
            holding = [pk for pk in self._running if pk not in self._lost_ids and pk not in self._settled]
            return next(iter(holding or self._running), None)

    @property
    def assignment_ids(self) -> list[int]:
        """The attempts of the running call whose leases the heartbeat keeps (not those settled)."""
        with self._switch:
            return [pk for pk in self._running if pk not in self._settled]

    def alive(self) -> bool:
        """Whether the running call should go on: at least one of its attempts holds its lease."""
        return not self.lost.is_set()

    def is_lost(self, assignment_id: int) -> bool:
        with self._switch:
            return assignment_id in self._lost_ids

    def mark_lost(self, assignment_id: int, state: str | None) -> None:
        """The heartbeat found `assignment_id` no longer running and in `state`: drop its work, and
        stop the call once none of its attempts is left, unless the job already ended (the
        heartbeat may have read the id just before the job finished and the next one began) or
        ended well: the row of an attempt that has just committed (or gone back to waiting after a
        storage fault) is no longer RUNNING either, and the job is about to settle it; that is no
        alarm."""
        if state in (AssignmentState.SUCCEEDED, AssignmentState.QUEUED):
            return
        with self._switch:
            if assignment_id not in self._running or assignment_id in self._lost_ids:
                return
            self._lost_ids.add(assignment_id)
            everything = all(pk in self._lost_ids or pk in self._settled for pk in self._running)
            log.warning(
                "assignment %s is %s in the database; %s",
                assignment_id,
                state or "gone",
                "stopping its work" if everything else "its images will be dropped, the call goes on for the others",
            )
            if everything:
                self.lost.set()

    def add_running(self, assignment: Assignment) -> None:
        """Add an attempt, claimed for the running call, to the ones the heartbeat renews."""
        with self._switch:
            if assignment.pk not in self._running:
                self._running.append(assignment.pk)

    def settle(self, assignment_id: int) -> None:
        """The job is done with this attempt (committed, failed or put back to waiting): stop
        renewing it, so a requeued attempt that another worker claims is not kept alive by this one."""
        with self._switch:
            self._settled.add(assignment_id)

    @contextlib.contextmanager
    def running(self, assignment: Assignment, *, report: bool = True) -> Iterator[None]:
        """Mark an attempt as this worker's current one while its body runs (add_running adds the
        attempts batched into its call)."""
        with self._switch:
            self._running = [assignment.pk]
            self._lost_ids, self._settled = set(), set()
            self.lost.clear()
        if report:
            scheduler.worker_beat(
                device=self.device, name=self.name, state=WorkerState.BUSY, assignment_id=assignment.pk
            )
        try:
            yield
        finally:
            with self._switch:
                self._running = []
                self._lost_ids, self._settled = set(), set()
            if report:
                scheduler.worker_beat(device=self.device, name=self.name, state=WorkerState.IDLE)


_context: WorkerContext | None = None


def set_context(context: WorkerContext | None) -> None:
    global _context
    _context = context


def current_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError(
            "This job runs only inside `python manage.py gpuworker` (or regenerate_samples --sync): "
            "a plain rqworker is not bound to a device."
        )
    return _context


# --- heartbeats -------------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Keeps the running attempts' leases, the device's worker presence and rq's heartbeats alive."""

    def __init__(
        self, context: WorkerContext, interval: float, worker: GpuWorker | None = None, *, presence: bool = False
    ) -> None:
        super().__init__(name="gpuworker-heartbeat", daemon=True)
        self.context = context
        self.worker = worker
        # A worker holds its device from the moment it attaches: while it loads its model
        # (12-18 s for a real one, longer than the lease) its presence is renewed as STARTING.
        # A --sync run holds no worker slot.
        self.presence = presence or worker is not None
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # a Redis or database blip must not end the heartbeats
                log.exception("heartbeat failed; trying again in %.1f s", self.interval)
                close_old_connections()
            if self.stopping.wait(self.interval):
                break
        connection.close()

    def beat(self) -> None:
        context = self.context
        running = context.assignment_ids
        if running:
            for lost, state in batching.attempts_heartbeat(assignment_ids=running).items():
                context.mark_lost(lost, state)
        assignment_id = context.assignment_id
        if not self.presence:
            return  # a --sync run holds no worker slot and no rq registration
        if self.worker is None:
            state = WorkerState.BUSY if assignment_id else WorkerState.STARTING
        else:
            state = WorkerState.BUSY if assignment_id else self.worker.idle_state
        if not scheduler.worker_beat(
            device=context.device, name=context.name, state=state, assignment_id=assignment_id
        ):
            log.error("another worker has taken over %s; this one stops after its current job", context.device.label)
            if self.worker is None:
                os.kill(os.getpid(), signal.SIGTERM)  # still loading its model: stop now, cleanly
                return
            self.worker.request_stop_soon()
        if self.worker is None or self.worker.birth_date is None:
            return  # rq has not registered the worker yet: a heartbeat now would make its key exist
        with contextlib.suppress(*queues.REDIS_ERRORS):
            job, execution = self.worker.running
            if job is not None and execution is not None:
                self.worker.maintain_heartbeats(job, execution)
            else:
                self.worker.heartbeat()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=self.interval + 5)
