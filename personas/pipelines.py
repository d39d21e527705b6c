"""Pipelines made from a model's spec, and the per-device cache that keeps several of them warm.

A request records its model as it was when it was made (SampleRequest.model_spec, from
personas/image_models.py spec_of); the worker loads exactly that, whatever its own settings say.
What a loaded pipeline depends on is its recipe: the source, the dtype, the scheduler and the
safety checker. Models that differ only in image size, steps or guidance share one pipeline.

Sources: ``tiny`` (a random-weight pipeline built in code: personas/tiny_model.py), a local
diffusers folder, a hub id (both with local_files_only: from the local hub cache, no download), and
``simulated:SECONDS`` / ``simulated-h100:SECONDS`` (no diffusion: placeholder images, for
scheduling tests and benchmarks; see personas/imagegen.py).

Each worker keeps up to GPU_MODEL_CACHE pipelines on its device (default 2), the least recently
used evicted first: its reference dropped, gc.collect() and torch.cuda.empty_cache(), the memory
freed measured (torch.cuda.memory_allocated before and after; a simulated device's reading). On
CUDA the device's memory is the budget too: a load that would not fit by the model's size measured
on an earlier load, or that runs out of memory, evicts the least recently used first, and a model
that does not fit even alone is that pair's failure. Every load is timed. The worker's
ModelEvents record loads, uses, evictions and failures (gpuscheduler/device_models.py).

torch and diffusers are imported inside functions only: the web process imports this module for
parse_model and never creates a CUDA context.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuscheduler.conf import gpu_config, samples_config
from gpuscheduler.device_models import ModelEvents
from personas import compiled
from personas.model_sources import ModelError, ModelSpec, parse_model
from personas.tiny_model import quiet, tiny_model_dir

log = logging.getLogger(__name__)

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEFAULT_MODEL_CACHE = 2
# What a loaded model holds on a simulated device (a Stable Diffusion 1.5 in fp16 holds about this).
SIMULATED_MODEL_BYTES = 2 * 1024**3
# A model's use is written to its DeviceModel row at most this often (its first use at once).
USE_RECORD_SECONDS = 30.0
# A load needs this much more free memory than the model held when it was last loaded here.
FIT_MARGIN = 1.1


@dataclass(frozen=True)
class Recipe:
    """What a loaded pipeline is made of: models with the same recipe share one."""

    source: str
    dtype: str = "auto"
    scheduler: str = ""
    safety_checker: bool = False

    def __str__(self) -> str:
        extras = [self.dtype, self.scheduler, "safety checker" if self.safety_checker else ""]
        return f"{self.source} ({', '.join(e for e in extras if e)})"


@dataclass(frozen=True)
class ImageSpec:
    """A request's model, as the worker makes images from it (SampleRequest.model_spec)."""

    key: str
    source: str
    name: str = ""
    dtype: str = "auto"
    width: int | None = None
    height: int | None = None
    scheduler: str = ""
    safety_checker: bool = False
    steps: int = 25
    guidance_scale: float = 7.5

    @classmethod
    def of(cls, value: ImageSpec | ModelSpec | Mapping[str, Any] | str) -> ImageSpec:
        """A spec from a request's recorded spec, or from a bare source (a request made before
        models were data, SAMPLES_MODEL, a test): the model's own size and scheduler, no safety
        checker, keyed by the source itself, as personas.image_models.legacy_spec says."""
        if isinstance(value, ImageSpec):
            return value
        if isinstance(value, ModelSpec):
            value = value.value
        if isinstance(value, str):
            text = value.strip()
            return cls(key=text, source=text, name=text)
        source = str(value.get("source") or "").strip()
        return cls(
            key=str(value.get("key") or source),
            source=source,
            name=str(value.get("name") or source),
            dtype=str(value.get("dtype") or "auto"),
            width=_size(value.get("width")),
            height=_size(value.get("height")),
            scheduler=str(value.get("scheduler") or ""),
            safety_checker=bool(value.get("safety_checker", False)),
            steps=int(value.get("steps") or samples_config()["STEPS"]),
            guidance_scale=float(value.get("guidance_scale", samples_config()["GUIDANCE"])),
        )

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.source, self.dtype, self.scheduler, self.safety_checker)

    @property
    def size(self) -> dict[str, int]:
        """The call's width and height, where the model sets them (else the pipeline's own)."""
        return {k: v for k, v in (("width", self.width), ("height", self.height)) if v}


def _size(value: Any) -> int | None:
    return int(value) if value else None


def model_cache_size() -> int:
    """How many pipelines a worker keeps loaded (GPU_MODEL_CACHE)."""
    return int(gpu_config().get("MODEL_CACHE", DEFAULT_MODEL_CACHE))


