from __future__ import annotations

from django.apps import AppConfig

# How often one monitor in the cluster folds old snapshots into averages and deletes expired ones.
COMPACT_EVERY_SECONDS = 60.0


class GpuSchedulerConfig(AppConfig):
    name = "gpuscheduler"
    verbose_name = "GPU scheduler"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gpuscheduler import checks  # noqa: F401  (registers the system checks)
        from gpuscheduler.cluster import RETIRE_EVERY_SECONDS, devices_retire
        from gpuscheduler.housekeeping import register
        from gpuscheduler.services import snapshots_compact

        # Cluster-wide chores: gpumonitor offers them every tick, one monitor runs each per interval.
        register("snapshots-compact", COMPACT_EVERY_SECONDS, snapshots_compact)
        register("devices-retire", RETIRE_EVERY_SECONDS, devices_retire)
