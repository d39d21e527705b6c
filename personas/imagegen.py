"""The image generator of a worker: it makes images from a request's model spec on one device.

A worker keeps one Generator for its device; the Generator keeps that device's pipelines loaded
between jobs in a bounded cache, several models at once (personas/pipelines.py), and makes each
call from the model the request recorded (SampleRequest.model_spec): its source, dtype, size,
scheduler, safety checker, steps and guidance, whatever the worker's own settings say.

torch and diffusers are imported inside functions only: the web process imports this module for
nothing but the torch-free names (OutOfMemory, parse_model, ModelError) and never creates a CUDA
context.

Model sources are checked in personas/model_sources.py and loaded in personas/pipelines.py. The
simulated ones make no diffusion: ``simulated:SECONDS`` takes SECONDS / device speed per image and
draws a deterministic placeholder PNG from each seed (for scheduling tests and benchmarks);
``simulated-h100:SECONDS`` follows the H100's measured curve instead (shared/notes/gpu-measurements.md):
a call of 1 image takes SECONDS / speed, calls of 4, 8 and 16 take 1.02x, 1.20x and 2.32x that,
with a few percent of noise (for the batching work).

Every pipeline call is timed (the call alone, not loading the model or encoding the PNGs) and
returned in GenerationResult.timings; the worker records them and the scheduler learns each
device's cost curve from them (gpuscheduler/costs.py). A simulated device's speed stays here.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gpuscheduler.curves import Timing
from gpuscheduler.device_models import ModelEvents
from personas import compiled
from personas.model_sources import SIMULATED_PREFIXES as SIMULATED_PREFIXES
from personas.model_sources import ModelDirectoryMissing as ModelDirectoryMissing
from personas.model_sources import ModelError as ModelError
from personas.model_sources import ModelSpec as ModelSpec
from personas.model_sources import parse_model as parse_model
from personas.pipelines import ImageSpec, PipelineCache
from personas.pipelines import load_pipeline as load_pipeline
from personas.tiny_model import TINY_MODEL_VERSION as TINY_MODEL_VERSION
from personas.tiny_model import build_sd15_shaped_pipeline as build_sd15_shaped_pipeline
from personas.tiny_model import build_tiny_pipeline as build_tiny_pipeline
from personas.tiny_model import tiny_model_dir as tiny_model_dir

log = logging.getLogger(__name__)

# A model as callers name it: a request's recorded spec, a key this generator has loaded, or a bare
# source (SAMPLES_MODEL, a request made before models were data).
Model = ImageSpec | ModelSpec | Mapping[str, Any] | str


class OutOfMemory(Exception):
    """The device ran out of memory for a pipeline call (translated from torch's error)."""


class AttemptLost(Exception):
    """The attempt's lease was taken away mid-run: stop, its images would be dropped anyway."""


# The H100's measured call times relative to a call of one image (1.23 s for 1 image, 1.26 s for
# 4, 1.48 s for 8, 2.85 s for 16), interpolated between sizes and extended along the last slope.
H100_CALL_CURVE = ((1, 1.0), (4, 1.26 / 1.23), (8, 1.48 / 1.23), (16, 2.85 / 1.23))
# The simulated-h100 model's noise: each call's time is scaled by a factor drawn uniformly from 1 ± this.
H100_NOISE = 0.03


def h100_call_factor(images: int) -> float:
    """How much longer a call of `images` takes than a call of one on the H100 curve."""
    points = H100_CALL_CURVE
    if images <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if images <= x1:
            return y0 + (y1 - y0) * (images - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) / (x1 - x0) * (images - x1)


@dataclass(frozen=True)
class GeneratedImage:
    seed: int
    png: bytes
    width: int
    height: int
    thumbnail: bytes = b""  # personas/thumbnails.py; empty when none could be made


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    calls: int = 0
    peak_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)  # one per pipeline call, in order
    encode_seconds: float = 0.0  # PNG encoding inside the last call, left out of its timing


@dataclass(frozen=True)
class Prompt:
    """What one image of a call is made from: a call may mix images of several requests."""

    seed: int
    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class Target:
    """The device a Generator runs on."""

    kind: str  # cuda / cpu / simulated
    uuid: str = "cpu"
    speed: float = 1.0

    @property
    def torch_device(self) -> str:
        # A worker sets CUDA_VISIBLE_DEVICES=<uuid> before torch is imported: its GPU is cuda:0.
        return "cuda" if self.kind == "cuda" else "cpu"


