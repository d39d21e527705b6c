"""The media store against the database: committed images whose file is lost or damaged, and
files that no row accounts for (orphans).

The database decides which files live. A file's name carries only ids
(``samples/persona-P/rR-iI-aA.png``, see sample_image_path), so its fate is read from the row of
the attempt A that wrote it: a file that a SampleImage row names is committed; a file of a queued
or running attempt is in progress; a file of an attempt that ended any other way, of a succeeded
attempt whose row was deleted, or of an attempt that no longer exists is an orphan. A name that
does not parse, or whose ids disagree with the database, is reported and never touched.

Everything goes through the samples storage (a folder or a bucket: config/storage.py), so the sweep on
any machine sees and removes what every machine wrote; every name comes from the database or from
listing, never from user input. Only samples/ is read: the store's probe files live beside it.
Re-making the broken images is an operator's step: personas/repair.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import SuspiciousOperation
from django.db.models import Max
from django.utils import timezone

from config.storage import samples_storage, storage_errors
from gpuscheduler.models import LIVE_STATES, Assignment, AssignmentState
from personas.models import SampleImage

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
# A file changed this recently is never judged: its writer may still be between the write and the
# commit, or its attempt row may not be visible to this connection yet.
GRACE_SECONDS = 300.0
# How often gpumonitor (one of them, cluster-wide) sweeps orphans; registered in PersonasConfig.ready.
SWEEP_SECONDS = 600.0

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An image, or its thumbnail (personas/thumbnails.py), or either being written.
_NAME = re.compile(r"persona-(\d{1,18})/r(\d{1,18})-i(\d{1,9})-a(\d{1,18})\.(?:png|thumb\.webp|thumb\.jpg)(\.part)?")


@dataclass
class BrokenImage:
    """A committed image (a SampleImage row) whose file is missing or unreadable."""

    image: int
    persona: str
    request: int | None
    index: int
    seed: int
    path: str
    problem: str  # "missing" or "unreadable"
    detail: str
    host: str  # where it was made: images of one host all missing suggest its media folder is not shared


@dataclass
class StrayFile:
    """A file under samples/ that no row names: an orphan (removable) or unknown (left alone)."""

    path: str
    reason: str
    attempt: int | None = None


@dataclass
class Requeued:
    request: int
    persona: str
    indexes: list[int]
    seeds: list[int]
    jobs: list[str]


@dataclass
class SamplesReport:
    images_checked: int = 0
    files_checked: int = 0
    contents_checked: bool = True
    broken: list[BrokenImage] = field(default_factory=list)
    orphans: list[StrayFile] = field(default_factory=list)
    unknown: list[StrayFile] = field(default_factory=list)
    recent: int = 0
    in_progress: int = 0
    thumbnails_made: int = 0
    thumbnail_ids: list[int] = field(default_factory=list)  # the images without one (counted, not listed)
    repair: bool = False
    requeued: list[Requeued] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def thumbnails_missing(self) -> int:
        return len(self.thumbnail_ids)

    @property
    def problems_left(self) -> int:
        """Broken images not re-queued, orphans not removed, and unknown files."""
        requeued = {(r.request, i) for r in self.requeued for i in r.indexes}
        broken = sum(1 for b in self.broken if (b.request, b.index) not in requeued)
        removed = set(self.removed)
        return broken + sum(1 for o in self.orphans if o.path not in removed) + len(self.unknown)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thumbnails_missing"] = len(data.pop("thumbnail_ids"))
        data["problems_left"] = self.problems_left
        return data


# --- verifying ------------------------------------------------------------------------------------


def samples_verify(
    *, check_contents: bool = True, grace_seconds: float = GRACE_SECONDS, now: datetime | None = None
) -> SamplesReport:
    """Compare the image rows with the files under samples/ and report what disagrees; change nothing.

    `check_contents` opens every committed file (PNG signature, Pillow's verify); without it only
    existence is checked, from one listing of the folder.
    """
    now = now or timezone.now()
    report = SamplesReport(contents_checked=check_contents)
    # Rows first, the listing second: a file committed in between is judged by its attempt below.
    rows: dict[int, str] = {}
    thumbnails: dict[int, str] = {}
    for pk, name, thumbnail in (
        SampleImage.objects.order_by("pk").values_list("pk", "image", "thumbnail").iterator(chunk_size=2000)
    ):
        rows[pk] = name
        thumbnails[pk] = thumbnail
    report.images_checked = len(rows)
    files = set(_walk(SAMPLES_DIR))
    report.files_checked = len(files)

    problems: dict[int, tuple[str, str]] = {}
    for pk, name in rows.items():
        found = file_problem(name, listed=name in files, check_contents=check_contents)
        if found is not None:
            problems[pk] = found
    report.broken = _describe_broken(problems)

    # A thumbnail is not data: one missing is counted (and made again by --repair), never "broken".
    report.thumbnail_ids = [pk for pk in rows if pk not in problems and thumbnails[pk] not in files]
    named = set(rows.values()) | {name for name in thumbnails.values() if name}
    _judge_files(report, sorted(files - named), grace=timedelta(seconds=grace_seconds), now=now)
    return report


def _walk(folder: str) -> Iterator[str]:
    try:
        folders, names = samples_storage().listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        yield f"{folder}/{name}"
    for sub in folders:
        yield from _walk(f"{folder}/{sub}")


def file_problem(name: str, *, listed: bool, check_contents: bool) -> tuple[str, str] | None:
    """("missing" | "unreadable", detail) for a committed image's file, or None when it is fine."""
    if not name:
        return "missing", "the row names no file"
    try:
        storage = samples_storage()
        if not listed and not storage.exists(name):
            return "missing", "no such file"
        if not check_contents:
            return None
        with storage.open(name, "rb") as handle:
            head = handle.read(len(PNG_SIGNATURE))
            if not head:
                return "unreadable", "empty file"
            if head != PNG_SIGNATURE:
                return "unreadable", "not a PNG file"
            handle.seek(0)
            return _pillow_problem(handle)
    except SuspiciousOperation:  # a folder says SuspiciousFileOperation, S3 its parent
        return "unreadable", "the name points outside the media folder"
    except FileNotFoundError:
        return "missing", "no such file"
    except storage_errors() as exc:
        return "unreadable", f"cannot be read: {exc}"


def _pillow_problem(handle: Any) -> tuple[str, str] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        # verify() walks the chunks and their checksums without decoding the pixels: cheap.
        with Image.open(handle) as image:
            image.verify()
    except UnidentifiedImageError:
        return "unreadable", "damaged PNG: Pillow cannot identify it"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        return "unreadable", f"damaged PNG: {exc}"
    return None


def _describe_broken(problems: dict[int, tuple[str, str]]) -> list[BrokenImage]:
    # Read again: a row deleted since the first read (its file removed on commit) is not broken.
    images: list[SampleImage] = []
    for batch in _batches(list(problems)):
        images += SampleImage.objects.filter(pk__in=batch).select_related("persona", "device")
    images.sort(key=lambda image: (image.request_id is None, image.request_id or 0, image.index))
    return [
        BrokenImage(
            image=image.pk,
            persona=image.persona.slug,
            request=image.request_id,
            index=image.index,
            seed=image.seed,
            path=image.image.name or "",
            problem=problems[image.pk][0],
            detail=problems[image.pk][1],
            host=image.device.host if image.device else "",
        )
        for image in images
    ]


def _judge_files(report: SamplesReport, names: list[str], *, grace: timedelta, now: datetime) -> None:
    """Sort the files no row named (at the first read) into orphans, unknown, recent and in progress."""
    parsed: dict[str, tuple[int, int, int, int]] = {}
    for name in names:
        match = _NAME.fullmatch(name.removeprefix(f"{SAMPLES_DIR}/"))
        if match is None:
            report.unknown.append(StrayFile(name, "not a name this system writes"))
            continue
        try:
            changed = samples_storage().get_modified_time(name)
        except FileNotFoundError:
            continue  # renamed or removed by its writer since the listing
        if changed > now - grace:
            report.recent += 1
            continue
        persona_id, request_id, index, attempt_id = (int(g) for g in match.groups()[:4])
        parsed[name] = (persona_id, request_id, index, attempt_id)
    if not parsed:
        return
    # The attempts' states first, the rows second: rows are committed in the same transaction as
    # the RUNNING -> SUCCEEDED flip, so an attempt read as succeeded already shows its rows.
    ids = sorted({p[3] for p in parsed.values()})
    attempts: dict[int, Any] = {}
    for batch in _batches(ids):
        rows = Assignment.objects.filter(pk__in=batch).values(
            "pk", "state", "request_id", "request__persona_id", "first_index", "image_count"
        )
        attempts.update({row["pk"]: row for row in rows})
    newest = Assignment.objects.aggregate(newest=Max("pk"))["newest"] or 0
    candidates: list[StrayFile] = []
    for name, (persona_id, request_id, index, attempt_id) in parsed.items():
        row = attempts.get(attempt_id)
        if row is None:
            if attempt_id > newest:
                # Ids only grow: the database that wrote this file is not this one (a wrong
                # DATABASE_URL, or a restore from an older backup). Never delete on its word.
                # (Or the newest attempts' request was deleted: then a new attempt settles it.)
                report.unknown.append(
                    StrayFile(name, f"names attempt {attempt_id}, newer than any in this database", attempt_id)
                )
            else:
                candidates.append(StrayFile(name, f"attempt {attempt_id} no longer exists", attempt_id))
            continue
        first, count = row["first_index"], row["image_count"]
        if (row["request_id"], row["request__persona_id"]) != (request_id, persona_id) or not (
            first <= index < first + count
        ):
            report.unknown.append(
                StrayFile(name, f"its ids disagree with attempt {attempt_id} in the database", attempt_id)
            )
        elif row["state"] in LIVE_STATES:
            report.in_progress += 1
        elif row["state"] == AssignmentState.SUCCEEDED:
            candidates.append(
                StrayFile(name, f"attempt {attempt_id} succeeded but no image row names this file", attempt_id)
            )
        else:
            candidates.append(StrayFile(name, f"attempt {attempt_id} is {row['state']}", attempt_id))
    named: set[str] = set()
    for batch in _batches([c.path for c in candidates]):
        named.update(SampleImage.objects.filter(image__in=batch).values_list("image", flat=True))
        named.update(SampleImage.objects.filter(thumbnail__in=batch).values_list("thumbnail", flat=True))
    report.orphans = [c for c in candidates if c.path not in named]


def _batches(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- removing orphans -----------------------------------------------------------------------------


def samples_orphans_remove(*, report: SamplesReport) -> list[str]:
    """Delete the report's orphans; record and return the names removed."""
    storage = samples_storage()
    for orphan in report.orphans:
        try:
            storage.delete(orphan.path)
        except storage_errors() as exc:
            log.error("could not remove orphan %s: %s", orphan.path, exc)
            continue
        report.removed.append(orphan.path)
    if report.removed:
        log.warning("removed %d orphan file(s): %s", len(report.removed), ", ".join(report.removed[:20]))
    return report.removed


# --- the periodic pass ----------------------------------------------------------------------------


def samples_sweep() -> SamplesReport:
    """Remove orphans and log lost images: the reconciler's pass, run by gpumonitor in its turn.

    It re-queues nothing (that is an operator's decision: `verify_samples --repair`) and opens no
    file: existence comes from one listing, so it stays cheap on a large or remote store.
    """
    report = samples_verify(check_contents=False)
    samples_orphans_remove(report=report)
    for broken in report.broken[:20]:
        log.error(
            "sample image %s of %s (request %s, index %s, seed %s) is %s: %s (%s); "
            "`python manage.py verify_samples --repair` re-makes it",
            broken.image,
            broken.persona,
            broken.request,
            broken.index,
            broken.seed,
            broken.problem,
            broken.path,
            broken.detail,
        )
    if len(report.broken) > 20:
        log.error("... and %d more lost images: run `python manage.py verify_samples`", len(report.broken) - 20)
    for stray in report.unknown[:20]:
        log.warning("unknown file in the media folder, left alone: %s (%s)", stray.path, stray.reason)
    return report
