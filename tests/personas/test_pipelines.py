"""Loading a pipeline from a model's spec: dtype, scheduler, safety checker, size, steps and guidance;
and which specs share a pipeline. On the CPU with the tiny model (no GPU, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from personas.imagegen import Generator, ModelError, Target
from personas.pipelines import ImageSpec, Recipe, load_pipeline, torch_dtype
from personas.tiny_model import build_tiny_pipeline, tiny_model_dir

CPU = Target(kind="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model's folder, built once for this module: loaded as a local diffusers folder."""
    with override_settings(DATA_DIR=tmp_path_factory.mktemp("tiny-data")):
        return tiny_model_dir()


@pytest.fixture(scope="module")
def checked_dir(tmp_path_factory) -> Path:
    """The tiny model with a (tiny, random) safety checker and its feature extractor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config=small, vision_config={**small, "image_size": 32, "patch_size": 4}, projection_dim=32
    )
    tiny = build_tiny_pipeline()
    parts = {k: v for k, v in tiny.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = StableDiffusionPipeline(
        **parts,
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        requires_safety_checker=True,
    )
    folder = tmp_path_factory.mktemp("checked")
    pipe.save_pretrained(folder)
    return folder


def spec(source: str | Path, **fields: Any) -> ImageSpec:
    return ImageSpec.of({"name": "m", "key": f"m@{sorted(fields.items())}", "source": str(source), **fields})


# --- what a spec says ------------------------------------------------------------------------------


def test_a_spec_is_read_from_the_request_record():
    recorded = {
        "name": "portrait",
        "source": "tiny",
        "dtype": "bfloat16",
        "width": 96,
        "height": None,
        "scheduler": "DDIMScheduler",
        "safety_checker": True,
        "steps": 12,
        "guidance_scale": 5.0,
        "key": "portrait@0123abcd",
    }
    made = ImageSpec.of(recorded)
    assert (made.key, made.name, made.steps, made.guidance_scale, made.size) == (
        "portrait@0123abcd",
        "portrait",
        12,
        5.0,
        {"width": 96},
    )
    assert made.recipe == Recipe("tiny", "bfloat16", "DDIMScheduler", True)


def test_a_bare_source_is_a_model_of_its_own_size_and_scheduler_without_a_safety_checker():
    made = ImageSpec.of(" tiny ")
    assert (made.key, made.source, made.size, made.recipe) == ("tiny", "tiny", {}, Recipe("tiny"))


def test_models_that_differ_only_in_size_steps_or_guidance_share_a_recipe():
    small = spec("tiny", width=64, steps=2, guidance_scale=1.0)
    large = spec("tiny", width=128, height=128, steps=30, guidance_scale=9.0)
    assert small.key != large.key
    assert small.recipe == large.recipe
    assert spec("tiny", scheduler="DDIMScheduler").recipe != small.recipe


# --- dtype -------------------------------------------------------------------------------------------


def test_auto_dtype_is_float16_on_cuda_and_float32_on_the_cpu():
    import torch

    assert torch_dtype("auto", "cuda") is torch.float16
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("bfloat16", "cpu") is torch.bfloat16
    assert torch_dtype("float32", "cuda") is torch.float32
    with pytest.raises(ModelError, match="dtype 'int8' is not one of auto, float16, bfloat16, float32"):
        torch_dtype("int8", "cpu")


def test_the_pipeline_is_loaded_in_the_dtype_the_spec_names(tiny_dir):
    import torch

    assert load_pipeline(Recipe(str(tiny_dir)), "cpu").unet.dtype == torch.float32
    assert load_pipeline(Recipe(str(tiny_dir), dtype="bfloat16"), "cpu").unet.dtype == torch.bfloat16


# --- scheduler ---------------------------------------------------------------------------------------


def test_a_scheduler_named_by_the_spec_replaces_the_models_own_with_the_same_config(tiny_dir):
    own = load_pipeline(Recipe(str(tiny_dir)), "cpu").scheduler
    swapped = load_pipeline(Recipe(str(tiny_dir), scheduler="DDIMScheduler"), "cpu").scheduler
    assert (type(own).__name__, type(swapped).__name__) == ("EulerDiscreteScheduler", "DDIMScheduler")
    for name in ("beta_start", "beta_end", "beta_schedule", "steps_offset"):
        assert swapped.config[name] == own.config[name], name


@pytest.mark.parametrize("name", ["NoSuchScheduler", "StableDiffusionPipeline", "UNet2DConditionModel"])
def test_a_name_that_is_not_a_diffusers_scheduler_is_a_model_error(tiny_dir, name):
    with pytest.raises(ModelError, match=f"scheduler '{name}' is not a scheduler of diffusers"):
        load_pipeline(Recipe(str(tiny_dir), scheduler=name), "cpu")


def test_images_are_made_with_the_swapped_scheduler(tiny_dir):
    from diffusers import DDIMScheduler

    generator = Generator(CPU)
    seen: list[str] = []
    original = DDIMScheduler.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(self).__name__)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DDIMScheduler, "step", step)
        result = generator.generate(model=spec(tiny_dir, scheduler="DDIMScheduler", steps=2), seeds=[1])
    assert len(result.images) == 1
    assert seen == ["DDIMScheduler"] * 2


# --- safety checker ----------------------------------------------------------------------------------


def test_the_safety_checker_is_kept_when_the_spec_says_on_and_left_out_when_off(checked_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    on = load_pipeline(Recipe(str(checked_dir), safety_checker=True), "cpu")
    off = load_pipeline(Recipe(str(checked_dir), safety_checker=False), "cpu")
    assert isinstance(on.safety_checker, StableDiffusionSafetyChecker)
    assert off.safety_checker is None
    ran: list[bool] = []
    original = StableDiffusionSafetyChecker.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append(True)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionSafetyChecker, "forward", forward)
        Generator(CPU).generate(model=spec(checked_dir, safety_checker=True, steps=1), seeds=[1])
        assert ran == [True], "the checker looked at the image"
        Generator(CPU).generate(model=spec(checked_dir, safety_checker=False, steps=1), seeds=[1])
        assert ran == [True], "no checker ran"


def test_a_model_without_a_safety_checker_loads_with_it_on(tiny_dir):
    assert load_pipeline(Recipe(str(tiny_dir), safety_checker=True), "cpu").safety_checker is None


# --- size, steps and guidance --------------------------------------------------------------------------


def test_the_specs_width_and_height_size_the_images(tiny_dir):
    result = Generator(CPU).generate(model=spec(tiny_dir, width=96, height=128, steps=1), seeds=[3, 4])
    assert {(image.width, image.height) for image in result.images} == {(96, 128)}
    assert (result.timings[0].width, result.timings[0].height) == (96, 128)


class RecordingPipe:
    """Stands in for a pipeline: records the options of each call and returns blank images."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **options: Any) -> Any:
        from types import SimpleNamespace

        from PIL import Image

        self.calls.append(options)
        count = len(options["generator"])
        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in range(count)])


