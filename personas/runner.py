"""Bulk generation from the shell: waiting on workers, or running in this process (--sync)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import IO, Any

from django.core.files.storage import Storage
from django.core.management.base import CommandError

from config.storage import samples_storage, storage_local_path
from gpuscheduler import services as scheduler
from gpuscheduler.backends import BackendUnavailable, get_backend
from gpuscheduler.conf import gpu_config
from gpuscheduler.database import CONNECTION_ERRORS, connection_ensure_usable, connection_reset
from gpuscheduler.heartbeat import Heartbeat, WorkerContext
from gpuscheduler.models import AssignmentState, Device
from gpuscheduler.policies import get_policy
from gpuscheduler.selectors import device_views
from gpuscheduler.worker import DeviceNotFound, bind_process, build_context, resolve_local_device
from personas.attempts import sample_assignment_run
from personas.models import ACTIVE_REQUEST_STATES, Persona, RequestSource, SampleImage, SampleRequest
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
        by_device: dict[str, int] = {}
        for image in self.images:
            key = image.device.uuid if image.device else "unknown"
            by_device[key] = by_device.get(key, 0) + 1
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
            "by_device": by_device,
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
                    "seed": image.seed,
                }
                for image in self.images
            ],
        }


def _local_path(storage: Storage, name: str) -> str | None:
    local = storage_local_path(storage, name)
    return None if local is None else str(local)


def requests_wait(
    requests: list[SampleRequest], *, timeout: float, stderr: IO[str] | Any, progress: bool = True, poll: float = 0.5
) -> WaitReport:
    """Block until every request has ended (or the timeout passes), drawing a progress bar."""
    total = sum(r.count for r in requests)
    ids = [r.pk for r in requests]
    deadline = time.monotonic() + timeout
    shown = -1
    unreachable_since: float | None = None
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
                stderr.write(f"The database does not answer ({str(exc).strip()}); still waiting, the jobs go on.")
            if time.monotonic() > deadline:
                raise CommandError(
                    "The database did not answer before --timeout passed; the jobs go on in the workers: "
                    "check them with `python manage.py gpustatus` once the database is back."
                ) from exc
            time.sleep(min(5.0, poll * 4))
            continue
        if unreachable_since is not None:
            stderr.write(f"The database answers again (after {time.monotonic() - unreachable_since:.0f} s).")
            unreachable_since = None
        if progress and done != shown:
            width = 30
            filled = int(width * done / total) if total else width
            stderr.write(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {active} request(s) active")
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

    def run(self, personas: list[Persona], counts: dict[int, int]) -> WaitReport:
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
                    )
                except RequestAlreadyActive as exc:
                    skipped.append(str(exc))
                    self.stderr.write(f"skipped: {exc}")
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
