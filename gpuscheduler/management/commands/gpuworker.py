from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gpuscheduler.backends import BackendUnavailable
from gpuscheduler.worker import DeviceNotFound, resolve_local_device, run_worker


class Command(BaseCommand):
    help = (
        "Run one non-forking RQ worker bound to one device: it reads its own queues first, then every "
        "other device's queue, and keeps its diffusers pipelines loaded between jobs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--device", required=True, help="The device: its UUID (or a unique prefix), NVML index, or 'cpu'."
        )
        parser.add_argument("--burst", action="store_true", help="Exit when there is no more work.")

    def handle(self, *args: Any, device: str, burst: bool, **options: Any) -> None:
        try:
            backend, info = resolve_local_device(device)
        except (DeviceNotFound, BackendUnavailable) as exc:
            raise CommandError(str(exc)) from exc
        self.stderr.write(f"gpuworker: {info.name} {info.uuid} ({info.kind})" + (" [burst]" if burst else ""))
        try:
            run_worker(info, backend, burst=burst)
        except DeviceNotFound as exc:
            raise CommandError(str(exc)) from exc
