from __future__ import annotations

import json
import sys
import time
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, InterfaceError, transaction

from config.numbers import is_ascii_int
from gpuscheduler import queues
from gpuscheduler.assignments import NoDeviceAvailable, assignments_place
from gpuscheduler.selectors import device_resolve
from personas.models import Persona, RequestSource, RequestState
from personas.runner import SyncRunner, WaitReport, requests_wait
from personas.services import RequestAlreadyActive, sample_request_submit, validate_count

DEFAULT_TIMEOUT = 3600.0


class Command(BaseCommand):
    help = "Generate sample images for personas in bulk: through the GPU workers, or in this process with --sync."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--persona", action="append", default=[], metavar="ID_OR_SLUG", help="A persona (repeatable)."
        )
        parser.add_argument("--all", action="store_true", help="Every persona.")
        parser.add_argument("--count", default=None, help="Images per persona (default: each persona's own count).")
        parser.add_argument("--device", default=None, help="Run on this device only: UUID, NVML index or 'cpu'.")
        parser.add_argument(
            "--wait", action="store_true", help="Block until every job ends; show progress and a summary."
        )
        parser.add_argument("--sync", action="store_true", help="Generate in this process: no Redis or workers needed.")
        parser.add_argument("--dry-run", action="store_true", help="Show where the images would go; change nothing.")
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON object on stdout (with --dry-run: the plan only)."
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help=f"Only with --wait: stop waiting after this many seconds (default {DEFAULT_TIMEOUT:.0f}); "
            "the jobs go on in the workers and the exit status is 1.",
        )

    def execute(self, *args: Any, **options: Any) -> str | None:
        try:
            return super().execute(*args, **options)
        except (DatabaseError, InterfaceError) as exc:  # a deadlock, a lost connection, a timeout
            # Each persona's request is one transaction: a fault rolls back only the one it hit.
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CommandError(
                f"The database did not answer ({said}). Requests reported as queued above stand; nothing else "
                "was queued. Try again in a moment."
            ) from exc

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        personas = self.resolve_personas(options["persona"], options["all"])
        counts = self.resolve_counts(personas, options["count"])
        if options["timeout"] is None:
            options["timeout"] = DEFAULT_TIMEOUT
        elif not options["wait"]:
            raise CommandError("--timeout applies only to --wait: add --wait, or leave --timeout out.")
        if not 0 < options["timeout"] <= 7 * 86400:
            raise CommandError("--timeout must be between 0 and 604800 seconds.")
        if options["dry_run"]:
            self.dry_run(personas, counts, options)
            return
        if options["sync"]:
            runner = SyncRunner.for_device(options["device"], stderr=self.stderr)
            report = runner.run(personas, counts)
            self.finish(report, started, options)
            return
        device = None
        if options["device"]:
            device = device_resolve(options["device"])
            if device is None:
                raise CommandError(
                    f"Unknown device {options['device']!r}: see `python manage.py gpustatus` for the devices."
                    f"{_digits_hint(options['device'])}"
                )
        try:
            queues.redis_connection().ping()
        except queues.REDIS_ERRORS as exc:
            raise CommandError(
                f"Redis does not answer at the configured REDIS_URL ({exc}). Start Redis, or run with --sync."
            ) from exc
        requests = []
        skipped = []
        for position, persona in enumerate(personas):
            try:
                submitted = sample_request_submit(
                    persona=persona, count=counts[persona.pk], device=device, source=RequestSource.COMMAND
                )
            except RequestAlreadyActive as exc:
                skipped.append(str(exc))
                self.stderr.write(f"skipped: {exc}")
                continue
            except NoDeviceAvailable as exc:
                # No device can take work for anyone (it does not depend on the persona): queue
                # nothing more, and report what was queued so far with the rest as skipped.
                rest = personas[position:]
                skipped.extend(f"{p} was not queued: {exc}" for p in rest)
                self.stderr.write(f"not queued ({', '.join(p.name for p in rest)}): {exc}")
                break
            requests.append(submitted.request)
            if not options["json"]:
                self.stdout.write(f"queued {submitted.summary()}")
        if options["wait"] and requests:
            report = requests_wait(
                requests, timeout=options["timeout"], stderr=self.stderr, progress=not options["json"]
            )
        else:
            report = WaitReport.from_requests(requests, finished=False)
        report.skipped = skipped
        self.finish(report, started, options)

    def resolve_personas(self, values: list[str], everyone: bool) -> list[Persona]:
        if everyone and values:
            raise CommandError("Use --persona or --all, not both.")
        if everyone:
            personas = list(Persona.objects.order_by("pk"))
            if not personas:
                raise CommandError(
                    "There are no personas. Create some in the admin or run `python manage.py demo_data`."
                )
            return personas
        if not values:
            raise CommandError("Name the personas with --persona ID_OR_SLUG (repeatable), or use --all.")
        personas = []
        for value in values:
            text = value.strip()
            persona = None
            if is_ascii_int(text) and len(text) < 19:
                persona = Persona.objects.filter(pk=int(text)).first()
            # Slugs are short and printable: anything else names no persona (and PostgreSQL
            # would refuse a NUL in the query).
            if persona is None and text.isprintable() and len(text) <= 80:
                persona = Persona.objects.filter(slug=text).first()
            if persona is None:
                shown = text if text.isprintable() and len(text) <= 80 else repr(text[:80])
                raise CommandError(
                    f"Unknown persona {shown}: give a persona id or slug (see the admin's persona list)."
                    f"{_digits_hint(text)}"
                )
            if persona not in personas:
                personas.append(persona)
        return personas

    def resolve_counts(self, personas: list[Persona], count: str | None) -> dict[int, int]:
        try:
            if count is not None:
                number = validate_count(count)
                return {p.pk: number for p in personas}
            return {p.pk: validate_count(p.default_sample_count) for p in personas}
        except ValidationError as exc:
            raise CommandError(f"--count: {exc.messages[0]}") from None

    def dry_run(self, personas: list[Persona], counts: dict[int, int], options: dict[str, Any]) -> None:
        device = None
        if options["device"]:
            device = device_resolve(options["device"])
            if device is None:
                raise CommandError(
                    f"Unknown device {options['device']!r}: see `python manage.py gpustatus`."
                    f"{_digits_hint(options['device'])}"
                )
        from personas.models import SampleRequest

        plan = []
        try:
            with transaction.atomic():
                for persona in personas:
                    # Place on a throwaway request so later personas see earlier ones' load; roll back.
                    request = SampleRequest.objects.create(
                        persona=persona,
                        count=counts[persona.pk],
                        first_seed=0,
                        model="",
                        steps=1,
                        state=RequestState.CANCELLED,
                    )
                    for a in assignments_place(request_id=request.pk, count=counts[persona.pk], pinned_device=device):
                        plan.append(
                            {
                                "persona": persona.slug,
                                "images": a.image_count,
                                "device": a.planned_device.uuid,
                                "reason": a.reason,
                            }
                        )
                transaction.set_rollback(True)
        except NoDeviceAvailable as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"dry_run": True, "requested": sum(counts.values()), "plan": plan}, indent=2))
            return
        for row in plan:
            self.stdout.write(f"{row['persona']}: {row['images']} images -> {row['device']} ({row['reason']})")
        self.stdout.write("Dry run: nothing was written or queued.")

    def finish(self, report: WaitReport, started: float, options: dict[str, Any]) -> None:
        summary = report.as_dict(seconds=time.monotonic() - started)
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
        elif options["wait"] or options["sync"]:
            self.stdout.write(
                f"{summary['succeeded']} of {summary['requested']} images made, {summary['failed']} failed, "
                f"in {summary['seconds']:.1f} s"
            )
            for uuid, images in summary["by_device"].items():
                self.stdout.write(f"  {uuid}: {images} images")
        if report.timed_out:
            self.stderr.write("Timed out before every job ended; the rest goes on in the workers.")
        if summary["failed"] or report.skipped or report.timed_out:
            sys.exit(1)


def _digits_hint(text: str) -> str:
    if any(ch.isdigit() and not ch.isascii() for ch in text):
        return " Ids and indexes are written with the digits 0-9, like 3."
    return ""
