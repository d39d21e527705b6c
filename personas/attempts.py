"""One attempt in a worker: claim it, make its images, and store them exactly once.

The database decides which files live. Files are written first, through the samples storage (whole
or not at all: config/storage.py), and rows second, in one transaction with the attempt's RUNNING ->
SUCCEEDED claim, shared by the attempts of one pipeline call (personas/batch.py). That commit, and
what the worker does when it fails or its reply is lost, live in personas/commit.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db import DatabaseError

from config.storage import (
    SaveError,
    samples_storage,
    storage_error_text,
    storage_errors,
    storage_label,
    storage_save_all,
)
from gpuscheduler import assignments as scheduler
from gpuscheduler import batching, costs
from gpuscheduler.conf import samples_config
from gpuscheduler.curves import Timing
from gpuscheduler.models import Assignment, Device
from gpuscheduler.storage import store_fault_simulate, store_report_error
from personas.batch import Member, batch_gather, batch_generate
from personas.commit import CallSummary, Written, commit_call, commit_written, record_failure, remove_files
from personas.imagegen import AttemptLost, GeneratedImage, GenerationResult
from personas.models import SampleImage, SampleRequest
from personas.services import sample_image_path
from personas.thumbnails import thumbnail_name

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext

log = logging.getLogger(__name__)


class StorageFault(Exception):
    """The media store refused a write (disk full, read-only, bucket gone, endpoint down): an
    infrastructure fault."""

    def __init__(self, error: Exception, name: str) -> None:
        self.name = name
        self.errno = getattr(error, "errno", None)
        super().__init__(f"{storage_error_text(error)}: {name}")


def _write_files(
    pending: list[tuple[Member, list[GeneratedImage]]], *, device: Device
) -> tuple[list[Written], StorageFault | None]:
    """Write every attempt's PNGs and thumbnails durably under their final names, in order, their
    fsyncs together (config/storage.py). Returns the attempts whose files are all written; on a
    storage error, the error as a StorageFault too: the attempts from the one it struck on have no
    file left."""
    storage = samples_storage()
    files: list[tuple[str, bytes]] = []
    counts: list[int] = []  # files per image: the PNG, and its thumbnail when there is one
    for member, images in pending:
        request, attempt = member.request, member.assignment
        for offset, image in enumerate(images):
            name = sample_image_path(
                persona_id=request.persona_id,
                request_id=request.pk,
                index=attempt.first_index + offset,
                assignment_id=attempt.pk,
            )
            files.append((name, image.png))
            # Made with the PNG by the encoder (imagegen._encode); none when it could not be made.
            if image.thumbnail:
                files.append((thumbnail_name(name), image.thumbnail))
            counts.append(1 + bool(image.thumbnail))
    refused: tuple[str, Exception] | None = None
    try:
        for i, (name, _) in enumerate(files):
            # A full or read-only store switched on by a test or benchmark (GPU_BACKEND=simulated).
            try:
                store_fault_simulate(path=storage_label(storage, name))
            except storage_errors() as exc:
                refused, files = (name, exc), files[:i]
                break
        # Durable and atomic in the storage: fsync + rename in a folder, one PutObject in S3.
        saved = storage_save_all(storage, files)
    except SaveError as exc:
        refused, saved = (exc.name, exc.error), exc.saved
    written: list[Written] = []
    per_image = iter(counts)
    for member, images in pending:
        shares = [next(per_image) for _ in images]
        names, saved = saved[: sum(shares)], saved[sum(shares) :]
        if len(names) < sum(shares):
            remove_files(storage, names)  # the refused file's attempt: nothing of it was committed
            break
        rows, at = [], 0
        for offset, (image, share) in enumerate(zip(images, shares, strict=True)):
            thumb = names[at + 1] if share == 2 else ""
            rows.append(_row(member, offset, names[at], thumb, image, device))
            at += share
        written.append(Written(assignment=member.assignment, request=member.request, names=names, rows=rows))
    if refused is None:
        return written, None
    name, error = refused
    return written, StorageFault(error, storage_label(storage, name))


def _row(member: Member, offset: int, name: str, thumbnail: str, image: GeneratedImage, device: Device) -> SampleImage:
    request = member.request
    return SampleImage(
        persona_id=request.persona_id,
        request=request,
        assignment=member.assignment,
        index=member.assignment.first_index + offset,
        image=name,
        thumbnail=thumbnail,
        seed=image.seed,
        prompt=request.persona.appearance_prompt,
        negative_prompt=request.persona.negative_prompt,
        width=image.width,
        height=image.height,
        model=request.model,
        steps=request.steps,
        device=device,
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
    pipeline_call_id: int | None = None,
) -> bool:
    """Store an attempt's images, if and only if the attempt still holds its lease.

    True when the database has them (also when a COMMIT's reply was lost but the COMMIT was
    applied); False when the attempt had lost its lease, its files removed. Raises StorageFault
    when the media store refused a file (nothing written stays), and re-raises any other fault
    once the database has said whether the attempt succeeded.
    """
    written, fault = _write_files([(Member(assignment, request), images)], device=device)
    if fault is not None:
        raise fault
    call = CallSummary(calls=calls, peak_memory=peak_memory, note=note, pipeline_call_id=pipeline_call_id)
    return assignment.pk in commit_written(written, call)


def sample_assignment_run(*, assignment_id: int, context: WorkerContext) -> dict[str, object]:
    """Run one attempt in this worker, with the queued attempts of other requests that can share its
    pipeline call (personas/batch.py): claim them, make their images in one call, commit them once.

    Safe to run twice: a second delivery finds the attempt already claimed and does nothing.
    """
    config = samples_config()
    begun = time.monotonic()
    assignment = batching.attempt_claim(
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
    with context.running(assignment):
        members = batch_gather(first=assignment, request=request, context=context)
        started = time.monotonic()
        try:
            result = batch_generate(members, context=context)
        except AttemptLost:
            return {"assignment": assignment_id, "abandoned": True}
        except Exception as exc:
            # Timeouts (rq's JobTimeoutException), out-of-memory at one image per call, model
            # errors: record, free the device's memory and let another attempt try.
            context.generator.free_memory()
            for member in members:
                record_failure(member.assignment.pk, context, exc)
            raise
        generated = time.monotonic()
        call_id = record_calls(context=context, model=request.model, steps=request.steps, timings=result.timings)
        outcome = _commit_members(members, result=result, context=context, pipeline_call_id=call_id)
        ended = time.monotonic()
        context.overhead_observe((ended - begun) - (generated - started))
        log.info(
            "assignment %s: %d images of %d attempt(s) in %d call(s) on %s: generate %.2f s, commit %.2f s",
            assignment_id,
            len(result.images),
            len(members),
            result.calls,
            context.device.label,
            generated - started,
            ended - generated,
        )
    if outcome.error is not None:
        raise outcome.error
    report: dict[str, object] = {
        "assignment": assignment_id,
        "committed": outcome.committed.get(assignment_id, False),
        "images": len(result.images),
        "calls": result.calls,
        "device": context.device.uuid,
        "batch": [member.assignment.pk for member in members],
    }
    if outcome.storage_fault is not None:
        report["storage_error"] = str(outcome.storage_fault)
    return report


@dataclass
class _Outcome:
    committed: dict[int, bool] = field(default_factory=dict)
    storage_fault: StorageFault | None = None
    error: Exception | None = None


def _commit_members(
    members: list[Member], *, result: GenerationResult, context: WorkerContext, pipeline_call_id: int | None
) -> _Outcome:
    """Store the call's images, then commit its attempts in one transaction in which each makes its
    own conditional claim: one that lost its lease is dropped and the others commit. After a storage
    fault the attempts whose files were all written commit and the others go back to waiting; when
    the transaction fails for good the attempts are committed one by one, so an error fails its
    attempt alone (and is raised at the end)."""
    outcome = _Outcome()
    call = CallSummary(
        calls=result.calls,
        peak_memory=result.peak_memory,
        note="\n".join(result.notes),
        pipeline_call_id=pipeline_call_id,
    )
    images = iter(result.images)
    pending: list[tuple[Member, list[GeneratedImage]]] = []
    for member in members:
        mine = [next(images) for _ in range(member.assignment.image_count)]
        if context.is_lost(member.assignment.pk):
            log.warning("assignment %s lost its lease during the call: its images are dropped", member.assignment.pk)
            outcome.committed[member.assignment.pk] = False
        else:
            pending.append((member, mine))
    try:
        try:
            written, fault = _write_files(pending, device=context.device)
        except Exception as exc:
            for member, _ in pending:
                record_failure(member.assignment.pk, context, exc)  # nothing of the call was committed
            outcome.error = exc
            return outcome
        if fault is not None:
            outcome.storage_fault = fault
            for member, _ in pending[len(written) :]:
                _storage_fault(member.assignment.pk, context, fault)
                context.settle(member.assignment.pk)
        if written:
            committed, outcome.error = commit_call(written, call, context=context)
            outcome.committed.update(committed)
    finally:
        for member in members:
            context.settle(member.assignment.pk)
    return outcome


def record_calls(*, context: WorkerContext, model: str, steps: int, timings: list[Timing]) -> int | None:
    """Record the timed pipeline calls of an attempt (its device's cost curve learns from them);
    returns the last call's id. A failure here is logged and costs nothing but the sample."""
    call_id = None
    try:
        for timing in timings:
            call_id = costs.call_record(device=context.device, model=model, steps=steps, timing=timing).pk
    except DatabaseError:
        log.exception("could not record a pipeline call's timing on %s", context.device.label)
    return call_id


def _storage_fault(assignment_id: int, context: WorkerContext, exc: StorageFault) -> None:
    """Record the real error on the attempt at once, put its chunk back to waiting and take the
    media store out of service until a reading shows it writable again."""
    error = f"media store: {exc}"
    store_report_error(host=context.host, error=error)
    context.admission_expire()  # no more work on this host's store until a probe says it is back
    requeued = scheduler.assignment_requeue(assignment_id=assignment_id, error=error)
    log.error(
        "assignment %s on %s: %s; %s",
        assignment_id,
        context.device.label,
        error,
        "its images wait for the store to recover" if requeued else "the attempt had already ended",
    )
