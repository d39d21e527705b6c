"""The per-GPU worker: one long-lived RQ worker process bound to one device.

Why rq's SimpleWorker and not the default forking Worker: the forking worker runs every job in
a fresh child, which rebuilt the model on every job on the H100 (12-18 s each, 79.5 s for four
jobs against 20.5 s), and a forked child cannot use CUDA once the parent touched it ("Cannot
re-initialize CUDA in forked subprocess"). SimpleWorker runs jobs in its own process, so the
pipelines stay warm: the first job loads the model, later ones start at once.

What SimpleWorker lacks, and how this module adds it:
- Heartbeats during a job: SimpleWorker sends none while a job runs. A daemon thread
  (gpuscheduler/heartbeat.py) renews the attempt's lease, the worker's presence on its device
  and rq's own heartbeats, from the moment the worker attaches to its device.
- Hangs in native code: rq's SIGALRM timeout cannot interrupt a CUDA call. A watchdog child
  process is told each job's deadline through a pipe and SIGKILLs this worker when the deadline
  plus GPU_WATCHDOG_GRACE passes; `gpuworkers` restarts it and the reconciler re-runs the work.
  The watchdog exits by itself when its pipe closes, so it never outlives the worker.
- Admission: before every dequeue the worker reads its own device; while the device is not
  healthy it takes no work (its queue is drained by the other workers, which read every
  device's queue after their own). A device on probation runs a one-image canary first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import redis
from django.db import DatabaseError, close_old_connections
from rq import Queue, SimpleWorker
from rq.exceptions import DequeueTimeout, StopRequested
from rq.job import Job

from gpuscheduler import assignments, calibration, device_models, queues, recovery, storage, workloads
from gpuscheduler import services as scheduler
from gpuscheduler.backends import Backend, CpuBackend, DeviceInfo, get_backend
from gpuscheduler.conf import gpu_config, lease, samples_config
from gpuscheduler.heartbeat import Heartbeat, WorkerContext, set_context
from gpuscheduler.models import (
    Device,
    Health,
    WorkerState,
)
from gpuscheduler.placement_reads import steal_sources
from gpuscheduler.selectors import device_has_pending_work
from gpuscheduler.watchdog import Watchdog

log = logging.getLogger(__name__)

DEQUEUE_POLL_SECONDS = 1  # the longest a worker blocks on Redis before it looks at its device again
# A worker that was admitted this recently pops its next job without reading its device again: a
# reading, its health and the media store cost 3 queries, more than a short job's own work. A device
# that fails is still stopped within this, and a storage fault of the worker's own ends it at once.
ADMISSION_FRESH_SECONDS = 0.5
QUEUE_REFRESH_SECONDS = 10.0
CANARY_FIRST_PAUSE, CANARY_MAX_PAUSE = 5.0, 300.0


# --- the worker ---------------------------------------------------------------------------------


class GpuWorker(SimpleWorker):
    """A SimpleWorker bound to one device, reading its own queues first, then others where stealing pays."""

    def __init__(self, context: WorkerContext, *, connection: redis.Redis) -> None:
        self.context = context
        self.idle_state = WorkerState.IDLE
        self.running: tuple[Job | None, Any] = (None, None)
        self._last_queue_refresh = 0.0
        self._last_recovery = 0.0
        self._next_canary = 0.0
        self._canary_pause = CANARY_FIRST_PAUSE
        self._soon_stop = False
        super().__init__(
            self._queue_names(),
            name=context.name,
            connection=connection,
            worker_ttl=60,
            job_monitoring_interval=int(max(1, gpu_config()["HEARTBEAT_INTERVAL"])),
        )

    # queues ------------------------------------------------------------------------------------

    def _queue_names(self) -> list[str]:
        own = self.context.device.pk
        live = Device.objects.exclude(pk=own).filter(retired_at__isnull=True)
        others = live.order_by("pk").values_list("pk", flat=True)
        return [
            queues.device_queue_name(own, pinned=True),
            queues.device_queue_name(own),
            *(queues.device_queue_name(pk) for pk in others),
        ]

    def refresh_queues(self) -> None:
        names = self._queue_names()
        if names != self.queue_names():
            self.queues = [Queue(n, connection=self.connection) for n in names]
            self._ordered_queues = self.queues[:]
            log.info("now reading %s", ", ".join(names))
        self._last_queue_refresh = time.monotonic()

    # the loop ----------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        # rq answers SIGTERM on an idle worker by raising StopRequested wherever the signal
        # lands; a broad `except Exception` on the way (housekeeping, a canary) could swallow
        # it. Remember the request as well, so the loop stops at its next turn whatever caught it.
        self._stop_requested = True
        super()._shutdown()

    def request_stop_soon(self) -> None:
        self._soon_stop = True

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """rq's dequeue loop, with an admission check and housekeeping before every pop."""
        burst = timeout is None
        self.set_state("idle")
        backoff = 1.0
        while True:
            if self._stop_requested or self._soon_stop:
                return None
            try:
                self.heartbeat()
                admitted = self.housekeeping()
                if not admitted:
                    if burst:
                        log.info("%s is not admitted; burst worker exits", self.context.device.label)
                        return None
                    time.sleep(DEQUEUE_POLL_SECONDS)
                    continue
                # Own queues first, then steal without blocking from the devices where that
                # pays, then block on the own queues only: an idle worker steals within a
                # second, but a job placed on an idle device's queue wakes that device's worker,
                # not a thief, and a slow GPU leaves a fast one's next call to it.
                own, others = self._ordered_queues[:2], self._ordered_queues[2:]
                result = self._pop(own, None)
                if result is None and others:
                    worth = self._worth_stealing(others)
                    result = self._pop(worth, None) if worth else None
                if result is None and not burst:
                    result = self._pop(own, DEQUEUE_POLL_SECONDS)
                backoff = 1.0
            except DequeueTimeout:
                continue
            except queues.REDIS_ERRORS as exc:
                log.error("Redis is unavailable (%s); retrying in %.0f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if result is not None:
                job, queue = result
                log.info("%s took %s from %s", self.context.device.label, job.id, queue.name)
                return result
            if burst and not self.work_remains():
                return None
            if burst:
                time.sleep(0.2)

    def _pop(self, queue_list: list[Queue], timeout: int | None) -> tuple[Job, Queue] | None:
        result = self.queue_class.dequeue_any(
            queue_list,
            timeout,
            connection=self.connection,
            job_class=self.job_class,
            serializer=self.serializer,
            death_penalty_class=self.death_penalty_class,
        )
        if result is not None and len(queue_list) == 1:
            # From one queue rq pops with LMOVE into an "intermediate" list and only clears it
            # for workers that read a single queue; this one reads several. Left there, rq's
            # maintenance would later report the job as failed.
            job, queue = result
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        return result

    def _worth_stealing(self, others: list[Queue]) -> list[Queue]:
        """The other devices' queues this idle worker should steal from (GPU_STEAL, policies.steal_pays)."""
        if gpu_config()["STEAL"] == "always":
            return others
        # Idle workers poll every second: ask the database only when some other queue holds work.
        depths = queues.queue_depths([queue.name for queue in others], self.connection)
        others = [queue for queue in others if depths[queue.name]]
        if not others:
            return []
        try:
            sources = {queues.device_queue_name(pk) for pk in steal_sources(self.context.device.pk)}
        except DatabaseError:
            # Without the database there is no estimate; taking work beats leaving GPUs idle.
            log.exception("could not estimate which queues to steal from; reading them all")
            close_old_connections()
            return others
        return [queue for queue in others if queue.name in sources]

    def work_remains(self) -> bool:
        """Burst mode: is there queued work this worker may run (now or once re-enqueued)?"""
        return device_has_pending_work(self.context.device)

    def housekeeping(self) -> bool:
        """Read the device, apply admission, refresh queues, recover; True if work may be taken.

        A database or NVML error here is logged and the device counts as not admitted this
        round: the worker must outlive a restarting database, not crash-loop on it. rq's
        StopRequested (raised from its SIGTERM handler, wherever the signal lands) passes through:
        swallowed here, a warm shutdown that arrived during housekeeping would be lost.
        A worker admitted less than ADMISSION_FRESH_SECONDS ago (busy, between two short jobs) reads nothing.
        """
        if self.context.admitted_recently():
            return True
        try:
            admitted = self._housekeeping()
        except StopRequested:
            raise
        except Exception:
            log.exception("housekeeping failed; taking no work this round")
            close_old_connections()
            return False
        if admitted:
            self.context.admitted_for(ADMISSION_FRESH_SECONDS)
        return admitted

    def _housekeeping(self) -> bool:
        close_old_connections()
        device = self.context.device
        reading = None
        if self.context.backend is not None:
            reading = next(iter(self.context.backend.read([device.uuid])), None)
        if reading is not None:
            scheduler.device_observe(device=device, reading=reading)
        else:
            device.refresh_from_db(fields=["health", "health_reason"])
        now = time.monotonic()
        if device.health == Health.PROBATION and now >= self._next_canary:
            if run_canary(self.context):
                self._canary_pause = CANARY_FIRST_PAUSE
            else:
                # A device that keeps failing its canary (a model that will not load, a broken
                # driver) is tried again less and less often, not every second.
                self._next_canary = now + self._canary_pause
                self._canary_pause = min(self._canary_pause * 2, CANARY_MAX_PAUSE)
        if now - self._last_queue_refresh > QUEUE_REFRESH_SECONDS:
            self.refresh_queues()
        if now - self._last_recovery > recovery.RECOVERY_SECONDS:
            self._last_recovery = now
            recovery.assignments_recover_in_turn()
        admitted = device.health == Health.HEALTHY
        if admitted:
            # A full or read-only media folder stops new work like a full GPU (gpuscheduler/storage.py).
            admitted, _ = storage.store_admits(host=self.context.host)
        self.idle_state = WorkerState.IDLE if admitted else WorkerState.PAUSED
        return admitted

    def execute_job(self, job: Job, queue: Queue) -> None:
        # No close_old_connections() first: housekeeping has just done it before the pop (or, for
        # a job popped right after another, the previous job's end has), and on SQLite each one
        # costs a new connection.
        timeout = float(job.timeout or samples_config()["JOB_TIMEOUT"])
        if self.context.watchdog is not None:
            self.context.watchdog.arm(timeout)
        try:
            super().execute_job(job, queue)
        finally:
            self.running = (None, None)
            if self.context.watchdog is not None:
                self.context.watchdog.disarm()
            close_old_connections()

    def prepare_execution(self, job: Job) -> Any:
        execution = super().prepare_execution(job)
        self.running = (job, execution)
        return execution


def run_canary(context: WorkerContext) -> bool:
    """One small image on a device in probation; pass and it is healthy again, fail and it is not.

    It runs like a job: its record's lease is kept by the heartbeat, and the watchdog ends it
    if it hangs in native code.
    """
    device = context.device
    timeout = float(samples_config()["JOB_TIMEOUT"])
    record = assignments.canary_start(device=device, worker_name=context.name, host=context.host, timeout=timeout)
    started = time.monotonic()
    if context.watchdog is not None:
        context.watchdog.arm(timeout)
    try:
        with context.running(record, report=False):
            model = canary_model(context)
            context.generator.generate(
                model=model, prompt="canary", negative_prompt="", seeds=[0], steps=1, guidance=1.0
            )
    except Exception as exc:  # any failure keeps the device out of service
        context.generator.free_memory()
        assignments.canary_finish(assignment_id=record.pk, passed=False, error=traceback.format_exc())
        scheduler.device_probation_end(device=device, passed=False, detail=f"{type(exc).__name__}: {exc}")
        return False
    finally:
        if context.watchdog is not None:
            context.watchdog.disarm()
    seconds = time.monotonic() - started
    if not assignments.canary_finish(assignment_id=record.pk, passed=True):
        return False  # the reconciler gave it up (it ran past its lease): try again later
    scheduler.device_probation_end(device=device, passed=True, detail=f"1 image in {seconds:.2f} s")
    return True


def canary_model(context: WorkerContext) -> Any:
    """The model a canary runs: the one this worker used last, if it holds one (it loaded here, so
    a failure is the device's), else the default model. A default model that does not load on the
    device is recorded as that pair's failure, and the canary fails: no model is left to test the
    device with, so it stays out of service, its canary retried with a growing pause."""
    warm = context.generator.warm_models()
    return warm[0] if warm else workloads.default_model().spec


# --- starting a worker ----------------------------------------------------------------------------


class DeviceNotFound(Exception):
    pass


def resolve_local_device(text: str) -> tuple[Backend, DeviceInfo]:
    """Find a device of this host by UUID (or a unique prefix of it), NVML index, or 'cpu'."""
    text = text.strip()
    if text.lower() == "cpu":
        cpu = CpuBackend()
        return cpu, cpu.devices()[0]
    backend = get_backend()
    infos = backend.devices()
    if text.isascii() and text.isdigit():
        found = [i for i in infos if i.index == int(text) and i.kind != "cpu"]
    else:
        found = [i for i in infos if i.uuid == text] or [
            i for i in infos if text and i.uuid.lower().startswith(text.lower())
        ]
    if len(found) != 1:
        known = ", ".join(f"{i.index}={i.uuid} ({i.name})" for i in infos) or "none"
        raise DeviceNotFound(
            f"No single device of this host matches {text!r} (backend {backend.name}; devices: {known}). "
            "Use a UUID, an NVML index or 'cpu'."
        )
    return backend, found[0]


def bind_process(info: DeviceInfo) -> None:
    """Make this process see only its device, before torch is imported (CUDA reads this once)."""
    if info.kind == "cuda" and "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker bound its GPU; CUDA_VISIBLE_DEVICES would be ignored")
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    # NVML's index is not CUDA's: bind by UUID. CPU and simulated workers see no GPU at all.
    os.environ["CUDA_VISIBLE_DEVICES"] = info.uuid if info.kind == "cuda" else ""