class Generator:
    """Makes images on one device, keeping the pipelines of its recent models loaded between jobs."""

    def __init__(self, target: Target, events: ModelEvents | None = None, *, capacity: int | None = None) -> None:
        self.target = target
        self.cache = PipelineCache(target, events, capacity=capacity)
        self._specs: dict[str, ImageSpec] = {}  # every model this generator was asked for, by key

    @property
    def events(self) -> ModelEvents:
        return self.cache.events

    @events.setter
    def events(self, events: ModelEvents) -> None:
        self.cache.events = events

    @property
    def loads(self) -> int:
        return self.cache.loads

    def spec_for(self, model: Model) -> ImageSpec:
        """The spec of `model`; a string is a key this generator was given before, else a bare source."""
        if isinstance(model, str) and model.strip() in self._specs:
            return self._specs[model.strip()]
        spec = ImageSpec.of(model)
        self._specs[spec.key] = spec
        return spec

    def warm_models(self) -> list[str]:
        """The keys of the models whose pipelines are loaded, the most recently used first."""
        return self.cache.models()

    def generate(
        self,
        *,
        model: Model,
        steps: int | None = None,
        guidance: float | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        seeds: Sequence[int] = (),
        items: Sequence[Prompt] | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> GenerationResult:
        """Make one image per seed (all from `prompt`), or one per item of `items` (each with its own
        prompt, negative prompt and seed: images of several requests batched into one call), in as
        few pipeline calls as memory allows (normally one), with the model's steps and guidance
        unless given. Every call is timed; loading the model is not part of any call's time."""
        spec = self.spec_for(model)
        steps = spec.steps if steps is None else int(steps)
        guidance = spec.guidance_scale if guidance is None else float(guidance)
        loaded = self.cache.get(spec)  # ModelError when it does not load: recorded as this pair's
        source = loaded.source
        result = GenerationResult(images=[])
        pending = list(items) if items is not None else [Prompt(int(s), prompt, negative_prompt) for s in seeds]
        limit = len(pending)
        while pending:
            batch = pending[:limit]
            try:
                with self._device_busy(len(batch)):
                    self._apply_faults(len(batch), source)
                    started = time.perf_counter()
                    if source.kind == "simulated":
                        images = self._simulated_call(source, batch, alive)
                    elif compiled.compile_enabled():
                        # A compiled UNet runs fixed shapes: pad the call to its bucket, drop the extras.
                        size = compiled.bucket_for(len(batch), compiled.buckets())
                        full = compiled.padded(batch, size)
                        images = self._pipeline_call(loaded.pipe, spec, full, steps, guidance, alive, result)
                        images = images[: len(batch)]
                    else:
                        images = self._pipeline_call(loaded.pipe, spec, batch, steps, guidance, alive, result)
                    seconds = time.perf_counter() - started - result.encode_seconds
                    result.encode_seconds = 0.0
            except OutOfMemory as exc:
                self.free_memory()
                why = f"out of memory in a call of {len(batch)} images of {spec.name}"
                if self.cache.evict_other(keep=spec.recipe, why=why):
                    # Another model's pipeline made room: try the same call again before splitting it.
                    note = f"out of memory at {len(batch)} images per call; evicted another model ({exc})"
                elif limit == 1:
                    raise OutOfMemory(f"out of memory even for one image per call: {exc}") from exc
                else:
                    limit = max(1, limit // 2)
                    note = f"out of memory at {len(batch)} images per call; retrying at {limit} ({exc})"
                log.warning(note)
                result.notes.append(note)
                continue
            result.calls += 1
            result.images.extend(images)
            first = images[0] if images else None
            result.timings.append(
                Timing(
                    images=len(batch),
                    seconds=max(0.0, seconds),
                    width=first.width if first else 0,
                    height=first.height if first else 0,
                )
            )
            pending = pending[len(batch) :]
        return result

    def warm(self, model: Model) -> None:
        """Load the model now, at worker start, rather than in the first job."""
        spec = self.spec_for(model)
        loaded = self.cache.get(spec)
        if loaded.source.kind != "simulated" and compiled.compile_enabled():
            # Compile each call-size bucket now, not in a request's first call of that size.
            for size in compiled.buckets():
                started = time.monotonic()
                self.generate(model=spec, steps=2, guidance=1.0, prompt="warm-up", seeds=list(range(size)))
                log.info("compiled for calls of %d in %.1f s", size, time.monotonic() - started)

    def pipeline(self, model: Model) -> Any:
        """The model's pipeline, loaded if need be (None for a simulated model)."""
        return self.cache.get(self.spec_for(model)).pipe

    # --- simulated model ------------------------------------------------------------------

    def _simulated_call(
        self, spec: ModelSpec, batch: Sequence[Prompt], alive: Callable[[], bool]
    ) -> list[GeneratedImage]:
        seconds = simulated_call_seconds(spec, len(batch), self.target.speed)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
            if not alive():
                raise AttemptLost("the attempt was abandoned while it ran")
        return [placeholder_image(item.seed) for item in batch]

    # --- diffusers ---------------------------------------------------------------------------

    def _pipeline_call(
        self,
        pipe: Any,
        spec: ImageSpec,
        batch: Sequence[Prompt],
        steps: int,
        guidance: float,
        alive: Callable[[], bool],
        result: GenerationResult,
    ) -> list[GeneratedImage]:
        import torch

        device = self.target.torch_device
        seeds = [item.seed for item in batch]
        # One generator per image: every image has its own recorded, reproducible seed, whatever
        # call it is made in.
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        if len({(item.prompt, item.negative_prompt) for item in batch}) == 1:
            prompts: Any = batch[0].prompt
            negatives: Any = batch[0].negative_prompt or None
            per_prompt = len(batch)
        else:
            # Images of several requests: a prompt and a negative prompt per image ("" is what
            # diffusers uses for a missing negative prompt anyway).
            prompts = [item.prompt for item in batch]
            negatives = [item.negative_prompt for item in batch]
            per_prompt = 1

        def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if not alive():
                raise AttemptLost("the attempt was abandoned while it ran")
            return kwargs

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.inference_mode():
                output = pipe(
                    prompt=prompts,
                    negative_prompt=negatives,
                    num_images_per_prompt=per_prompt,
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    output_type="pil",
                    callback_on_step_end=on_step_end,
                    **spec.size,
                )
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(str(exc).splitlines()[0]) from exc
        if device == "cuda":
            torch.cuda.synchronize()
            peak = int(torch.cuda.max_memory_allocated())
            result.peak_memory = max(result.peak_memory or 0, peak)
        encoding = time.perf_counter()
        images = encode_all(output.images, seeds)
        result.encode_seconds = time.perf_counter() - encoding
        return images

    def free_memory(self) -> None:
        """Give back what a failed call held, keeping the loaded pipelines."""
        gc.collect()
        if self.target.torch_device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- simulated devices ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _device_busy(self, images: int) -> Iterator[None]:
        if self.target.kind != "simulated":
            yield
            return
        from gpuscheduler import simulated

        with simulated.busy(self.target.uuid, images):
            yield

    def _apply_faults(self, images: int, spec: ModelSpec) -> None:
        """Fault switches of a simulated device, flipped by tests (never consulted otherwise)."""
        if self.target.kind != "simulated":
            return
        from gpuscheduler import simulated

        switches = simulated.faults(self.target.uuid)
        if switches.get("fail"):
            raise RuntimeError(f"simulated failure: {switches['fail']}")
        limit = switches.get("oom_above_batch")
        if limit is not None and images > int(limit):
            message = f"simulated: {images} images need more than the device has (limit {limit})"
            if spec.kind == "simulated":
                raise OutOfMemory(message)
            import torch

            try:
                raise torch.cuda.OutOfMemoryError(message)
            except torch.cuda.OutOfMemoryError as exc:  # the same translation as a real call
                raise OutOfMemory(str(exc)) from exc
        if switches.get("hang_native"):
            # Native code that never returns to the interpreter: SIGALRM cannot interrupt it.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                time.sleep(float(switches["hang_native"]))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if switches.get("hang_seconds"):
            time.sleep(float(switches["hang_seconds"]))


def _encode(image: Any, seed: int) -> GeneratedImage:
    from personas.thumbnails import thumbnail_or_empty

    buffer = io.BytesIO()
    # Level 1: PNG stays lossless, and encoding 8 images of 512 px takes a fraction of the
    # default level's time, time during which the GPU would otherwise sit idle.
    image.save(buffer, format="PNG", compress_level=1)
    # The thumbnail from the picture itself (no PNG to decode), in the same encoder thread.
    return GeneratedImage(
        seed=int(seed),
        png=buffer.getvalue(),
        width=image.width,
        height=image.height,
        thumbnail=thumbnail_or_empty(image),
    )


_encoder_pool: ThreadPoolExecutor | None = None


def encode_all(images: Sequence[Any], seeds: Sequence[int]) -> list[GeneratedImage]:
    """Encode a batch's PNGs (and thumbnails) in parallel threads (zlib releases the GIL)."""
    global _encoder_pool
    if len(images) == 1:
        return [_encode(images[0], seeds[0])]
    if _encoder_pool is None:
        _encoder_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png")
    return list(_encoder_pool.map(_encode, images, seeds))


def simulated_call_seconds(spec: ModelSpec, images: int, speed: float) -> float:
    """How long a simulated call of `images` takes on a device of `speed` (the truth the scheduler
    must learn: it never reads it)."""
    one = spec.seconds / max(speed, 0.01)
    if spec.curve != "h100":
        return one * images
    noise = 1.0 + _noise.uniform(-H100_NOISE, H100_NOISE)
    return one * h100_call_factor(images) * noise


# The simulated-h100 model's noise, seeded so a benchmark's runs are alike.
_noise = random.Random(1234)


def placeholder_image(seed: int, size: int = 64) -> GeneratedImage:
    """A deterministic picture drawn from the seed (the `simulated:` model's output)."""
    from PIL import Image, ImageDraw

    digest = hashlib.sha256(str(seed).encode()).digest()
    image = Image.new("RGB", (size, size), tuple(digest[0:3]))
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x0, y0 = digest[3 + 4 * i] % size, digest[4 + 4 * i] % size
        x1, y1 = x0 + 8 + digest[5 + 4 * i] % (size // 2), y0 + 8 + digest[6 + 4 * i] % (size // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(digest[20 + i : 23 + i]))
    draw.text((3, size - 12), str(seed % 100000), fill=(255, 255, 255))
    return _encode(image, seed)
