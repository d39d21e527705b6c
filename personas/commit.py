"""The commit of one pipeline call's attempts, once their files are written (personas/attempts.py).

The attempts of one call commit in one transaction, for speed (a transaction per attempt cost more
than the rest of the job): each still makes its own conditional RUNNING -> SUCCEEDED claim, so one
that lost its lease is left out and its files removed while the others commit, and since they
commit together, one attempt found SUCCEEDED after a fault means all the winners are.

Whatever goes wrong around that commit, the worker never removes files because of a local exception
alone: it asks the database (on a fresh connection) how its attempts ended. A succeeded attempt keeps
its files, even when the COMMIT's reply never arrived; an attempt that is definitely not succeeded
has its files removed, here or later by the reconciler, which goes by the attempt's state only. When
the call's transaction fails for good, its attempts are committed again one by one, so that an error
fails its own attempt alone.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.core.files.storage import Storage
from django.db import transaction

from config.storage import samples_storage, storage_errors
from gpuscheduler import assignments as scheduler
from gpuscheduler.conf import lease
from gpuscheduler.database import CONNECTION_ERRORS, connection_ensure_usable, read_with_reconnect
from gpuscheduler.models import Assignment, AssignmentState
from personas.models import SampleImage, SampleRequest
from personas.services import sample_requests_refresh

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext

log = logging.getLogger(__name__)

# A commit whose connection failed is tried again this many times while the attempt still
# holds its lease (a failover or a pooler reset usually heals within seconds).
COMMIT_TRIES = 5


@dataclass
class Written:
    """An attempt's images, stored under their final names, and their rows (not yet committed)."""

    assignment: Assignment
    request: SampleRequest
    names: list[str]
    rows: list[SampleImage]


@dataclass(frozen=True)
class CallSummary:
    """What every attempt of one pipeline call records about it."""

    calls: int
    peak_memory: int | None
    note: str = ""
    pipeline_call_id: int | None = None


def remove_files(storage: Storage, names: list[str]) -> None:
    """Remove files of an attempt that did not commit; one that cannot be removed now is an orphan,
    which the sweep removes once the store answers again."""
    for name in names:
        try:
            storage.delete(name)
        except storage_errors() as exc:
            log.error("could not remove %s, left for the orphan sweep: %s", name, exc)


def _commit_rows(written: list[Written], call: CallSummary) -> set[int]:
    """One transaction for the call: each attempt's own conditional RUNNING -> SUCCEEDED claim, and
    the rows of the attempts that won it. Returns the ids of those."""
    connection_ensure_usable()
    won: set[int] = set()
    with transaction.atomic():
        for item in written:
            if scheduler.assignment_succeed(
                assignment_id=item.assignment.pk,
                calls=call.calls,
                peak_memory=call.peak_memory,
                note=call.note,
                pipeline_call_id=call.pipeline_call_id,
            ):
                won.add(item.assignment.pk)
        SampleImage.objects.bulk_create([row for item in written if item.assignment.pk in won for row in item.rows])
    return won


def _states_after_fault(assignment_ids: list[int]) -> dict[int, str]:
    """How the attempts stand in the database, read on a new connection; raises a connection error
    when the database stays unreachable for a lease (by then the reconciler decides)."""
    return read_with_reconnect(
        lambda: dict(Assignment.objects.filter(pk__in=assignment_ids).values_list("pk", "state")),
        seconds=lease().total_seconds(),
    )