# --- loading --------------------------------------------------------------------------------------


def torch_dtype(name: str, device: str) -> Any:
    """torch's dtype for a model's dtype on `device`: auto is float16 on CUDA, float32 on the CPU."""
    import torch

    if name in ("", "auto"):
        return torch.float16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


def load_pipeline(recipe: Recipe | ModelSpec, device: str) -> Any:
    """Load the recipe's pipeline onto `device`, with its dtype, scheduler and safety checker.
    Raises ModelError for anything about the model (files, config, scheduler); torch's own errors
    (out of memory moving it to the device) pass through."""
    if isinstance(recipe, ModelSpec):
        recipe = Recipe(recipe.value)
    spec = parse_model(recipe.source, what="the model source")
    if spec.kind == "simulated":
        raise ModelError(f"{recipe.source!r} is a simulated model: it has no pipeline to load")
    quiet()
    from diffusers import DiffusionPipeline

    dtype = torch_dtype(recipe.dtype, device)
    # A hub id comes from the local hub cache only: a worker never downloads in the middle of a job.
    source = str(tiny_model_dir()) if spec.kind == "tiny" else spec.value
    try:
        options: dict[str, Any] = {}
        if not recipe.safety_checker and _has_component(DiffusionPipeline, source, "safety_checker"):
            # Not even loaded (its weights would be dropped anyway); turned off on purpose.
            options.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=True, **options)
    except Exception as exc:  # missing files, unknown pipeline classes, bad configs alike
        raise ModelError(f"cannot load model {recipe.source!r}: {type(exc).__name__}: {exc}") from exc
    scheduler_swap(pipe, recipe.scheduler)
    if not recipe.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _has_component(pipeline_class: Any, source: str, name: str) -> bool:
    try:
        index = pipeline_class.load_config(source, local_files_only=True)
    except Exception:  # from_pretrained says what is wrong, in its own words
        return False
    entry = index.get(name)
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None


def scheduler_swap(pipe: Any, name: str) -> None:
    """Replace the pipeline's scheduler by diffusers' class `name`, from the same config; "" keeps it."""
    if not name:
        return
    import diffusers

    try:
        found = getattr(diffusers, name, None)
    except Exception:  # a scheduler whose optional dependency is missing
        found = None
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise ModelError(f"scheduler {name!r} is not a scheduler of diffusers {diffusers.__version__}.")
    if getattr(pipe, "scheduler", None) is None:
        raise ModelError(f"the pipeline {type(pipe).__name__} has no scheduler to replace with {name}.")
    scheduler_class: Any = found
    try:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    except Exception as exc:
        raise ModelError(f"scheduler {name} does not fit this pipeline: {type(exc).__name__}: {exc}") from exc


