"""Bulk generation from the shell: waiting on workers, or running in this process (--sync)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from django.core.files.storage import Storage
from django.core.management.base import CommandError, OutputWrapper

from config.storage import samples_storage, storage_local_path
from gpuscheduler import services as scheduler
from gpuscheduler.backends import BackendUnavailable, get_backend
from gpuscheduler.conf import gpu_config
from gpuscheduler.database import CONNECTION_ERRORS, connection_ensure_usable, connection_reset
from gpuscheduler.heartbeat import Heartbeat, WorkerContext
from gpuscheduler.models import AssignmentState, Device
from gpuscheduler.placement_reads import device_views
from gpuscheduler.policies import get_policy
from gpuscheduler.worker import DeviceNotFound, bind_process, build_context, resolve_local_device
from personas.attempts import sample_assignment_run
from personas.image_models import ModelUnavailable
from personas.models import ACTIVE_REQUEST_STATES, ImageModel, Persona, RequestSource, SampleImage, SampleRequest
from personas.services import RequestAlreadyActive, sample_request_submit


@dataclass
class WaitReport:
    requests: list[SampleRequest]
    images: list[SampleImage]
    finished: bool = True
    timed_out: bool = False
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_requests(cls, requests: list[SampleRequest], *, finished: bool, timed_out: bool = False) -> WaitReport:
        # One reload for every request, with its persona (the report names each one's slug).
        fresh = SampleRequest.objects.select_related("persona").in_bulk([r.pk for r in requests])
        requests = [fresh[r.pk] for r in requests]
        images = list(
            SampleImage.objects.filter(request__in=requests)
            .select_related("persona", "device")
            .order_by("request", "index")
        )
        return cls(requests=requests, images=images, finished=finished, timed_out=timed_out)

    def as_dict(self, *, seconds: float) -> dict[str, Any]:
        # Each device by its label, as the admin and `gpustatus` name it, with its UUID beside it.
        by_device: dict[str, dict[str, Any]] = {}
        for image in self.images:
            key = image.device.uuid if image.device else "unknown"
            row = by_device.setdefault(
                key, {"label": image.device.label if image.device else "unknown device", "uuid": key, "images": 0}
            )
            row["images"] += 1
        requested = sum(r.count for r in self.requests)
        made: dict[int, int] = {}
        for image in self.images:
            if image.request_id is not None:
                made[image.request_id] = made.get(image.request_id, 0) + 1
        ended = [r for r in self.requests if r.state not in ACTIVE_REQUEST_STATES]
        failed = sum(r.count - made.get(r.pk, 0) for r in ended) if self.finished or self.timed_out else 0
        pending = sum(r.count - made.get(r.pk, 0) for r in self.requests if r.state in ACTIVE_REQUEST_STATES)
        storage = samples_storage()
        return {
            "requested": requested,
            "succeeded": len(self.images),
            "failed": failed,
            "pending": pending,
            "skipped": self.skipped,
            "seconds": round(seconds, 3),
            "by_device": sorted(by_device.values(), key=lambda row: (row["label"], row["uuid"])),
            "requests": [
                {"id": r.pk, "persona": r.persona.slug, "count": r.count, "state": r.state} for r in self.requests
            ],
            "images": [
                {
                    "persona": image.persona.slug,
                    # The name in the samples storage; the local path only where it is a folder.
                    "name": image.image.name,
                    "path": _local_path(storage, image.image.name),
                    "device": image.device.uuid if image.device else None,
                    "device_label": image.device.label if image.device else None,
                    "seed": image.seed,
                }
                for image in self.images
            ],
        }


def _local_path(storage: Storage, name: str) -> str | None:
    local = storage_local_path(storage, name)
    return None if local is None else str(local)


class Progress:
    """The --wait progress bar, on the command's stdout (it is output, not an error): redrawn in
    place on a terminal, one plain line per change otherwise (a log file, a pipe, CI)."""

    WIDTH = 30

    def __init__(self, out: Any, *, tty: bool | None = None) -> None:
        self.out = out if isinstance(out, OutputWrapper) else OutputWrapper(out)
        self.tty = self.out.isatty() if tty is None else tty
        self.open = False  # a drawn line waits for its newline

    def draw(self, done: int, total: int, active: int) -> None:
        filled = int(self.WIDTH * done / total) if total else self.WIDTH
        text = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} images, {active} request(s) active"
        if self.tty:
            # Back to the line's start and clear it: the bar stays one line, however often it moves.
            self.out.write(f"\r\x1b[K{text}", ending="")
            self.out.flush()
            self.open = True
        else:
            self.out.write(text)

    def end(self) -> None:
        """Finish a line drawn in place, so what comes next (a log record, a notice, the summary)
        starts on a line of its own."""
        if self.open:
            self.out.write("\n", ending="")
            self.out.flush()
            self.open = False

    @contextlib.contextmanager
    def apart_from_logs(self) -> Iterator[None]:
        """While waiting, end the bar's line before any log record is written (logs go to stderr,
        often the same terminal): a record never lands in the middle of the bar."""
        handlers = logging.getLogger().handlers
        guard = _EndLine(self)
        for handler in handlers:
            handler.addFilter(guard)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(guard)
            self.end()


class _EndLine(logging.Filter):
    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.end()
        return True


def requests_wait(
    requests: list[SampleRequest],
    *,
    timeout: float,
    stderr: IO[str] | Any,
    out: IO[str] | Any | None = None,
    progress: bool = True,
    poll: float = 0.5,
) -> WaitReport:
    """Block until every request has ended (or the timeout passes), drawing a progress bar on
    `out` (stdout; without one, no bar) and notices on `stderr`."""
    bar = Progress(out) if progress and out is not None else None
    with bar.apart_from_logs() if bar is not None else contextlib.nullcontext():
        return _wait(requests, timeout=timeout, stderr=stderr, bar=bar, poll=poll)


def _wait(
    requests: list[SampleRequest], *, timeout: float, stderr: IO[str] | Any, bar: Progress | None, poll: float
) -> WaitReport:
    total = sum(r.count for r in requests)
    ids = [r.pk for r in requests]
    deadline = time.monotonic() + timeout
    shown = -1
    unreachable_since: float | None = None

    def notice(text: str) -> None:
        if bar is not None:
            bar.end()
        stderr.write(text)

    while True:
        # Polls run for up to an hour: check the connection first, and outlive a database
        # restart or failover instead of ending the wait with a traceback.
        connection_ensure_usable()
        try:
            done = SampleImage.objects.filter(request__in=ids).count()
            active = SampleRequest.objects.filter(pk__in=ids, state__in=ACTIVE_REQUEST_STATES).count()
        except CONNECTION_ERRORS as exc:
            connection_reset()
            if unreachable_since is None:
                unreachable_since = time.monotonic()
                notice(f"The database does not answer ({str(exc).strip()}); still waiting, the jobs go on.")
            if time.monotonic() > deadline:
                raise CommandError(
                    "The database did not answer before --timeout passed; the jobs go on in the workers: "
                    "check them with `python manage.py gpustatus` once the database is back."
                ) from exc
            time.sleep(min(5.0, poll * 4))
            continue
        if unreachable_since is not None:
            notice(f"The database answers again (after {time.monotonic() - unreachable_since:.0f} s).")
            unreachable_since = None
        if bar is not None and done != shown:
            bar.draw(done, total, active)
            shown = done
        if active == 0:
            return WaitReport.from_requests(requests, finished=True)
        if time.monotonic() > deadline:
            return WaitReport.from_requests(requests, finished=False, timed_out=True)
        time.sleep(poll)


class SyncRunner:
    """Runs requests' jobs in this process, bound to one device, with the same claims and commits."""

    def __init__(self, context: WorkerContext, stderr: IO[str] | Any) -> None:
        self.context = context
        self.stderr = stderr

    @classmethod
    def for_device(cls, text: str | None, *, stderr: IO[str] | Any) -> SyncRunner:
        try:
            if text:
                backend, info = resolve_local_device(text)
            else:
                backend = get_backend()
                host = gpu_config()["HOST"]
                scheduler.snapshots_record(backend=backend, host=host)
                devices = list(Device.objects.filter(host=host, uuid__in=[i.uuid for i in backend.devices()]))
                ranked = get_policy(gpu_config()["POLICY"])(device_views(devices), 0)
                if not ranked:
                    raise CommandError("No healthy device of this host can take work; name one with --device.")
                chosen = next(d for d in devices if d.pk == ranked[0].device.id)
                info = next(i for i in backend.devices() if i.uuid == chosen.uuid)
            bind_process(info)
            context = build_context(info, backend, attach_worker=False)
        except (DeviceNotFound, BackendUnavailable, RuntimeError) as exc:
            raise CommandError(str(exc)) from exc
        stderr.write(f"--sync: generating on {context.device.label} ({context.device.uuid}) in this process")
        return cls(context, stderr)

    def run(self, personas: list[Persona], counts: dict[int, int], *, model: ImageModel | None = None) -> WaitReport:
        """Make each persona's images here, one request after another, with `model` instead of
        each persona's own where given; personas whose model takes no requests are skipped."""
        context = self.context
        heartbeat = Heartbeat(context, float(gpu_config()["HEARTBEAT_INTERVAL"]))
        heartbeat.start()
        requests: list[SampleRequest] = []
        skipped: list[str] = []
        try:
            for persona in personas:
                try:
                    submitted = sample_request_submit(
                        persona=persona,
                        count=counts[persona.pk],
                        device=context.device,
                        source=RequestSource.COMMAND,
                        enqueue=False,
                        require_worker=False,
                        model=model,
                    )
                except RequestAlreadyActive as exc:
                    skipped.append(str(exc))
                    self.stderr.write(f"skipped: {exc}")
                    continue
                except ModelUnavailable as exc:
                    skipped.append(f"{persona} was not queued: {exc}")
                    self.stderr.write(f"not queued ({persona.name}): {exc}")
                    continue
                requests.append(submitted.request)
                self._run_request(submitted.request)
        finally:
            heartbeat.stop()
        report = WaitReport.from_requests(requests, finished=True)
        report.skipped = skipped
        return report

    def _run_request(self, request: SampleRequest) -> None:
        # Retries of a failed attempt are new QUEUED rows: run them here too, until none is left.
        while True:
            waiting = list(request.assignments.filter(state=AssignmentState.QUEUED).order_by("first_index"))
            if not waiting:
                return
            for assignment in waiting:
                try:
                    sample_assignment_run(assignment_id=assignment.pk, context=self.context)
                except Exception as exc:  # recorded on the attempt; its retry runs in the next pass
                    self.stderr.write(f"attempt {assignment.job_id} failed: {type(exc).__name__}: {exc}")