def commit_written(written: list[Written], call: CallSummary, *, keep_on_error: bool = False) -> set[int]:
    """Commit attempts whose files are written, in one transaction; returns the ids of those the
    database has (also when a COMMIT's reply was lost but the COMMIT was applied). The files of the
    attempts that had lost their leases are removed.

    A fault is raised once the database has said that none of them succeeded, their files removed;
    with `keep_on_error` an error of the statements themselves (a constraint, a timeout) leaves the
    files, for the caller to commit the attempts again one by one.
    """
    ids = [item.assignment.pk for item in written]
    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            won = _commit_rows(written, call)
            break
        except BaseException as exc:
            try:
                states = _states_after_fault(ids)
            except CONNECTION_ERRORS:
                # Unknown outcome: leave the files. If the attempts never committed, the
                # reconciler abandons them once their leases run out and removes them then.
                log.error(
                    "assignments %s: the database does not answer after a failed commit (%s); their files stay "
                    "until the database says how the attempts ended",
                    ids,
                    exc,
                )
                raise exc from None
            # One transaction: an attempt of it that succeeded means the COMMIT was applied.
            won = {pk for pk in ids if states.get(pk) == AssignmentState.SUCCEEDED}
            if won:
                log.warning(
                    "assignments %s: the commit raised %s after the database had applied it: their images are kept",
                    sorted(won),
                    type(exc).__name__,
                )
                if not isinstance(exc, Exception):
                    _drop_losers(written, won)
                    raise  # a stop request: the images are safe, let it through
                break
            retryable = isinstance(exc, CONNECTION_ERRORS) and AssignmentState.RUNNING in states.values()
            if retryable and attempt < COMMIT_TRIES:
                log.warning("assignments %s: commit failed (%s); committing again on a new connection", ids, exc)
                time.sleep(min(0.5 * attempt, 2.0))
                continue
            # Definitely not committed: the transaction is gone.
            if not (keep_on_error and isinstance(exc, Exception) and not isinstance(exc, CONNECTION_ERRORS)):
                for item in written:
                    remove_files(samples_storage(), item.names)
            raise
    _drop_losers(written, won)
    winners = [item for item in written if item.assignment.pk in won]
    sample_requests_refresh(
        request_ids={item.request.pk for item in winners},
        # A winner that makes every image of its request (a request of one chunk) completes it.
        complete={item.request.pk for item in winners if _covers(item.assignment, item.request)},
    )
    return won


def _covers(attempt: Assignment, request: SampleRequest) -> bool:
    return attempt.first_index == 0 and attempt.image_count >= request.count


def _drop_losers(written: list[Written], won: set[int]) -> None:
    for item in written:
        if item.assignment.pk not in won:
            log.warning(
                "job %s lost its lease before committing: its %d images are dropped",
                item.assignment.job_id,
                len(item.rows),
            )
            remove_files(samples_storage(), item.names)


def commit_call(
    written: list[Written], call: CallSummary, *, context: WorkerContext
) -> tuple[dict[int, bool], Exception | None]:
    """Commit a call's written attempts in one transaction, or one by one once that fails for good.
    Returns whether each attempt committed (an attempt whose commit failed is left out, its failure
    recorded) and the first such error; a connection error is raised (the database is gone: the
    reconciler decides once the leases run out)."""
    committed: dict[int, bool] = {}
    error: Exception | None = None
    try:
        won = commit_written(written, call, keep_on_error=len(written) > 1)
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:
        if len(written) == 1:
            record_failure(written[0].assignment.pk, context, exc)  # definitely not committed (a constraint, a timeout)
            return committed, exc
        log.warning("the commit of %d attempts failed (%s): committing them one by one", len(written), exc)
        won = set()
        for item in written:
            try:
                won |= commit_written([item], call)
            except CONNECTION_ERRORS:
                raise
            except Exception as one:
                record_failure(item.assignment.pk, context, one)
                error = error or one
                continue
            committed[item.assignment.pk] = item.assignment.pk in won
        return committed, error
    for item in written:
        committed[item.assignment.pk] = item.assignment.pk in won
    return committed, None


def record_failure(assignment_id: int, context: WorkerContext, exc: BaseException) -> None:
    """Fail the attempt with the error and its traceback; the scheduler decides whether it is retried."""
    error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
    retry = scheduler.assignment_fail(assignment_id=assignment_id, error=error, retryable=True)
    log.error("assignment %s failed on %s: %s (retry: %s)", assignment_id, context.device.label, exc, retry)
