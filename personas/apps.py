from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class PersonasConfig(AppConfig):
    name = "personas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from config.storage import check_samples_storage
        from gpuscheduler import housekeeping, metrics, workloads
        from personas.checks import check_samples_model
        from personas.integrity import SWEEP_SECONDS
        from personas.metrics import request_metrics
        from personas.sample_work import SAMPLE_WORK

        checks.register(check_samples_storage)
        checks.register(check_samples_model)

        # The scheduler sits below this app: it runs the sweep and the sample job kind, and learns
        # which model a worker warms, calibrates and runs its canary with, without importing personas.
        housekeeping.register("samples-orphans", SWEEP_SECONDS, _sweep)
        workloads.register_sample_work(SAMPLE_WORK)
        workloads.register_default_model(_default_model)
        # /metrics (gpuscheduler) adds request latency, which only this app knows, to each scrape.
        metrics.register_collector("personas", request_metrics)


def _sweep() -> object:
    from personas.integrity import samples_sweep

    return samples_sweep()


def _default_model() -> tuple[str, dict[str, Any]]:
    from personas.image_models import default_model, spec_of

    spec = spec_of(default_model())
    return spec["key"], spec