def attach(device: Device, name: str, host: str) -> None:
    """Take the device's worker slot, waiting out the lease of a previous holder that died."""
    deadline = time.monotonic() + lease().total_seconds() + 2
    while (why := scheduler.worker_attach(device=device, name=name, pid=os.getpid(), host=host)) is not None:
        if time.monotonic() > deadline:
            raise DeviceNotFound(f"{device.label} already has a live worker: {why}")
        time.sleep(1)


def build_context(info: DeviceInfo, backend: Backend | None, *, attach_worker: bool = True) -> WorkerContext:
    config = gpu_config()
    host = config["HOST"]
    device = scheduler.device_upsert(info=info, host=host)
    name = f"{host}.dev{device.pk}.{os.getpid()}"
    if attach_worker:
        attach(device, name, host)
    if info.kind == "simulated":
        from gpuscheduler import simulated

        simulated.reset_load(info.uuid, os.getpid())  # a dead predecessor's load is gone with it
    generator = workloads.sample_work().generator(info.kind, info.uuid, info.speed)
    if attach_worker:
        # This process holds no model yet; from now on its pipeline cache records what it loads,
        # evicts and cannot load (a --sync run's process is gone when it ends: it records nothing).
        device_models.models_forget(device_id=device.pk, reason="its worker started")
        generator.events = device_models.ModelEvents(device.pk)
    return WorkerContext(device=device, name=name, host=host, generator=generator, backend=backend)


