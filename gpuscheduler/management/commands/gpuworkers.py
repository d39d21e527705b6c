from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gpuscheduler.backends import BackendUnavailable, get_backend
from gpuscheduler.conf import gpu_config
from gpuscheduler.services import devices_sync
from gpuscheduler.supervisor import Supervisor


class Command(BaseCommand):
    help = "Start one gpuworker per device the backend reports and restart any that exits."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--burst", action="store_true", help="Workers exit when there is no more work; so does this."
        )

    def handle(self, *args: Any, burst: bool, **options: Any) -> None:
        try:
            backend = get_backend()
        except BackendUnavailable as exc:
            raise CommandError(f"{exc}. Set GPU_BACKEND=cpu to run on the CPU.") from exc
        devices = backend.devices()
        # Register every device in index order before the workers race to do it themselves.
        devices_sync(backend=backend, host=gpu_config()["HOST"])
        backend.close()
        if not devices:
            raise CommandError("The backend reports no device. Set GPU_BACKEND=cpu to run on the CPU.")
        names = ", ".join(f"{d.name} {d.uuid}" for d in devices)
        self.stderr.write(f"gpuworkers: {len(devices)} worker(s) on backend {backend.name}: {names}")
        sys.exit(Supervisor(devices, burst=burst).run())
