"""What a job running in a worker knows of its worker, and the heartbeat thread that keeps the
worker's leases alive.

SimpleWorker sends no heartbeat while a job runs. A daemon thread renews the attempt's lease in
the database (which the reconciler reads to detect dead workers within GPU_LEASE_SECONDS instead
of rq's 90-690 s), this worker's presence on its device row and rq's own worker/execution
heartbeats, every GPU_HEARTBEAT_INTERVAL seconds, from the moment the worker attaches to its
device: a real model loads for longer than the lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import close_old_connections, connection

from gpuscheduler import assignments, queues
from gpuscheduler import services as scheduler
from gpuscheduler.backends import Backend
from gpuscheduler.models import Assignment, AssignmentState, Device, WorkerState
from gpuscheduler.watchdog import Watchdog

if TYPE_CHECKING:
    from gpuscheduler.worker import GpuWorker

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a job running in this process needs to know about the worker it runs in."""

    device: Device
    name: str
    host: str
    generator: Any  # personas.imagegen.Generator: typed loosely to keep torch's adapter out of imports
    backend: Backend | None = None
    assignment_id: int | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    watchdog: Watchdog | None = None
    _switch: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return not self.lost.is_set()

    def mark_lost(self, assignment_id: int, state: str | None) -> None:
        """The heartbeat found `assignment_id` no longer running and in `state`: stop its work,
        unless the job already ended (the heartbeat may have read the id just before the job
        finished and the next one began) or ended well: the row of an attempt that has just
        committed (or gone back to waiting after a storage fault) is no longer RUNNING either,
        and the job is about to leave its `running` block; that is no alarm."""
        if state in (AssignmentState.SUCCEEDED, AssignmentState.QUEUED):
            return
        with self._switch:
            if self.assignment_id == assignment_id and not self.lost.is_set():
                log.warning("assignment %s is %s in the database; stopping its work", assignment_id, state or "gone")
                self.lost.set()

    @contextlib.contextmanager
    def running(self, assignment: Assignment, *, report: bool = True) -> Iterator[None]:
        """Mark an attempt as this worker's current one while its body runs."""
        with self._switch:
            self.assignment_id = assignment.pk
            self.lost.clear()
        if report:
            scheduler.worker_beat(
                device=self.device, name=self.name, state=WorkerState.BUSY, assignment_id=assignment.pk
            )
        try:
            yield
        finally:
            with self._switch:
                self.assignment_id = None
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
    """Keeps the attempt's lease, the device's worker presence and rq's heartbeats alive."""

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
        assignment_id = context.assignment_id
        if assignment_id is not None and not assignments.assignment_heartbeat(assignment_id=assignment_id):
            context.mark_lost(assignment_id, assignments.assignment_state(assignment_id=assignment_id))
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