def run_worker(info: DeviceInfo, backend: Backend, *, burst: bool = False) -> None:
    """Run a GpuWorker for one device until it is stopped (or, with burst, until no work is left)."""
    bind_process(info)
    # Until rq installs its warm-shutdown handlers, a stop request simply ends the process
    # cleanly (through the finally below), even in the middle of loading a model.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    context = build_context(info, backend)
    set_context(context)
    config = gpu_config()
    heartbeat = Heartbeat(context, float(config["HEARTBEAT_INTERVAL"]), presence=True)
    heartbeat.start()
    try:
        started = time.monotonic()
        loaded = False
        model = samples_config()["MODEL"]  # named in messages until the default model is known
        try:
            # The default model (personas registers it): requests name their own, loaded on demand.
            default = workloads.default_model()
            model = default.key
            context.generator.warm(default.spec)
            log.info("%s: %s ready in %.1f s", context.device.label, model, time.monotonic() - started)
            loaded = True
        except workloads.ModelLoadError:
            # The model's fault, not the device's: that pair is out of service (the generator
            # recorded it) and the device serves every other model.
            log.exception("%s: the default model %s does not load here", context.device.label, model)
        except Exception as exc:
            # Anything else (a CUDA error, a driver fault) is the device's: out of service until a
            # model loads, since a device whose jobs all fail fast would look idle and draw every
            # new chunk. Its canary tries again, with backoff.
            log.exception("%s: could not load %s", context.device.label, model)
            scheduler.device_set_unhealthy(
                device=context.device, reason=f"model {model} does not load: {type(exc).__name__}: {exc}"
            )
        context.watchdog = Watchdog(float(config["WATCHDOG_GRACE"]))
        if loaded:
            calibration.calibrate_safely(context, model, int(default.spec.get("steps") or samples_config()["STEPS"]))
        worker = GpuWorker(context, connection=queues.redis_connection())
        heartbeat.worker = worker  # from now on it keeps rq's heartbeats too
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        heartbeat.stop()
        if context.watchdog is not None:
            context.watchdog.stop()
        with contextlib.suppress(Exception):  # a database gone: its successor forgets them too
            device_models.models_forget(device_id=context.device.pk, reason="its worker stopped")
        scheduler.worker_detach(device=context.device, name=context.name)
        set_context(None)
