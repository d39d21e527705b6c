"""torch.compile of the UNet with fixed call-size buckets (SAMPLES_COMPILE=1; off by default).

A compiled UNet is fast only for the shapes it was compiled for: a call of a new size recompiles
(tens of seconds on a GPU). So calls are padded up to the next bucket of SAMPLES_COMPILE_BUCKETS
(throwaway images that are dropped), and the worker warms every bucket when it starts, while it
still shows `starting`. On the H100, compiled calls of 16 reached 7.7 images/s against 5.6
uncompiled (shared/notes/gpu-measurements.md).

Imported by personas/imagegen.py inside the worker only: torch is imported inside functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)


def compile_enabled() -> bool:
    return bool(getattr(settings, "SAMPLES", {}).get("COMPILE", False))


def buckets() -> list[int]:
    return sorted(getattr(settings, "SAMPLES", {}).get("COMPILE_BUCKETS", [1, 2, 4, 8, 16]))


def bucket_for(images: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds `images`; a call larger than every bucket keeps its size."""
    return next((size for size in sorted(sizes) if size >= images), images)


def padded(batch: Sequence[Any], size: int) -> list[Any]:
    """The batch made up to `size` with copies of its first item (their images are dropped)."""
    return [*batch, *([batch[0]] * (size - len(batch)))] if batch else []


def compile_unet(pipe: Any) -> Any:
    """Compile the pipeline's UNet in place (static shapes: one graph per bucket) and return it."""
    import torch

    pipe.unet = torch.compile(pipe.unet, fullgraph=True, dynamic=False)
    log.info("the UNet will be compiled for call sizes %s (SAMPLES_COMPILE=1)", buckets())
    return pipe
