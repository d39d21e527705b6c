"""Repairing the media store after a check (personas/integrity.py): `verify_samples --repair`.

The orphans are removed and the broken images made again: their rows are deleted and their request
reopened with new attempts for those indexes, which use the same seeds. This is an operator's step,
never the periodic sweep's, and it holds back when most images look broken: that says more about the
media folder (wrong, or not mounted) than about the images.
"""

from __future__ import annotations

import logging

from django.core.exceptions import SuspiciousOperation
from django.db import IntegrityError, transaction
from django.db.models import Max

from config.storage import samples_storage, storage_errors
from gpuscheduler import assignments as scheduler
from gpuscheduler.assignments import NoDeviceAvailable
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Assignment
from personas.integrity import (
    GRACE_SECONDS,
    BrokenImage,
    Requeued,
    SamplesReport,
    file_problem,
    samples_orphans_remove,
    samples_verify,
)
from personas.models import ACTIVE_REQUEST_STATES, Persona, RequestState, SampleImage, SampleRequest
from personas.thumbnails import thumbnails_make

log = logging.getLogger(__name__)

# More broken images than this share of all (and at least REPAIR_BRAKE_MIN) looks like a wrong
# MEDIA_DIR, an unmounted share or another bucket, not lost files: --repair then re-queues nothing without --force.
REPAIR_BRAKE_SHARE = 0.5
REPAIR_BRAKE_MIN = 10


def samples_repair(*, grace_seconds: float = GRACE_SECONDS, force: bool = False) -> SamplesReport:
    """Verify, then re-queue the broken images (same seeds) and remove the orphans.

    The broken rows (and their unreadable files, once that commits) are deleted and their request
    reopened with new attempts for those indexes, placed by the policy. A request whose persona has
    another request queued or running is skipped, and so is everything when more than half of the
    images look broken (a wrong MEDIA_DIR, an unmounted share or another bucket) unless `force`.
    """
    report = samples_verify(grace_seconds=grace_seconds)
    report.repair = True
    samples_orphans_remove(report=report)
    _requeue_broken(report, force=force)
    if report.thumbnail_ids:
        report.thumbnails_made, problems = thumbnails_make(report.thumbnail_ids)
        report.skipped += problems
    return report


def _requeue_broken(report: SamplesReport, *, force: bool) -> None:
    if not report.broken:
        return
    limit = max(REPAIR_BRAKE_MIN, int(report.images_checked * REPAIR_BRAKE_SHARE))
    if len(report.broken) > limit and not force:
        report.skipped.append(
            f"{len(report.broken)} of {report.images_checked} images look missing or unreadable: more likely the "
            "media folder is the wrong one or not mounted than that they were all lost. Nothing was re-queued; "
            "check MEDIA_DIR and its mount (or the S3_* settings), or run again with --force."
        )
        return
    by_request: dict[int | None, list[BrokenImage]] = {}
    for broken in report.broken:
        by_request.setdefault(broken.request, []).append(broken)
    pending = list(by_request.items())
    for position, (request_id, images) in enumerate(pending):
        if request_id is None:
            report.skipped.extend(
                f"{b.path} (image {b.image} of {b.persona}): its request was deleted, so it cannot be re-made; "
                "delete the image in the admin"
                for b in images
            )
            continue
        try:
            requeued = _requeue_request(request_id, images, report)
        except NoDeviceAvailable as exc:
            # No device can take work for anyone: stop here and say so for every request left.
            left = ", ".join(str(r) for r, _ in pending[position:] if r is not None)
            report.skipped.append(f"not re-queued (requests {left}): {exc}")
            return
        except IntegrityError:
            # A submit or another repair won the race for this persona (the unique constraints).
            report.skipped.append(f"request {request_id}: another request or attempt became active; run --repair again")
            continue
        if requeued is not None:
            report.requeued.append(requeued)


def _requeue_request(request_id: int, images: list[BrokenImage], report: SamplesReport) -> Requeued | None:
    with transaction.atomic():
        request = SampleRequest.objects.select_related("persona").filter(pk=request_id).first()
        if request is None:
            report.skipped.append(f"request {request_id} no longer exists")
            return None
        # The persona row first, as sample_request_submit does: one lock order for both.
        Persona.objects.select_for_update().get(pk=request.persona_id)
        other = (
            SampleRequest.objects.filter(persona_id=request.persona_id, state__in=ACTIVE_REQUEST_STATES)
            .exclude(pk=request.pk)
            .first()
        )
        if other is not None:
            report.skipped.append(
                f"request {request.pk} ({request.persona.slug}): the persona has request {other.pk} "
                f"{other.state}; run --repair again once it ends"
            )
            return None
        redo: list[SampleImage] = []
        unreadable: list[str] = []  # and the redone rows' thumbnails
        rows = SampleImage.objects.filter(pk__in=[b.image for b in images], request_id=request.pk).order_by("index")
        for row in rows:
            # Look again under the lock: an operator may have put the file back since the check.
            problem = file_problem(row.image.name, listed=False, check_contents=True)
            if problem is None:
                report.skipped.append(f"{row.image.name}: the file is fine now; left as is")
                continue
            if row.seed != request.seed_for(row.index):
                report.skipped.append(
                    f"{row.image.name}: its seed {row.seed} is not request {request.pk}'s seed for index "
                    f"{row.index} ({request.seed_for(row.index)}), so a re-made image would differ; left as is"
                )
                continue
            redo.append(row)
            if problem[0] == "unreadable":
                unreadable.append(row.image.name)
            if row.thumbnail:
                unreadable.append(row.thumbnail)  # the re-made image brings its own
        if not redo:
            return None
        if not request.is_active:
            SampleRequest.objects.filter(pk=request.pk).update(state=RequestState.QUEUED, finished_at=None, error="")
        SampleImage.objects.filter(pk__in=[row.pk for row in redo]).delete()
        created = []
        for run in _runs([row.index for row in redo], int(samples_config()["MAX_BATCH"])):
            # Above every earlier attempt of a chunk that starts here: the request's state is
            # derived from each chunk's latest attempt.
            highest = Assignment.objects.filter(request=request, first_index=run[0]).aggregate(top=Max("attempt"))
            created += scheduler.assignments_place(
                request_id=request.pk,
                count=len(run),
                first_index=run[0],
                attempt=(highest["top"] or 0) + 1,
                whole=True,
            )
        scheduler.enqueue_on_commit(created)
        transaction.on_commit(lambda: _delete_files(unreadable))
    indexes = [row.index for row in redo]
    log.warning("request %s: re-queued lost or damaged images %s", request.pk, indexes)
    return Requeued(
        request=request.pk,
        persona=request.persona.slug,
        indexes=indexes,
        seeds=[request.seed_for(i) for i in indexes],
        jobs=[a.job_id for a in created],
    )


def _runs(indexes: list[int], longest: int) -> list[list[int]]:
    """Contiguous runs of sorted indexes, none longer than `longest` (one pipeline call each)."""
    runs: list[list[int]] = []
    for index in sorted(indexes):
        if runs and runs[-1][-1] == index - 1 and len(runs[-1]) < longest:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _delete_files(names: list[str]) -> None:
    storage = samples_storage()
    errors: tuple[type[Exception], ...] = (*storage_errors(), SuspiciousOperation)
    for name in names:
        try:
            storage.delete(name)
        except errors as exc:
            log.error("could not remove the damaged file %s: %s", name, exc)
