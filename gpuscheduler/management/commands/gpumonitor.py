from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections

from gpuscheduler import housekeeping
from gpuscheduler.backends import BackendUnavailable, get_backend
from gpuscheduler.clock import db_now
from gpuscheduler.cluster import monitor_beat
from gpuscheduler.conf import gpu_config
from gpuscheduler.recovery import assignments_recover_in_turn
from gpuscheduler.services import snapshots_record
from gpuscheduler.storage import store_check, store_refresh

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Read every device and the media store of this host, store snapshots, mark unhealthy devices, "
        "re-run the work of dead workers, and keep the snapshot history bounded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Take one reading of every device and exit.")
        parser.add_argument(
            "--interval", type=float, default=None, help="Seconds between readings (GPU_MONITOR_INTERVAL)."
        )

    def handle(self, *args: Any, once: bool, interval: float | None, **options: Any) -> None:
        config = gpu_config()
        interval = float(config["MONITOR_INTERVAL"]) if interval is None else interval
        if not 0.1 <= interval <= 3600:
            raise CommandError(f"--interval {interval} is out of range: use 0.1 to 3600 seconds.")
        try:
            backend = get_backend()
        except BackendUnavailable as exc:
            raise CommandError(f"{exc}. Set GPU_BACKEND=cpu to monitor the CPU only.") from exc
        stopping = []
        signal.signal(signal.SIGTERM, lambda *a: stopping.append(True))
        signal.signal(signal.SIGINT, lambda *a: stopping.append(True))
        host = config["HOST"]
        started_at = None
        try:
            while not stopping:
                started = time.monotonic()
                if once:
                    monitor_beat(host=host, pid=os.getpid(), started_at=db_now())
                    for snap in snapshots_record(backend=backend, host=config["HOST"]):
                        self.stdout.write(f"{snap.device.label}: {snap.health} {snap.error}".rstrip())
                    store = store_check(host=config["HOST"])
                    self.stdout.write(f"media store: {'healthy' if store.healthy else 'unhealthy'} {store.reason}")
                    return
                try:
                    close_old_connections()
                    started_at = started_at or db_now()
                    monitor_beat(host=host, pid=os.getpid(), started_at=started_at)
                    snapshots_record(backend=backend, host=config["HOST"])
                    store_refresh(host=config["HOST"])
                    assignments_recover_in_turn()
                    # Cluster-wide chores, each run by one monitor per interval: snapshot compaction
                    # and retention, device retirement (gpuscheduler), the orphan sweep (personas).
                    housekeeping.run_due()
                except Exception:
                    # The collector outlives a restarting database or a Redis blip: log, go on.
                    log.exception("gpumonitor: this tick failed; trying again in %.1f s", interval)
                    close_old_connections()
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            backend.close()
