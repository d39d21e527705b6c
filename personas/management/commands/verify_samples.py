from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.storage import samples_storage, storage_errors, storage_where
from personas.integrity import GRACE_SECONDS, SamplesReport, samples_verify
from personas.repair import samples_repair


class Command(BaseCommand):
    help = (
        "Find committed sample images whose file is missing or unreadable, and files under samples/ that "
        "no image row accounts for; with --repair re-queue the images (same seeds), remove the orphans and make "
        "missing thumbnails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--repair",
            action="store_true",
            help="Re-queue missing or unreadable images, remove orphan files and make missing thumbnails.",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Only with --repair: re-queue even when more than half of the images look lost "
            "(which usually means a wrong or unmounted media folder).",
        )
        parser.add_argument(
            "--grace",
            default=None,
            metavar="SECONDS",
            help=f"Leave files changed within this many seconds alone (default {GRACE_SECONDS:.0f}).",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")

    def handle(self, *args: Any, repair: bool, force: bool, grace: str | None, json: bool, **options: Any) -> None:
        if force and not repair:
            raise CommandError("--force applies only to --repair: add --repair, or leave --force out.")
        grace_seconds = self.parse_grace(grace)
        try:
            if repair:
                report = samples_repair(grace_seconds=grace_seconds, force=force)
            else:
                report = samples_verify(grace_seconds=grace_seconds)
        except storage_errors() as exc:
            raise CommandError(
                f"The media store {storage_where(samples_storage())} cannot be read ({exc}): check MEDIA_DIR "
                "and its mount, or the S3_* settings."
            ) from exc
        if json:
            self.stdout.write(_dumps(report.as_dict()))
        else:
            self.show(report)
        if report.problems_left:
            sys.exit(1)

    def parse_grace(self, text: str | None) -> float:
        if text is None:
            return GRACE_SECONDS
        value = text.strip()
        # ASCII digits only, like every number this project reads ('٣' and '1_0' are refused).
        if not (value.isascii() and value.isdigit() and len(value) <= 6) or int(value) > 86400:
            shown = value if value.isprintable() and len(value) <= 20 else repr(value[:20])
            raise CommandError(f"--grace must be a whole number of seconds from 0 to 86400, like 300; got {shown}.")
        return float(value)

    def show(self, report: SamplesReport) -> None:
        how = "opened and checked" if report.contents_checked else "checked for existence"
        self.stdout.write(f"{report.images_checked} images {how}; {report.files_checked} files under samples/.")
        for b in report.broken:
            made = f", made on {b.host}" if b.host else ""
            self.stdout.write(
                f"{b.problem}: {b.path or '(no name)'} ({b.persona}, request {b.request}, index {b.index}, "
                f"seed {b.seed}{made}): {b.detail}"
            )
        removed = set(report.removed)
        for orphan in report.orphans:
            state = "removed" if orphan.path in removed else ("NOT removed" if report.repair else "orphan")
            self.stdout.write(f"orphan: {orphan.path}: {orphan.reason} [{state}]")
        for stray in report.unknown:
            self.stdout.write(f"unknown: {stray.path}: {stray.reason} (left alone; look at it)")
        for done in report.requeued:
            self.stdout.write(
                f"re-queued request {done.request} ({done.persona}): indexes {_join(done.indexes)} "
                f"with seeds {_join(done.seeds)}"
            )
        for reason in report.skipped:
            self.stderr.write(f"not repaired: {reason}")
        if report.recent or report.in_progress:
            self.stdout.write(
                f"Left alone: {report.recent} file(s) changed within the grace, "
                f"{report.in_progress} of attempts queued or running."
            )
        if report.thumbnails_missing:
            made = f", {report.thumbnails_made} made" if report.repair else " (--repair makes them)"
            self.stdout.write(f"{report.thumbnails_missing} image(s) without a thumbnail{made}.")
        left = report.problems_left
        if not (report.broken or report.orphans or report.unknown):
            self.stdout.write("No problems found.")
        elif left and not report.repair:
            self.stdout.write(f"{left} problem(s) found: `python manage.py verify_samples --repair` repairs them.")
        elif left:
            self.stdout.write(f"{left} problem(s) left after the repair.")
        else:
            self.stdout.write("Every problem found was repaired (the re-queued images are made by the workers).")


def _join(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
