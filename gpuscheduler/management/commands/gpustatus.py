from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gpuscheduler.clock import db_now
from gpuscheduler.cluster import host_status
from gpuscheduler.page_reads import cost_texts, device_status, model_texts
from gpuscheduler.policies import age_text
from gpuscheduler.storage import store_status

GIB = 1024**3


def _fmt(value: float | None, unit: str, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


class Command(BaseCommand):
    help = (
        "Show every host of the cluster (its monitor and media store) with its devices: latest snapshot, health, "
        "worker and current job."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")

    def handle(self, *args: Any, json: bool = False, **options: Any) -> None:
        now = db_now()  # one clock for every age shown: the database's
        rows = device_status(now)
        costs = cost_texts([row["id"] for row in rows])
        models = model_texts([row["id"] for row in rows])
        for row in rows:
            row["cost"] = costs[row["id"]]
            row["models"] = models[row["id"]]
        stores = store_status(now)
        hosts = host_status(rows, stores, now)
        stores = [store for store in stores if any(store["host"] == host["host"] for host in hosts)]
        if json:
            self.stdout.write(_dumps({"hosts": hosts, "devices": rows, "storage": stores}))
            return
        if not rows:
            self.stdout.write("No device is registered yet: start `python manage.py gpumonitor` or `gpuworkers`.")
        else:
            self.stdout.write(
                f"{'DEVICE':<18} {'UUID':<9} {'HEALTH':<10} {'MEMORY':>15} {'UTIL':>5} {'TEMP':>5} {'POWER':>6} "
                f"{'WORKER':<16} JOB"
            )
        by_id = {row["id"]: row for row in rows}
        for host in hosts:
            self.stdout.write(_host_line(host))
            for device_id in host["device_ids"]:
                self._device(by_id[device_id])
            self._stores([host["store"]] if host["store"] else [])

    def _device(self, row: dict[str, Any]) -> None:
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
        self.stdout.write(f"{'':<18} cost: {row['cost']['text']}")
        if row["models"]:
            shown = ", ".join(
                f"{m['name']} ({m['state']}" + (f": {m['reason'][:120]}" if m["reason"] else "") + ")"
                for m in row["models"]
            )
            self.stdout.write(f"{'':<18} models: {shown}")

    def _stores(self, stores: list[dict[str, Any]]) -> None:
        for store in stores:
            free = store["free_bytes"]
            state = "healthy" if store["healthy"] else f"UNHEALTHY, no work starts: {store['reason']}"
            self.stdout.write(
                f"media store of {store['host']}: {state}"
                + (f", {free / GIB:.1f} GiB free" if free is not None else "")
                + f" (read {store['age_seconds']:.0f}s ago)"
            )


def _host_line(host: dict[str, Any]) -> str:
    """One line per host, e.g. `host gpu-a-3f9a2c (gpu-a): monitor seen 2 s ago (pid 4242); 2 of 2
    workers live`, ending in STALE and how long when nothing was heard from it."""
    monitor = host["monitor"]
    age = monitor["age_seconds"]
    monitor_text = {
        "running": f"monitor seen {age_text(age or 0)} ago (pid {monitor['pid']})",
        "silent": f"monitor silent for {age_text(age or 0)}",
        "none": "no monitor",
    }[monitor["state"]]
    live = sum(1 for w in host["workers"] if w["state"] != "missing")
    name = f" ({host['hostname']})" if host["hostname"] and host["hostname"] != host["host"] else ""
    line = f"host {host['host']}{name}: {monitor_text}; {live} of {len(host['device_ids'])} workers live"
    if host["stale"]:
        silent = host["silent_seconds"]
        line += "; STALE: nothing heard from it" + (f" for {age_text(silent)}" if silent is not None else "")
    return line


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
