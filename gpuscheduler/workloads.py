"""What the scheduler needs to know of the work it runs, given by the app above it.

The scheduler imports nothing of `personas` (tests/gpuscheduler/test_layering.py holds it to
that): personas registers here, in its AppConfig.ready(), the sample job kind (SampleWork: the rq
job that runs an attempt, what happens when one ends, the generator a worker runs its calls on,
the repair of requests left without live work) and what a worker needs before any request names
a model (the default model, which the worker warms at start, calibrates and runs its canary
with). It derives its model errors from ModelLoadError, so that a worker can tell a model that
does not load (that pair's fault) from a device that fails. The scheduler knows a model by its
key alone; a spec is an opaque dict it hands to the Generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ImproperlyConfigured

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


@dataclass(frozen=True)
class SampleWork:
    """The sample job kind (AssignmentKind.SAMPLES), as the app that owns sample requests runs it.

    job: the dotted path of the rq job that runs one attempt, given the attempt's id.
    request_active(request_id): may the request still take images (not cancelled, not finished)?
      A retry is placed only while it may.
    attempt_ended(attempt, discard_files): an attempt of a request (request_id set) ended without
      success, or was abandoned (discard_files: the files it may have put in place are not the
      request's).
    repair_requests(now): give requests left with no live attempt their final state (a crash
      between two writes); returns the ids repaired.
    generator(kind, uuid, speed): the Generator a worker runs its calls on, built in the worker's
      process once it is bound to its device (kind "cuda", "cpu" or "simulated").
    """

    job: str
    request_active: Callable[[int], bool]
    attempt_ended: Callable[[Any, bool], None]
    repair_requests: Callable[[datetime], list[int]]
    generator: Callable[[str, str, float], Any]


_sample_work: SampleWork | None = None


def register_sample_work(work: SampleWork) -> None:
    """Tell the scheduler how sample attempts run and end (personas does, in its ready())."""
    global _sample_work
    _sample_work = work


def sample_work() -> SampleWork:
    if _sample_work is None:
        raise ImproperlyConfigured(
            "No app registered the sample job kind (gpuscheduler.workloads.register_sample_work): "
            "add 'personas' to INSTALLED_APPS."
        )
    return _sample_work
