from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gpuscheduler.selectors import device_status
from gpuscheduler.storage import store_status

GIB = 1024**3


def _fmt(value: float | None, unit: str, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


class Command(BaseCommand):
    help = "Show every device with its latest snapshot, health, worker and current job, and each media store."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")

    def handle(self, *args: Any, json: bool = False, **options: Any) -> None:
        rows = device_status()
        stores = store_status()
        if json:
            self.stdout.write(_dumps({"devices": rows, "storage": stores}))
            return
        if not rows:
            self.stdout.write("No device is registered yet: start `python manage.py gpumonitor` or `gpuworkers`.")
            self._stores(stores)
            return
        header = (
            f"{'DEVICE':<18} {'UUID':<9} {'HEALTH':<10} {'MEMORY':>15} {'UTIL':>5} {'TEMP':>5} {'POWER':>6} "
            f"{'WORKER':<16} JOB"
        )
        self.stdout.write(header)
        for row in rows:
            snap = row["snapshot"] or {}
            used, total = snap.get("memory_used"), snap.get("memory_total")
            memory = f"{used / GIB:.1f}/{total / GIB:.0f} GiB" if used is not None and total else "-"
            worker = row["worker"]
            age = worker["heartbeat_age_seconds"]
            worker_text = worker["state"] + (f" {age:.0f}s" if age is not None else "")
            job = row["current_job"]
            job_text = f"{job['persona']} x{job['images']} for {job['running_seconds']:.0f}s" if job else "-"
            self.stdout.write(
                f"{row['label'][:18]:<18} {row['short_uuid']:<9} {row['health']:<10} {memory:>15} "
                f"{_fmt(snap.get('utilization'), '%'):>5} {_fmt(snap.get('temperature'), 'C'):>5} "
                f"{_fmt(snap.get('power_watts'), 'W'):>6} {worker_text:<16} {job_text}"
            )
            if row["stale_seconds"] is not None:
                self.stdout.write(f"{'':<18} why: {row['health_reason']} (last recorded: {row['recorded_health']})")
            elif row["health"] != "healthy":
                self.stdout.write(f"{'':<18} why: {row['health_reason']}")
            if worker["missing_reason"]:
                self.stdout.write(f"{'':<18} worker missing: {worker['missing_reason']}")
        self._stores(stores)

    def _stores(self, stores: list[dict[str, Any]]) -> None:
        for store in stores:
            free = store["free_bytes"]
            state = "healthy" if store["healthy"] else f"UNHEALTHY, no work starts: {store['reason']}"
            self.stdout.write(
                f"media store of {store['host']}: {state}"
                + (f", {free / GIB:.1f} GiB free" if free is not None else "")
                + f" (read {store['age_seconds']:.0f}s ago)"
            )


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
