"""The system check of SAMPLES_MODEL (registered in PersonasConfig.ready(); run by every manage.py
command). Its ids keep the gpuscheduler prefix they had when the scheduler checked the model, so
that a SILENCED_SYSTEM_CHECKS entry naming them goes on working."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Warning

from gpuscheduler.conf import gpu_config, samples_config


def check_samples_model(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    from personas.imagegen import ModelDirectoryMissing, ModelError, parse_model

    model = str(samples_config()["MODEL"])
    try:
        parse_model(model)
    except ModelDirectoryMissing:
        # Only this host lacks it: the web server may run where no model is (README, "Several
        # machines"), and a Warning does not stop migrate or runserver as an Error would.
        return [
            Warning(
                f"SAMPLES_MODEL={model.strip()!r} is not a diffusers directory on this host "
                f"({gpu_config()['HOST']}): there is no model_index.json in it.",
                hint="GPU workers on this host will fail to load the model. That is fine on a host that only runs "
                "the web server; on a GPU host, point SAMPLES_MODEL at a folder saved with save_pretrained().",
                id="gpuscheduler.W002",
            )
        ]
    except ModelError as exc:
        return [
            Error(str(exc), hint="Set SAMPLES_MODEL to 'tiny' to run without a real model.", id="gpuscheduler.E003")
        ]
    return []
