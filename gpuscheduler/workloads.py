"""What the scheduler needs to know of the work it runs, given by the app above it.

The scheduler imports nothing of `personas`: personas registers here, in its AppConfig.ready(),
what a worker needs before any request names a model (the default model, which the worker warms
at start, calibrates and runs its canary with), and derives its model errors from ModelLoadError,
so that a worker can tell a model that does not load (that pair's fault) from a device that fails.
The scheduler knows a model by its key alone; a spec is an opaque dict it hands to the Generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuscheduler.conf import samples_config


class ModelLoadError(Exception):
    """A model cannot be loaded on a device (missing files, a bad config, too big for it).

    The model's fault, not the device's: the (device, model) pair goes out of service with the
    message as its reason (gpuscheduler/device_models.py), and the device keeps serving its other
    models. Subclassed by the app that loads models (personas.pipelines.ModelError)."""


@dataclass(frozen=True)
class ModelChoice:
    """A model as the scheduler carries it: its key, and the spec a worker loads it from."""

    key: str
    spec: dict[str, Any] = field(default_factory=dict)


DefaultModel = Callable[[], tuple[str, dict[str, Any]]]
_default_model: DefaultModel | None = None


def register_default_model(fn: DefaultModel) -> None:
    """Tell the scheduler how to get the default model: `fn()` returns its (key, spec)."""
    global _default_model
    _default_model = fn


def default_model() -> ModelChoice:
    """The default model: what the registered function says, else SAMPLES_MODEL as a bare source
    (the scheduler used without the app that defines models)."""
    if _default_model is None:
        model = str(samples_config()["MODEL"])
        return ModelChoice(key=model, spec={"key": model, "source": model})
    key, spec = _default_model()
    return ModelChoice(key=key, spec=dict(spec))


def default_key_and_steps() -> tuple[str, int]:
    """The default model's key and step count: what placement, the cost curves, calibration and the
    status page use where no request names a model."""
    choice = default_model()
    return choice.key, int(choice.spec.get("steps") or samples_config()["STEPS"])
