"""What a model's source names, checked without importing torch: ``tiny``, a local diffusers
folder, a hub id, or a simulated model (``simulated:SECONDS``, ``simulated-h100:SECONDS``).

The web process checks SAMPLES_MODEL and the admin's model sources with parse_model; a worker
checks a request's model with it again on its own host before loading it (personas/pipelines.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuscheduler.workloads import ModelLoadError


class ModelError(ModelLoadError):
    """A model cannot be loaded; the message says why and what to set instead."""


class ModelDirectoryMissing(ModelError):
    """A model's source names a local directory that holds no diffusers model on this host."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "tiny", "local", "hub" or "simulated"
    value: str
    seconds: float = 0.0
    curve: str = "linear"  # simulated models: "linear" (simulated:) or "h100" (simulated-h100:)


SIMULATED_PREFIXES = {"simulated:": "linear", "simulated-h100:": "h100"}


def parse_model(text: str, *, what: str = "SAMPLES_MODEL") -> ModelSpec:
    """Validate a model source (SAMPLES_MODEL, or the source of the model `what` names)."""
    text = text.strip()
    if not text:
        raise ModelError(f"{what} is empty: use 'tiny', a local diffusers directory or a hub id.")
    if text == "tiny":
        return ModelSpec("tiny", text)
    for prefix, curve in SIMULATED_PREFIXES.items():
        if text.startswith(prefix):
            try:
                seconds = float(text.split(":", 1)[1]) if text.isascii() else -1
            except ValueError:
                seconds = -1
            if not 0 <= seconds <= 3600:
                raise ModelError(f"{what}={text!r}: the seconds after {prefix!r} must be a number from 0 to 3600.")
            return ModelSpec("simulated", text, seconds, curve)
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith("."):
        if not (path / "model_index.json").is_file():
            raise ModelDirectoryMissing(
                f"{what}={text!r} is not a diffusers directory (no model_index.json): "
                "point it at a folder saved with save_pretrained()."
            )
        return ModelSpec("local", str(path.resolve()))
    if text.count("/") == 1 and all(
        part.replace("-", "").replace("_", "").replace(".", "").isalnum() for part in text.split("/")
    ):
        return ModelSpec("hub", text)
    raise ModelError(
        f"{what}={text!r} is neither 'tiny', 'simulated:SECONDS', 'simulated-h100:SECONDS', an absolute "
        "path to a diffusers directory nor a hub id like 'owner/model'."
    )
