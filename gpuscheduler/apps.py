from __future__ import annotations

from django.apps import AppConfig


class GpuSchedulerConfig(AppConfig):
    name = "gpuscheduler"
    verbose_name = "GPU scheduler"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gpuscheduler import checks  # noqa: F401  (registers the system checks)
