from __future__ import annotations

import json
import math
import time
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from gpuscheduler.conf import samples_config
from gpuscheduler.policies import POLICIES, STEAL_RULES
from gpuscheduler.replay import Outcome, Scenario, Workload, baseline, replay, scenarios
from gpuscheduler.replay_trace import ReplayInputError, history_load, trace_load

DEFAULT_HOURS = 24.0
BATCHING = {"on": (True,), "off": (False,), "both": (True, False)}


class Command(BaseCommand):
    help = (
        "Replay recorded sample requests (the assignment history, or a JSON trace) through each placement "
        "policy, steal rule and batching choice with the devices' learned cost curves, as a discrete-event "
        "simulation (no workers, no waiting), and compare makespan, latency and per-device load."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        source = parser.add_argument_group("what to replay (the last 24 hours of history by default)")
        source.add_argument(
            "--trace",
            metavar="PATH",
            help='A JSON trace: {"devices": [{"name": "H100", "fixed": 0.11, "per_image": 0.17, "knee": 6.5, '
            '"count": 2}], "requests": [{"at": 0.0, "images": 4}]} (see gpuscheduler/replay_trace.py).',
        )
        source.add_argument("--since", metavar="HOURS", help="Replay the requests placed in the last HOURS hours.")
        source.add_argument("--from", dest="start", metavar="TIME", help="Start of the window, ISO 8601.")
        source.add_argument("--to", dest="end", metavar="TIME", help="End of the window, ISO 8601 (default: now).")
        parser.add_argument(
            "--policies",
            default=",".join(POLICIES),
            help=f"Comma-separated placement policies (default: all of {', '.join(POLICIES)}).",
        )
        parser.add_argument(
            "--steal", default="both", help=f"Comma-separated steal rules of {', '.join(STEAL_RULES)}, or both."
        )
        parser.add_argument("--batching", default="both", help="Cross-request batching: on, off or both.")
        parser.add_argument("--max-batch", metavar="N", help="Most images in one call (default: SAMPLES_MAX_BATCH).")
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        chosen = _scenarios(options["policies"], options["steal"], options["batching"])
        max_batch = _max_batch(options["max_batch"])
        try:
            workload = self._workload(options)
        except ReplayInputError as exc:
            raise CommandError(str(exc)) from exc
        started = time.perf_counter()
        outcomes = replay(workload, chosen, max_batch=max_batch, progress=self._progress(options["verbosity"]))
        wall = time.perf_counter() - started
        if options["json"]:
            self.stdout.write(json.dumps(_as_json(workload, outcomes, max_batch, wall), indent=2))
            return
        self._header(workload, max_batch)
        self._table(workload, outcomes)
        self.stdout.write(
            f"Replayed {len(outcomes)} combination(s) in {wall:.1f} s "
            f"({wall / len(outcomes):.1f} s each); RATIO is makespan / makespan of {_label(baseline(outcomes))}."
        )
        spans = [o.makespan for o in outcomes]
        if len(spans) > 1 and min(spans) > 0 and max(spans) / min(spans) < 1.01:
            self.stdout.write(
                "Every makespan is within 1% of the others: the pool kept up with the arrivals, so the "
                "latencies (P50, P90) are what tell these choices apart."
            )

    def _workload(self, options: dict[str, Any]) -> Workload:
        since, start, end = options["since"], options["start"], options["end"]
        if options["trace"]:
            if since or start or end:
                raise CommandError(
                    "--trace replays the file, --since/--from/--to choose the history: give one or the other."
                )
            return trace_load(options["trace"])
        start_at, end_at = _window(since, start, end, timezone.now())
        return history_load(start=start_at, end=end_at)

    def _progress(self, verbosity: int) -> Any:
        if verbosity < 2:
            return None

        def report(outcome: Outcome) -> None:
            self.stderr.write(f"replayed {_label(outcome)} in {outcome.wall_seconds:.2f} s")

        return report

    def _header(self, workload: Workload, max_batch: int) -> None:
        self.stdout.write(
            f"Replaying {len(workload.requests)} request(s), {workload.images} image(s) ({workload.source}) on "
            f"{len(workload.devices)} device(s), calls of at most {max_batch} images:"
        )
        for k, (model, steps) in enumerate(workload.keys):
            indent = "  "
            if model or steps:
                self.stdout.write(f"  {model or 'any model'} at {steps or 'any'} steps:")
                indent = "    "
            for device in workload.devices:
                self.stdout.write(f"{indent}{device.name} ({device.detail}): {_describe(device.curves[k], max_batch)}")
        self.stdout.write("")

    def _table(self, workload: Workload, outcomes: list[Outcome]) -> None:
        base = baseline(outcomes)
        head = (
            f"{'POLICY':<13}{'STEAL':<7}{'BATCHING':<9}{'MAKESPAN':>10}{'RATIO':>7}{'P50':>9}{'P90':>9}"
            f"{'CALLS':>8}{'STOLEN':>8}  LOAD (busy share of the makespan)"
        )
        self.stdout.write(head)
        for o in outcomes:
            s = o.scenario
            load = ", ".join(f"{d.name} {o.load(i):.0%}" for i, d in enumerate(workload.devices))
            self.stdout.write(
                f"{s.policy:<13}{s.steal:<7}{'on' if s.batching else 'off':<9}{_seconds(o.makespan):>10}"
                f"{_ratio(o, base):>7}{_seconds(o.latency_p50):>9}{_seconds(o.latency_p90):>9}"
                f"{o.calls:>8}{o.stolen:>8}  {load}"
            )
        self.stdout.write("")


# --- parsing --------------------------------------------------------------------------------------


def _names(text: str, option: str, known: tuple[str, ...] | list[str]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise CommandError(f"{option} is empty: give one or more of {', '.join(known)}, separated by commas.")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CommandError(f"{option}: unknown {', '.join(unknown)}; use one or more of {', '.join(known)}.")
    return list(dict.fromkeys(names))


def _scenarios(policies: str, steal: str, batching: str) -> list[Scenario]:
    rules = list(STEAL_RULES) if steal.strip() == "both" else _names(steal, "--steal", STEAL_RULES)
    if batching not in BATCHING:
        raise CommandError(f"--batching {batching!r}: use on, off or both.")
    return scenarios(_names(policies, "--policies", list(POLICIES)), rules, BATCHING[batching])


def _max_batch(text: str | None) -> int:
    if text is None:
        return int(samples_config()["MAX_BATCH"])
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise CommandError(f"--max-batch {text!r}: give a whole number of images from 1 to 1024.")
    return value


def _time(text: str, option: str) -> datetime:
    try:
        value = parse_datetime(text)
        if value is None and (day := parse_date(text)) is not None:
            value = datetime(day.year, day.month, day.day)
    except ValueError:
        value = None  # well formed but impossible, like 2024-02-30
    if value is None:
        raise CommandError(f"{option} {text!r} is not a time: use ISO 8601, e.g. 2024-05-01T08:00 or 2024-05-01.")
    return timezone.make_aware(value) if timezone.is_naive(value) else value


def _window(since: str | None, start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the history to replay, from --since, --from and --to."""
    if since is not None and start is not None:
        raise CommandError("--since and --from both give the start of the window: give one of them.")
    hours = DEFAULT_HOURS
    if since is not None:
        try:
            hours = float(since)
        except ValueError:
            hours = math.nan
        if not math.isfinite(hours) or not 0 < hours <= 24 * 366:
            raise CommandError(f"--since {since!r}: give a number of hours above 0 (and at most a year), e.g. 24.")
    end_at = _time(end, "--to") if end is not None else now
    start_at = _time(start, "--from") if start is not None else end_at - timedelta(hours=hours)
    if start_at >= end_at:
        raise CommandError(f"--from {start_at.isoformat()} is not before --to {end_at.isoformat()}: swap them.")
    return start_at, end_at


# --- output ---------------------------------------------------------------------------------------


def _label(outcome: Outcome) -> str:
    s = outcome.scenario
    return f"{s.policy}, steal {s.steal}, batching {'on' if s.batching else 'off'}"


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f}s"
    if value < 1000:
        return f"{value:.1f}s"
    return f"{value:.0f}s"


def _ratio(outcome: Outcome, base: Outcome) -> str:
    return f"{outcome.makespan / base.makespan:.2f}" if base.makespan > 0 else "-"


def _describe(curve: Any, max_batch: int) -> str:
    text = curve.describe(max_batch)
    if curve.source == "trace":
        text = text.rsplit(" (", 1)[0] + " (from the trace)"
    return str(text)


def _as_json(workload: Workload, outcomes: list[Outcome], max_batch: int, wall: float) -> dict[str, Any]:
    base = baseline(outcomes)
    devices = [
        {
            "name": d.name,
            "detail": d.detail,
            "curves": [
                {
                    "model": model,
                    "steps": steps,
                    "fixed": c.fixed,
                    "per_image": c.per_image,
                    "knee": c.knee,
                    "best_size": c.best_size(max_batch),
                    "source": c.source,
                    "describe": _describe(c, max_batch),
                }
                for (model, steps), c in zip(workload.keys, d.curves, strict=True)
            ],
        }
        for d in workload.devices
    ]
    results = [
        {
            "policy": o.scenario.policy,
            "steal": o.scenario.steal,
            "batching": o.scenario.batching,
            "makespan_seconds": o.makespan,
            "ratio": o.makespan / base.makespan if base.makespan > 0 else None,
            "latency_p50_seconds": o.latency_p50,
            "latency_p90_seconds": o.latency_p90,
            "calls": o.calls,
            "stolen": o.stolen,
            "wall_seconds": o.wall_seconds,
            "devices": [
                {"name": d.name, "busy_seconds": o.busy[i], "load": o.load(i), "images": o.images[i]}
                for i, d in enumerate(workload.devices)
            ],
        }
        for o in outcomes
    ]
    return {
        "source": workload.source,
        "requests": len(workload.requests),
        "images": workload.images,
        "max_batch": max_batch,
        "devices": devices,
        "baseline": {"policy": base.scenario.policy, "steal": base.scenario.steal, "batching": base.scenario.batching},
        "results": results,
        "wall_seconds": wall,
    }
