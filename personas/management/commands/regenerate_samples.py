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
from personas.image_models import ModelUnavailable, model_for, model_named, spec_name, spec_of
from personas.models import ImageModel, Persona, RequestSource, RequestState
from personas.runner import SyncRunner, WaitReport, requests_wait
from personas.services import RequestAlreadyActive, images_text, sample_request_submit, validate_count

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
            "--model",
            default=None,
            metavar="NAME",
            help="Use this image model (its name in the admin) for this run instead of each persona's own.",
        )
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
        model = self.resolve_model(options["model"])
        if options["dry_run"]:
            self.dry_run(personas, counts, model, options)
            return
        if options["sync"]:
            self.run_here(personas, counts, model, started, options)
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
                    persona=persona, count=counts[persona.pk], device=device, source=RequestSource.COMMAND, model=model
                )
            except RequestAlreadyActive as exc:
                skipped.append(str(exc))
                self.stderr.write(f"skipped: {exc}")
                continue
            except ModelUnavailable as exc:  # this persona's model; the others may take theirs
                skipped.append(f"{persona} was not queued: {exc}")
                self.stderr.write(f"not queued ({persona.name}): {exc}")
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
            # The bar on stdout (not in stderr's error style); with --json stdout is the JSON alone.
            report = requests_wait(
                requests, timeout=options["timeout"], out=self.stdout, stderr=self.stderr, progress=not options["json"]
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

    def resolve_model(self, name: str | None) -> ImageModel | None:
        if name is None:
            return None
        try:
            return model_named(name.strip())
        except ModelUnavailable as exc:
            raise CommandError(f"--model: {exc}") from None

    def run_here(
        self,
        personas: list[Persona],
        counts: dict[int, int],
        model: ImageModel | None,
        started: float,
        options: dict[str, Any],
    ) -> None:
        """--sync: personas whose model takes no requests are skipped with the reason."""
        runner = SyncRunner.for_device(options["device"], stderr=self.stderr)
        report = runner.run(personas, counts, model=model)
        self.finish(report, started, options)

    def resolve_counts(self, personas: list[Persona], count: str | None) -> dict[int, int]:
        try:
            if count is not None:
                number = validate_count(count)
                return {p.pk: number for p in personas}
            return {p.pk: validate_count(p.default_sample_count) for p in personas}
        except ValidationError as exc:
            raise CommandError(f"--count: {exc.messages[0]}") from None

    def dry_run(
        self, personas: list[Persona], counts: dict[int, int], model: ImageModel | None, options: dict[str, Any]
    ) -> None:
        device = None
        if options["device"]:
            device = device_resolve(options["device"])
            if device is None:
                raise CommandError(
                    f"Unknown device {options['device']!r}: see `python manage.py gpustatus`."
                    f"{_digits_hint(options['device'])}"
                )
        from personas.models import SampleRequest

        plan: list[dict[str, Any]] = []
        skipped = []
        try:
            with transaction.atomic():
                for persona in personas:
                    try:
                        chosen = model_for(persona, override=model)
                    except ModelUnavailable as exc:
                        skipped.append(f"{persona} would not be queued: {exc}")
                        continue
                    # Place on a throwaway request so later personas see earlier ones' load; roll back.
                    request = SampleRequest.objects.create(
                        persona=persona,
                        count=counts[persona.pk],
                        first_seed=0,
                        model="",
                        steps=1,
                        state=RequestState.CANCELLED,
                    )
                    placed = assignments_place(
                        request_id=request.pk,
                        count=counts[persona.pk],
                        pinned_device=device,
                        model=spec_of(chosen)["key"],
                        steps=chosen.steps,
                    )
                    for a in placed:
                        plan.append(
                            {
                                "persona": persona.slug,
                                "model": chosen.name,
                                "images": a.image_count,
                                "device": a.planned_device.uuid,
                                "device_label": a.planned_device.label,
                                "reason": a.reason,
                            }
                        )
                transaction.set_rollback(True)  # a default model made by model_for goes too
        except NoDeviceAvailable as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            out = {"dry_run": True, "requested": sum(counts.values()), "plan": plan, "skipped": skipped}
            self.stdout.write(json.dumps(out, indent=2))
            return
        for row in plan:
            self.stdout.write(
                # The reason starts with the device's label ("SIM 0 H100: 12% memory used, ...").
                f"{row['persona']}: {images_text(row['images'])} -> {row['device']} ({row['reason']}); "
                f"model {row['model']}"
            )
        for line in skipped:
            self.stdout.write(line)
        self.stdout.write("Dry run: nothing was written or queued.")

    def finish(self, report: WaitReport, started: float, options: dict[str, Any]) -> None:
        summary = with_models(report.as_dict(seconds=time.monotonic() - started), report)
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2))
        elif options["wait"] or options["sync"]:
            self.stdout.write(
                f"{summary['succeeded']} of {images_text(summary['requested'])} made, {summary['failed']} failed, "
                f"in {summary['seconds']:.1f} s"
            )
            for row in summary["by_device"]:
                self.stdout.write(f"  {row['label']}: {images_text(row['images'])} ({row['uuid']})")
        if report.timed_out:
            self.stderr.write("Timed out before every job ended; the rest goes on in the workers.")
        if summary["failed"] or report.skipped or report.timed_out:
            sys.exit(1)


def with_models(summary: dict[str, Any], report: WaitReport) -> dict[str, Any]:
    """The report with the model of each request and image: its name and key, as recorded."""
    specs = {r.pk: r.model_spec for r in report.requests}
    for row, request in zip(summary["requests"], report.requests, strict=True):
        row["model"] = {"name": spec_name(request.model_spec, request.model), "key": request.model}
    for row, image in zip(summary["images"], report.images, strict=True):
        spec = specs.get(image.request_id or 0, {})
        row["model"] = {"name": spec_name(spec, image.model), "key": image.model}
    return summary


def _digits_hint(text: str) -> str:
    if any(ch.isdigit() and not ch.isascii() for ch in text):
        return " Ids and indexes are written with the digits 0-9, like 3."
    return ""
