"""The cluster's machines: each host's monitor heartbeat, device retirement, and the per-host view
the status page and `gpustatus` show.

A host is named by its stable host id (GPU_HOST). Its monitor beats on its Host row; its workers
beat on their Device rows, so a host is silent (stale) when neither its monitor nor any of its
workers or devices has been heard of for conf.stale_after(). Devices nothing was heard of for
GPU_RETIRE_AFTER_HOURS are retired: hidden from placement and the page, kept for history (their
attempts and images point at them), and back as soon as their monitor or worker runs again.
"""

from __future__ import annotations

import functools
import logging
import socket
from datetime import datetime
from importlib import metadata
from typing import Any

from django.db.models import Exists, OuterRef, Q

from gpuscheduler.clock import DbNow, db_now
from gpuscheduler.conf import retire_after, stale_after
from gpuscheduler.models import LIVE_STATES, Assignment, Device, Host

log = logging.getLogger(__name__)

RETIRE_EVERY_SECONDS = 300.0


@functools.cache
def version() -> str:
    try:
        return metadata.version("persona-samples")
    except metadata.PackageNotFoundError:
        return ""


# --- services ------------------------------------------------------------------------------------


def monitor_beat(*, host: str, pid: int, started_at: datetime) -> None:
    """Record that this host's monitor (process `pid`, running since `started_at`) is alive now."""
    fields = {
        "hostname": socket.gethostname()[:255],
        "monitor_pid": pid,
        "monitor_started_at": started_at,
        "monitor_seen_at": DbNow(),
        "version": version()[:64],
    }
    if not Host.objects.filter(host=host).update(**fields):
        Host.objects.update_or_create(host=host, defaults=fields)


def devices_retire(*, now: datetime | None = None) -> int:
    """Retire every device nothing was heard of for GPU_RETIRE_AFTER_HOURS; returns how many.

    A device with a queued or running attempt is kept (its work must stay visible and stealable
    until recovery moves it). One conditional UPDATE: a reading or heartbeat that lands meanwhile
    keeps the device, and registering it again (devices_sync, a worker's start) un-retires it.
    """
    cutoff = (now or db_now()) - retire_after()
    live_work = Assignment.objects.filter(state__in=LIVE_STATES).filter(
        Q(planned_device=OuterRef("pk")) | Q(device=OuterRef("pk"))
    )
    retired = (
        Device.objects.filter(retired_at__isnull=True)
        .filter(Q(last_seen__lt=cutoff) | Q(last_seen__isnull=True, created__lt=cutoff))
        .filter(Q(worker_seen_at__isnull=True) | Q(worker_seen_at__lt=cutoff))
        .exclude(Exists(live_work))
        .update(retired_at=DbNow())
    )
    if retired:
        log.info("retired %d device(s) nothing was heard of for %s", retired, retire_after())
    return retired


# --- selectors -----------------------------------------------------------------------------------


def _age(now: datetime, value: datetime | None) -> float | None:
    return None if value is None else round((now - value).total_seconds(), 1)


def host_status(devices: list[dict[str, Any]], stores: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """One entry per host: its monitor, workers, media store and devices (ids of the rows in
    `devices`, from selectors.device_status), and whether the host as a whole is stale.

    Every host with a device in `devices` (the unretired ones) is listed; a host known only by
    its monitor or its media store is listed while that was heard of within the retirement age.
    """
    after = stale_after().total_seconds()
    rows = {row.host: row for row in Host.objects.all()}
    by_host: dict[str, list[dict[str, Any]]] = {}
    for device in devices:
        by_host.setdefault(device["host"], []).append(device)
    store_of = {store["host"]: store for store in stores}
    recent = now - retire_after()
    # A host that is gone for good (all its devices retired) drops off with its monitor and store.
    names = set(by_host)
    names |= {h for h, store in store_of.items() if store["age_seconds"] <= retire_after().total_seconds()}
    names |= {h for h, row in rows.items() if row.monitor_seen_at is not None and row.monitor_seen_at >= recent}
    hosts = []
    for name in sorted(names):
        row = rows.get(name)
        mine = by_host.get(name, [])
        monitor_age = _age(now, row.monitor_seen_at) if row else None
        monitor_alive = monitor_age is not None and monitor_age <= after
        workers = [
            {
                "device_id": d["id"],
                "device": d["label"],
                "name": d["worker"]["name"],
                "pid": d["worker"]["pid"],
                "state": d["worker"]["state"],
                "heartbeat_age_seconds": d["worker"]["heartbeat_age_seconds"],
                "missing_reason": d["worker"]["missing_reason"],
            }
            for d in mine
            if d["worker"]["heartbeat_age_seconds"] is not None or d["worker"]["state"] != "missing"
        ]
        # Heard of: the monitor's beat, any device's reading (monitor or worker), any worker's beat.
        ages = [
            monitor_age,
            *(d["last_seen_age_seconds"] for d in mine),
            *(w["heartbeat_age_seconds"] for w in workers),
        ]
        known = [a for a in ages if a is not None]
        silent = min(known) if known else None
        stale = silent is None or silent > after
        hosts.append(
            {
                "host": name,
                "hostname": row.hostname if row else "",
                "version": row.version if row else "",
                "monitor": {
                    "state": "running" if monitor_alive else "silent" if monitor_age is not None else "none",
                    "pid": row.monitor_pid if row else None,
                    "started_at": row.monitor_started_at.isoformat() if row and row.monitor_started_at else None,
                    "seen_at": row.monitor_seen_at.isoformat() if row and row.monitor_seen_at else None,
                    "age_seconds": monitor_age,
                },
                "workers": workers,
                "device_ids": [d["id"] for d in mine],
                "store": store_of.get(name),
                "stale": stale,
                "silent_seconds": silent,
            }
        )
    return hosts
