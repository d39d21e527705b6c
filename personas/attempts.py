"""One attempt in a worker: claim it, make its images, and store them exactly once.

The database decides which files live. Files are written first, through the samples storage (whole
or not at all: config/storage.py), and rows second, in one transaction with the attempt's RUNNING ->
SUCCEEDED claim. Whatever goes wrong around that commit, the worker never removes files because
of a local exception alone: it asks the database (on a fresh connection) how its attempt ended.
A succeeded attempt keeps its files, even when the COMMIT's reply never arrived; an attempt that
is definitely not succeeded has its files removed, here or later by the reconciler, which goes
by the attempt's state only.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.db import transaction

from config.storage import samples_storage, storage_error_text, storage_errors, storage_label
from gpuscheduler import assignments as scheduler
from gpuscheduler.conf import lease, samples_config
from gpuscheduler.database import CONNECTION_ERRORS, connection_ensure_usable, read_with_reconnect
from gpuscheduler.models import Assignment, AssignmentState, Device
from gpuscheduler.storage import store_fault_simulate, store_report_error
from personas.imagegen import AttemptLost, GeneratedImage
from personas.models import SampleImage, SampleRequest
from personas.services import sample_image_path, sample_request_mark_started, sample_request_refresh

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext

log = logging.getLogger(__name__)

# A commit whose connection failed is tried again this many times while the attempt still
# holds its lease (a failover or a pooler reset usually heals within seconds).
COMMIT_TRIES = 5


class StorageFault(Exception):
    """The media store refused a write (disk full, read-only, bucket gone, endpoint down): an
    infrastructure fault."""

    def __init__(self, error: Exception, name: str) -> None:
        self.name = name
        self.errno = getattr(error, "errno", None)
        super().__init__(f"{storage_error_text(error)}: {name}")


@dataclass
class _Written:
    names: list[str]
    rows: list[SampleImage]


def _write_files(
    *, assignment: Assignment, request: SampleRequest, images: list[GeneratedImage], device: Device
) -> _Written:
    """Write every PNG durably under its final name; on a storage error remove what was written
    (nothing of it was committed) and raise StorageFault."""
    storage = samples_storage()
    written = _Written(names=[], rows=[])
    name = ""
    try:
        for offset, image in enumerate(images):
            index = assignment.first_index + offset
            name = sample_image_path(
                persona_id=request.persona_id, request_id=request.pk, index=index, assignment_id=assignment.pk
            )
            # A full or read-only store switched on by a test or benchmark (GPU_BACKEND=simulated).
            store_fault_simulate(path=storage_label(storage, name))
            written.names.append(name)
            # Durable and atomic in the storage: fsync + rename in a folder, one PutObject in S3.
            name = written.names[-1] = storage.save(name, ContentFile(image.png))
            written.rows.append(
                SampleImage(
                    persona_id=request.persona_id,
                    request=request,
                    assignment=assignment,
                    index=index,
                    image=name,
                    seed=image.seed,
                    prompt=request.persona.appearance_prompt,
                    negative_prompt=request.persona.negative_prompt,
                    width=image.width,
                    height=image.height,
                    model=request.model,
                    steps=request.steps,
                    device=device,
                )
            )
    except storage_errors() as exc:
        _remove(storage, written.names)
        raise StorageFault(exc, storage_label(storage, name or "samples/")) from exc
    return written


def _remove(storage: Storage, names: list[str]) -> None:
    """Remove files of an attempt that did not commit; one that cannot be removed now is an orphan,
    which the sweep removes once the store answers again."""
    for name in names:
        try:
            storage.delete(name)
        except storage_errors() as exc:
            log.error("could not remove %s, left for the orphan sweep: %s", name, exc)


def _commit_rows(
    *, assignment_id: int, rows: list[SampleImage], calls: int, peak_memory: int | None, note: str
) -> bool:
    connection_ensure_usable()
    with transaction.atomic():
        if not scheduler.assignment_succeed(
            assignment_id=assignment_id, calls=calls, peak_memory=peak_memory, note=note
        ):
            return False
        SampleImage.objects.bulk_create(rows)
    return True


def _state_after_fault(assignment_id: int) -> str | None:
    """How the attempt stands in the database, read on a new connection; raises a connection
    error when the database stays unreachable for a lease (by then the reconciler decides)."""
    return read_with_reconnect(
        lambda: scheduler.assignment_state(assignment_id=assignment_id), seconds=lease().total_seconds()
    )


def sample_images_commit(
    *,
    assignment: Assignment,
    request: SampleRequest,
    images: list[GeneratedImage],
    device: Device,
    calls: int,
    peak_memory: int | None,
    note: str = "",
) -> bool:
    """Store an attempt's images, if and only if the attempt still holds its lease.

    True when the database has them (also when a COMMIT's reply was lost but the COMMIT was
    applied); False when the attempt had lost its lease, its files removed. Raises StorageFault
    when the media store refused a file (nothing written stays), and re-raises any other fault
    once the database has said whether the attempt succeeded.
    """
    written = _write_files(assignment=assignment, request=request, images=images, device=device)
    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            committed = _commit_rows(
                assignment_id=assignment.pk, rows=written.rows, calls=calls, peak_memory=peak_memory, note=note
            )
            if committed:
                break
            # The claim matched no row: read why (a COMMIT of ours whose reply was lost has
            # made the row SUCCEEDED, and then the files are the committed ones).
            state = scheduler.assignment_state(assignment_id=assignment.pk)
        except BaseException as exc:
            try:
                state = _state_after_fault(assignment.pk)
            except CONNECTION_ERRORS:
                # Unknown outcome: leave the files. If the attempt never committed, the
                # reconciler abandons it once its lease runs out and removes them then.
                log.error(
                    "assignment %s: the database does not answer after a failed commit (%s); its files stay "
                    "until the database says how the attempt ended",
                    assignment.pk,
                    exc,
                )
                raise exc from None
            if state == AssignmentState.SUCCEEDED:
                log.warning(
                    "assignment %s: the commit raised %s after the database had applied it: the %d images are kept",
                    assignment.pk,
                    type(exc).__name__,
                    len(written.rows),
                )
                if not isinstance(exc, Exception):
                    raise  # a stop request: the images are safe, let it through
                break
            retryable = isinstance(exc, CONNECTION_ERRORS) and state == AssignmentState.RUNNING
            if retryable and attempt < COMMIT_TRIES:
                log.warning(
                    "assignment %s: commit failed (%s); committing again on a new connection", assignment.pk, exc
                )
                time.sleep(min(0.5 * attempt, 2.0))
                continue
            # Definitely not committed: this attempt's transaction is gone.
            _remove(samples_storage(), written.names)
            raise
        if state == AssignmentState.SUCCEEDED:
            break
        log.warning(
            "job %s lost its lease before committing (%s): its %d images are dropped",
            assignment.job_id,
            state,
            len(written.rows),
        )
        _remove(samples_storage(), written.names)
        return False
    sample_request_refresh(request_id=request.pk)
    return True


def sample_assignment_run(*, assignment_id: int, context: WorkerContext) -> dict[str, object]:
    """Run one attempt in this worker: claim it, make its images in one call, commit them once.

    Safe to run twice: a second delivery finds the attempt already claimed and does nothing.
    """
    config = samples_config()
    assignment = scheduler.assignment_claim(
        assignment_id=assignment_id,
        device=context.device,
        worker_name=context.name,
        host=context.host,
        timeout=float(config["JOB_TIMEOUT"]),
    )
    if assignment is None or assignment.request_id is None:
        log.info("assignment %s is no longer queued (taken, cancelled or replaced): skipping", assignment_id)
        return {"assignment": assignment_id, "skipped": True}
    request = SampleRequest.objects.select_related("persona").get(pk=assignment.request_id)
    sample_request_mark_started(request_id=request.pk)
    seeds = [request.seed_for(i) for i in assignment.indexes]
    with context.running(assignment):
        started = time.monotonic()
        try:
            result = context.generator.generate(
                model=request.model,
                prompt=request.persona.appearance_prompt,
                negative_prompt=request.persona.negative_prompt,
                seeds=seeds,
                steps=request.steps,
                guidance=float(config["GUIDANCE"]),
                alive=context.alive,
            )
        except AttemptLost:
            return {"assignment": assignment_id, "abandoned": True}
        except Exception as exc:
            # Timeouts (rq's JobTimeoutException), out-of-memory at one image per call, model
            # errors: record, free the device's memory and let another attempt try.
            context.generator.free_memory()
            _fail(assignment_id, context, exc)
            raise
        generated = time.monotonic()
        try:
            committed = sample_images_commit(
                assignment=assignment,
                request=request,
                images=result.images,
                device=context.device,
                calls=result.calls,
                peak_memory=result.peak_memory,
                note="\n".join(result.notes),
            )
        except StorageFault as exc:
            _storage_fault(assignment_id, context, exc)
            return {"assignment": assignment_id, "storage_error": str(exc)}
        except CONNECTION_ERRORS:
            raise  # the database is gone: the reconciler decides once the lease runs out
        except Exception as exc:
            _fail(assignment_id, context, exc)  # definitely not committed (a constraint, a timeout)
            raise
        log.info(
            "assignment %s: %d images in %d call(s) on %s: generate %.2f s, commit %.2f s",
            assignment_id,
            len(result.images),
            result.calls,
            context.device.label,
            generated - started,
            time.monotonic() - generated,
        )
    return {
        "assignment": assignment_id,
        "committed": committed,
        "images": len(result.images),
        "calls": result.calls,
        "device": context.device.uuid,
    }


def _fail(assignment_id: int, context: WorkerContext, exc: BaseException) -> None:
    error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
    retry = scheduler.assignment_fail(assignment_id=assignment_id, error=error, retryable=True)
    log.error("assignment %s failed on %s: %s (retry: %s)", assignment_id, context.device.label, exc, retry)


def _storage_fault(assignment_id: int, context: WorkerContext, exc: StorageFault) -> None:
    """Record the real error on the attempt at once, put its chunk back to waiting and take the
    media store out of service until a reading shows it writable again."""
    error = f"media store: {exc}"
    store_report_error(host=context.host, error=error)
    requeued = scheduler.assignment_requeue(assignment_id=assignment_id, error=error)
    log.error(
        "assignment %s on %s: %s; %s",
        assignment_id,
        context.device.label,
        error,
        "its images wait for the store to recover" if requeued else "the attempt had already ended",
    )