def test_steps_and_guidance_come_from_the_spec_unless_the_call_names_them():
    generator = Generator(CPU)
    model = spec("tiny", steps=7, guidance_scale=3.5)
    pipe = RecordingPipe()
    generator.cache.adopt(model, pipe)

    generator.generate(model=model, seeds=[1])
    generator.generate(model=model, seeds=[1], steps=1, guidance=1.0)  # a canary, a calibration

    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in pipe.calls] == [(7, 3.5), (1, 1.0)]
    assert "width" not in pipe.calls[0], "no size given: the pipeline's own"


def test_a_key_the_generator_was_given_names_that_model_again():
    generator = Generator(CPU)
    model = spec("tiny", steps=7, guidance_scale=3.5)
    pipe = RecordingPipe()
    generator.cache.adopt(model, pipe)
    generator.generate(model=model, seeds=[1])

    generator.generate(model=model.key, seeds=[2])  # calibration names the default model by its key

    assert [c["num_inference_steps"] for c in pipe.calls] == [7, 7]
    assert generator.warm_models() == [model.key]


def test_a_hub_id_is_loaded_from_the_local_cache_only(monkeypatch):
    from diffusers import DiffusionPipeline

    asked: list[object] = []
    for name in ("from_pretrained", "load_config"):
        real = getattr(DiffusionPipeline, name)

        def spy(*args: Any, real: Any = real, **kwargs: Any) -> Any:
            asked.append(kwargs.get("local_files_only"))
            return real(*args, **kwargs)

        monkeypatch.setattr(DiffusionPipeline, name, spy)

    with pytest.raises(ModelError, match="cannot load model 'nobody/no-such-model': LocalEntryNotFoundError"):
        load_pipeline(Recipe("nobody/no-such-model"), "cpu")
    assert asked and set(asked) == {True}, "a worker never downloads a model"