def weights_bytes(pipe: Any) -> int:
    """The bytes of the pipeline's weights and buffers (the CPU has no allocator to ask)."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        for tensors in (getattr(component, "parameters", None), getattr(component, "buffers", None)):
            if callable(tensors):
                total += sum(t.numel() * t.element_size() for t in tensors())
    return total


def _out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


# --- the cache --------------------------------------------------------------------------------------


@dataclass
class Cached:
    """One loaded pipeline (None for a simulated source) and the models that used it."""

    recipe: Recipe
    source: ModelSpec
    pipe: Any
    memory_bytes: int | None
    load_seconds: float
    models: dict[str, float] = field(default_factory=dict)  # model key -> when its use was last written


class PipelineCache:
    """The pipelines one device keeps loaded, the least recently used first out."""

    def __init__(self, target: Any, events: ModelEvents | None = None, *, capacity: int | None = None) -> None:
        self.target = target  # personas.imagegen.Target
        self.events = events or ModelEvents()
        self.capacity = capacity
        self.loads = 0
        self.evictions = 0
        self._entries: OrderedDict[Recipe, Cached] = OrderedDict()
        self._sizes: dict[Recipe, int] = {}  # memory each recipe held when last loaded here

    def get(self, spec: ImageSpec) -> Cached:
        """The spec's pipeline, loaded (timed, recorded) if this device does not hold it. A model that
        does not load raises ModelError, recorded as that model's failure on this device."""
        entry = self._entries.get(spec.recipe)
        if entry is None:
            try:
                entry = self._load(spec)
            except ModelError as exc:
                self.events.failed(spec.key, str(exc))
                raise
        self._entries.move_to_end(spec.recipe)
        now = time.monotonic()
        last = entry.models.get(spec.key)
        if last is None or now - last >= USE_RECORD_SECONDS:
            self.events.used(spec.key, entry.memory_bytes if last is None else None)
            entry.models[spec.key] = now
        return entry

    def adopt(self, spec: ImageSpec, pipe: Any) -> None:
        """Keep a pipeline built elsewhere as the spec's (tests and benchmarks: no load, no record)."""
        source = parse_model(spec.source)
        self._entries[spec.recipe] = Cached(spec.recipe, source, pipe, None, 0.0, {spec.key: time.monotonic()})

    def models(self) -> list[str]:
        """The model keys whose pipelines are loaded, the most recently used first."""
        return [key for entry in reversed(self._entries.values()) for key in entry.models]

    def evict_other(self, *, keep: Recipe, why: str) -> bool:
        """Evict the least recently used pipeline other than `keep`'s; False if there is none."""
        other = next((recipe for recipe in self._entries if recipe != keep), None)
        if other is None:
            return False
        self.evict(other, why=why)
        return True

    def evict(self, recipe: Recipe, *, why: str) -> int | None:
        """Drop the pipeline and give its memory back; returns the bytes freed, as measured."""
        entry = self._entries.pop(recipe)
        before = self._memory_now()
        entry.pipe = None  # the cache's reference: nothing else keeps a pipeline between calls
        if self.target.kind == "simulated":
            from gpuscheduler import simulated

            simulated.model_memory_drop(self.target.uuid, str(recipe))
        gc.collect()
        if self.target.kind == "cuda":
            import torch

            torch.cuda.empty_cache()
        after = self._memory_now()
        freed = before - after if before is not None and after is not None else entry.memory_bytes
        self.evictions += 1
        log.info("evicted %s from %s (%s): %s bytes freed", recipe, self.target.uuid, why, freed)
        for key in entry.models:
            self.events.evicted(key, freed, why)
        return freed

    # loading ----------------------------------------------------------------------------------------

    def _load(self, spec: ImageSpec) -> Cached:
        recipe = spec.recipe
        what = f"model {spec.name}: source" if spec.name != spec.source else "the model source"
        source = parse_model(spec.source, what=what)
        capacity = max(1, self.capacity or model_cache_size())
        while len(self._entries) >= capacity:
            self.evict(next(iter(self._entries)), why=f"least recently used, room made for {spec.name}")
        self._make_room(recipe, spec.name)
        while True:
            before = self._memory_now()
            started = time.perf_counter()
            try:
                pipe = self._build(recipe, source)
                break
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                message = str(exc).splitlines()[0]
            # Out of the handler: its traceback, and the half-moved pipeline it held, are gone.
            if not self._entries:
                raise ModelError(f"model {spec.name} does not fit on this device alone: {message}")
            self.evict(next(iter(self._entries)), why=f"out of memory loading {spec.name}")
        seconds = time.perf_counter() - started
        after = self._memory_now()
        memory = after - before if before is not None and after is not None else None
        if memory is None and pipe is not None:
            memory = weights_bytes(pipe)
        if memory is not None:
            self._sizes[recipe] = memory
        entry = Cached(recipe, source, pipe, memory, seconds, {spec.key: time.monotonic()})
        self._entries[recipe] = entry
        self.loads += 1
        log.info("loaded %s on %s in %.2f s (%s bytes)", recipe, self.target.uuid, seconds, memory)
        self.events.loaded(spec.key, seconds, memory)
        return entry

    def _build(self, recipe: Recipe, source: ModelSpec) -> Any:
        pipe = None
        if source.kind != "simulated":
            pipe = load_pipeline(recipe, self.target.torch_device)
            pipe = compiled.compile_unet(pipe) if compiled.compile_enabled() else pipe
        if self.target.kind == "simulated":
            from gpuscheduler import simulated

            time.sleep(float(simulated.faults(self.target.uuid).get("load_seconds", 0)))
            simulated.model_memory_add(self.target.uuid, str(recipe), SIMULATED_MODEL_BYTES)
        return pipe

    def _make_room(self, recipe: Recipe, name: str) -> None:
        """On CUDA, evict until the device's free memory holds the model as it was when last loaded here."""
        need = self._sizes.get(recipe)
        if self.target.kind != "cuda" or need is None:
            return
        import torch

        while self._entries:
            free, _ = torch.cuda.mem_get_info()
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # torch's own spare blocks
            if free >= need * FIT_MARGIN:
                return
            self.evict(next(iter(self._entries)), why=f"memory made for {name} ({need} bytes)")

    def _memory_now(self) -> int | None:
        """The memory the device's pipelines hold now: torch's allocator on CUDA, the simulated
        device's reading; None on the CPU."""
        if self.target.kind == "cuda":
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.memory_allocated())
        if self.target.kind == "simulated":
            from gpuscheduler import simulated

            return simulated.model_memory(self.target.uuid)
        return None
