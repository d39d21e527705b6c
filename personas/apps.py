from __future__ import annotations

from django.apps import AppConfig


class PersonasConfig(AppConfig):
    name = "personas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from config.storage import check_samples_storage
        from gpuscheduler import housekeeping
        from personas.integrity import SWEEP_SECONDS

        checks.register(check_samples_storage)

        # The scheduler sits below this app: it runs the sweep without importing personas.
        housekeeping.register("samples-orphans", SWEEP_SECONDS, _sweep)


def _sweep() -> object:
    from personas.integrity import samples_sweep

    return samples_sweep()
