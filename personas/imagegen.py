"""The diffusers adapter and the per-process pipeline cache.

This is the only module that imports torch and diffusers, and only inside functions: the web
process imports it for nothing but the torch-free names (OutOfMemory, parse_model) and never
creates a CUDA context. A worker keeps one Generator for its device; pipelines load once per
worker and model and stay warm for every later job.

SAMPLES_MODEL values:
- ``tiny`` (default): a random-weight StableDiffusionPipeline built in code (no downloads),
  saved once under DATA_DIR/models and from then on loaded with from_pretrained like a real one;
- a local diffusers directory (loaded with local_files_only=True);
- a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (needs network access);
- ``simulated:SECONDS``: no diffusion; each image takes SECONDS / device speed and is a
  deterministic placeholder PNG drawn from its seed (for scheduling tests and benchmarks);
- ``simulated-h100:SECONDS``: the same, but a call's time follows the H100's measured curve
  (shared/notes/gpu-measurements.md): a call of 1 image takes SECONDS / speed, calls of 4, 8 and
  16 take 1.02x, 1.20x and 2.32x that, with a few percent of noise (for the batching work).

Every pipeline call is timed (the call alone, not loading the model or encoding the PNGs) and
returned in GenerationResult.timings; the worker records them and the scheduler learns each
device's cost curve from them (gpuscheduler/costs.py). A simulated device's speed stays here.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import io
import itertools
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from django.conf import settings

from gpuscheduler.curves import Timing
from personas import compiled

log = logging.getLogger(__name__)

TINY_MODEL_VERSION = "tiny-sd-v1"


class OutOfMemory(Exception):
    """The device ran out of memory for a pipeline call (translated from torch's error)."""


class AttemptLost(Exception):
    """The attempt's lease was taken away mid-run: stop, its images would be dropped anyway."""


class ModelError(Exception):
    """SAMPLES_MODEL cannot be loaded; the message says why and what to set instead."""


class ModelDirectoryMissing(ModelError):
    """SAMPLES_MODEL names a local directory that holds no diffusers model on this host."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "tiny", "local", "hub" or "simulated"
    value: str
    seconds: float = 0.0
    curve: str = "linear"  # simulated models: "linear" (simulated:) or "h100" (simulated-h100:)


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


SIMULATED_PREFIXES = {"simulated:": "linear", "simulated-h100:": "h100"}


def parse_model(text: str) -> ModelSpec:
    """Validate a SAMPLES_MODEL value without importing torch."""
    text = text.strip()
    if not text:
        raise ModelError("SAMPLES_MODEL is empty: use 'tiny', a local diffusers directory or a hub id.")
    if text == "tiny":
        return ModelSpec("tiny", text)
    for prefix, curve in SIMULATED_PREFIXES.items():
        if text.startswith(prefix):
            try:
                seconds = float(text.split(":", 1)[1]) if text.isascii() else -1
            except ValueError:
                seconds = -1
            if not 0 <= seconds <= 3600:
                raise ModelError(
                    f"SAMPLES_MODEL={text!r}: the seconds after {prefix!r} must be a number from 0 to 3600."
                )
            return ModelSpec("simulated", text, seconds, curve)
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith("."):
        if not (path / "model_index.json").is_file():
            raise ModelDirectoryMissing(
                f"SAMPLES_MODEL={text!r} is not a diffusers directory (no model_index.json): "
                "point it at a folder saved with save_pretrained()."
            )
        return ModelSpec("local", str(path.resolve()))
    if text.count("/") == 1 and all(
        part.replace("-", "").replace("_", "").replace(".", "").isalnum() for part in text.split("/")
    ):
        return ModelSpec("hub", text)
    raise ModelError(
        f"SAMPLES_MODEL={text!r} is neither 'tiny', 'simulated:SECONDS', 'simulated-h100:SECONDS', an absolute "
        "path to a diffusers directory nor a hub id like 'owner/model'."
    )


@dataclass(frozen=True)
class GeneratedImage:
    seed: int
    png: bytes
    width: int
    height: int


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
    """Makes images on one device, keeping each model's pipeline loaded between jobs."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._pipelines: dict[str, Any] = {}
        self.loads = 0

    def generate(
        self,
        *,
        model: str,
        steps: int,
        guidance: float,
        prompt: str = "",
        negative_prompt: str = "",
        seeds: Sequence[int] = (),
        items: Sequence[Prompt] | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> GenerationResult:
        """Make one image per seed (all from `prompt`), or one per item of `items` (each with its own
        prompt, negative prompt and seed: images of several requests batched into one call), in as
        few pipeline calls as memory allows (normally one). Every call is timed."""
        spec = parse_model(model)
        result = GenerationResult(images=[])
        pending = list(items) if items is not None else [Prompt(int(s), prompt, negative_prompt) for s in seeds]
        limit = len(pending)
        while pending:
            batch = pending[:limit]
            try:
                with self._device_busy(len(batch)):
                    self._apply_faults(len(batch), spec)
                    started = time.perf_counter()
                    if spec.kind == "simulated":
                        images = self._simulated_call(spec, batch, alive)
                    elif compiled.compile_enabled():
                        # A compiled UNet runs fixed shapes: pad the call to its bucket, drop the extras.
                        size = compiled.bucket_for(len(batch), compiled.buckets())
                        full = compiled.padded(batch, size)
                        images = self._pipeline_call(spec, full, steps, guidance, alive, result)[: len(batch)]
                    else:
                        images = self._pipeline_call(spec, batch, steps, guidance, alive, result)
                    seconds = time.perf_counter() - started - result.encode_seconds
                    result.encode_seconds = 0.0
            except OutOfMemory as exc:
                self.free_memory()
                if limit == 1:
                    raise OutOfMemory(f"out of memory even for one image per call: {exc}") from exc
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

    def warm(self, model: str) -> None:
        """Load the model now, at worker start, rather than in the first job."""
        spec = parse_model(model)
        if self.target.kind == "simulated":
            from gpuscheduler import simulated

            time.sleep(float(simulated.faults(self.target.uuid).get("load_seconds", 0)))
        if spec.kind != "simulated":
            self.pipeline(spec)
            if compiled.compile_enabled():
                # Compile each call-size bucket now, not in a request's first call of that size.
                for size in compiled.buckets():
                    started = time.monotonic()
                    self.generate(model=model, steps=2, guidance=1.0, prompt="warm-up", seeds=list(range(size)))
                    log.info("compiled for calls of %d in %.1f s", size, time.monotonic() - started)

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

    # --- diffusers --------------------------------------------------------------------------

    def pipeline(self, spec: ModelSpec) -> Any:
        key = spec.value
        if key not in self._pipelines:
            started = time.monotonic()
            pipe = load_pipeline(spec, self.target.torch_device)
            self._pipelines[key] = compiled.compile_unet(pipe) if compiled.compile_enabled() else pipe
            self.loads += 1
            log.info("loaded %s on %s in %.2f s", key, self.target.torch_device, time.monotonic() - started)
            if self.target.kind == "simulated":
                from gpuscheduler import simulated

                simulated.set_model_memory(self.target.uuid, 2 * 1024**3)
        return self._pipelines[key]

    def _pipeline_call(
        self,
        spec: ModelSpec,
        batch: Sequence[Prompt],
        steps: int,
        guidance: float,
        alive: Callable[[], bool],
        result: GenerationResult,
    ) -> list[GeneratedImage]:
        import torch

        pipe = self.pipeline(spec)
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
    buffer = io.BytesIO()
    # Level 1: PNG stays lossless, and encoding 8 images of 512 px takes a fraction of the
    # default level's time, time during which the GPU would otherwise sit idle.
    image.save(buffer, format="PNG", compress_level=1)
    return GeneratedImage(seed=int(seed), png=buffer.getvalue(), width=image.width, height=image.height)


_encoder_pool: ThreadPoolExecutor | None = None


def encode_all(images: Sequence[Any], seeds: Sequence[int]) -> list[GeneratedImage]:
    """Encode a batch's PNGs in parallel threads (zlib releases the GIL)."""
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


# --- loading --------------------------------------------------------------------------------


def _quiet() -> None:
    """No progress bars or advice in worker logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(spec: ModelSpec, device: str) -> Any:
    """Load a StableDiffusion-style pipeline onto `device`: fp16 on CUDA, fp32 on the CPU."""
    _quiet()
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    if spec.kind == "tiny":
        source, local = str(tiny_model_dir()), True
    elif spec.kind == "local":
        source, local = spec.value, True
    else:
        source, local = spec.value, False
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local)
    except Exception as exc:  # missing files, unknown pipeline classes, bad configs alike
        raise ModelError(f"cannot load model {spec.value!r}: {type(exc).__name__}: {exc}") from exc
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_model_dir() -> Path:
    """Build the tiny random-weight pipeline once per DATA_DIR (under a lock) and return its folder."""
    root = Path(settings.DATA_DIR) / "models"
    target = root / TINY_MODEL_VERSION
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{TINY_MODEL_VERSION}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").is_file():
            building = root / f".{TINY_MODEL_VERSION}.building-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            build_tiny_pipeline().save_pretrained(building)
            os.replace(building, target)
            log.info("built the tiny model in %s", target)
    return target


def build_tiny_pipeline() -> Any:
    """A StableDiffusionPipeline with random weights at diffusers' own test sizes (64x64 images)."""
    _quiet()
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    # An in-memory byte-level vocabulary: no tokenizer files to download.
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(vocab),
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def build_sd15_shaped_pipeline() -> Any:
    """A Stable Diffusion 1.5-shaped pipeline with random weights (860 M-parameter UNet, 512 px),
    built on the GPU where there is one, in fp16 there: for GPU benchmarks and checks offline."""
    _quiet()
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = build_tiny_pipeline()  # reuse its in-memory byte-level tokenizer
    tokenizer = tiny.tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=cast(Any, unet).half() if device == "cuda" else unet,
        vae=cast(Any, vae).half() if device == "cuda" else vae,
        text_encoder=text_encoder.half() if device == "cuda" else text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
