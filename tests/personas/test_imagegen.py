"""The diffusers adapter: model names, the tiny pipeline saved and reloaded, seeds, OOM splitting."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from PIL import Image

from gpuscheduler import simulated
from personas.imagegen import (
    TINY_MODEL_VERSION,
    AttemptLost,
    Generator,
    ModelError,
    OutOfMemory,
    Target,
    build_tiny_pipeline,
    parse_model,
    placeholder_image,
    tiny_model_dir,
)
from personas.pipelines import ImageSpec

PROMPT = "portrait of a Victorian mathematician, oil painting"
CPU = Target(kind="cpu")
SIM_UUID = "SIM-imagegen-test"


def make(generator: Generator, seeds: list[int], model: str = "tiny", **extra: Any) -> Any:
    return generator.generate(
        model=model, prompt=PROMPT, negative_prompt="blurry", seeds=seeds, steps=2, guidance=7.5, **extra
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as the worker processes of the test suite run: on this 2-core machine,
    with other tests' processes busy, two spinning OpenMP threads made each call 5-10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built_tiny_model(tmp_path_factory) -> Path:
    """The tiny model, built once for this module by the same code a worker uses."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    with override_settings(DATA_DIR=data_dir):
        return tiny_model_dir()


@pytest.fixture(scope="module")
def warm(built_tiny_model) -> Generator:
    """A CPU generator with the tiny pipeline loaded, shared by the tests that need no fresh one."""
    generator = Generator(CPU)
    with override_settings(DATA_DIR=built_tiny_model.parent.parent):
        generator.warm("tiny")
    return generator


@pytest.fixture
def tiny(built_tiny_model, data_dir) -> Path:
    """This test's DATA_DIR holds the already built tiny model."""
    models = data_dir / "models"
    models.mkdir()
    (models / TINY_MODEL_VERSION).symlink_to(built_tiny_model, target_is_directory=True)
    return models / TINY_MODEL_VERSION


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


# --- parse_model ----------------------------------------------------------------------------------


def test_parse_model_accepts_tiny():
    assert (parse_model("tiny").kind, parse_model(" tiny ").value) == ("tiny", "tiny")


@pytest.mark.parametrize(
    ("text", "seconds"), [("simulated:0", 0.0), ("simulated:0.25", 0.25), ("simulated:3600", 3600.0)]
)
def test_parse_model_accepts_simulated_seconds(text, seconds):
    spec = parse_model(text)
    assert (spec.kind, spec.seconds) == ("simulated", seconds)


def test_parse_model_accepts_an_absolute_diffusers_directory(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    spec = parse_model(str(tmp_path))
    assert (spec.kind, spec.value) == ("local", str(tmp_path.resolve()))


@pytest.mark.parametrize("hub_id", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "owner/model_v2.1"])
def test_parse_model_accepts_a_hub_id(hub_id):
    assert (parse_model(hub_id).kind, parse_model(hub_id).value) == ("hub", hub_id)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "SAMPLES_MODEL is empty: use 'tiny', a local diffusers directory or a hub id."),
        ("   ", "SAMPLES_MODEL is empty"),
        ("simulated:", "the seconds after 'simulated:' must be a number from 0 to 3600"),
        ("simulated:fast", "the seconds after 'simulated:' must be a number from 0 to 3600"),
        ("simulated:-1", "the seconds after 'simulated:' must be a number from 0 to 3600"),
        ("simulated:3601", "the seconds after 'simulated:' must be a number from 0 to 3600"),
        ("simulated:nan", "the seconds after 'simulated:' must be a number from 0 to 3600"),
        ("/no/such/model", "is not a diffusers directory (no model_index.json)"),
        ("./relative/model", "is not a diffusers directory (no model_index.json)"),
        ("a/b/c", "is neither 'tiny', 'simulated:SECONDS', 'simulated-h100:SECONDS', an absolute path"),
        ("not a model!", "is neither 'tiny'"),
        ("owner/mod el", "is neither 'tiny'"),
        ("TINY", "is neither 'tiny'"),
    ],
)
def test_parse_model_refuses_bad_values_with_a_clear_message(text, message):
    with pytest.raises(ModelError) as error:
        parse_model(text)
    assert message in str(error.value)


def test_parse_model_refuses_a_directory_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="point it at a folder saved with save_pretrained"):
        parse_model(str(tmp_path))


# --- placeholder images -------------------------------------------------------------------------


def test_placeholder_images_are_deterministic_per_seed():
    first, again, other = placeholder_image(42), placeholder_image(42), placeholder_image(43)
    assert first.png == again.png
    assert first.png != other.png
    assert (first.seed, first.width, first.height) == (42, 64, 64)
    with Image.open(io.BytesIO(first.png)) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))


# --- the tiny pipeline ------------------------------------------------------------------------------


def test_the_tiny_model_is_saved_as_a_diffusers_directory(built_tiny_model):
    assert built_tiny_model.name == TINY_MODEL_VERSION
    assert (built_tiny_model / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (built_tiny_model / part).is_dir(), part
    assert not [p for p in built_tiny_model.parent.iterdir() if ".building-" in p.name]
    assert parse_model(str(built_tiny_model)).kind == "local"


def test_the_tiny_model_is_built_only_once(built_tiny_model, monkeypatch):
    def no_second_build() -> Any:
        raise AssertionError("the tiny model was built again")

    monkeypatch.setattr("personas.tiny_model.build_tiny_pipeline", no_second_build)
    with override_settings(DATA_DIR=built_tiny_model.parent.parent):
        assert tiny_model_dir() == built_tiny_model


def test_the_same_seed_gives_the_same_image_across_calls_and_fresh_generators(tiny):
    generator = Generator(CPU)
    first = make(generator, [11, 12])
    again = make(generator, [11, 12])
    fresh = make(Generator(CPU), [11, 12])

    assert [i.seed for i in first.images] == [11, 12]
    assert [i.png for i in first.images] == [i.png for i in again.images] == [i.png for i in fresh.images]
    assert first.calls == 1, "both images in one pipeline call"
    assert generator.loads == 1, "the pipeline stays loaded between calls"
    assert all((i.width, i.height) == (64, 64) for i in first.images)


def test_different_seeds_give_different_images(warm):
    result = make(warm, [11, 12, 13])
    assert len({pixels(i.png) for i in result.images}) == 3


def test_an_image_does_not_depend_on_the_other_seeds_of_its_call(warm):
    alone = make(warm, [12]).images[0]
    together = make(warm, [11, 12]).images[1]
    assert together.seed == 12
    # Each image has its own generator; batching may change the arithmetic by a rounding step.
    difference = max(abs(a - b) for a, b in zip(pixels(alone.png), pixels(together.png), strict=True))
    assert difference <= 2


def test_the_reloaded_model_makes_the_images_the_in_memory_pipeline_makes(warm):
    reloaded = make(warm, [21, 22])
    in_memory = Generator(CPU)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    in_memory.cache.adopt(ImageSpec.of("tiny"), pipe.to("cpu"))

    built = make(in_memory, [21, 22])

    assert in_memory.loads == 0
    import torch

    loaded = warm.pipeline("tiny")
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{part}: a weight changed on the way to disk"
    # The same weights and seeds; the CPU kernels may round the last bit differently between two
    # pipeline objects (seen with transformers 5.24), so one level of 255 is allowed.
    for made, again in zip(built.images, reloaded.images, strict=True):
        assert max(abs(a - b) for a, b in zip(pixels(made.png), pixels(again.png), strict=True)) <= 1


def test_the_tiny_model_can_be_named_by_its_directory(warm, built_tiny_model):
    by_name = make(warm, [5])
    by_path = make(Generator(CPU), [5], model=str(built_tiny_model))
    assert by_name.images[0].png == by_path.images[0].png


def test_an_abandoned_attempt_stops_the_pipeline_between_steps(warm):
    with pytest.raises(AttemptLost):
        make(warm, [1], alive=lambda: False)


@pytest.mark.parametrize(
    ("model_index", "message"),
    [
        ("{not json", "is not a valid JSON file"),
        ('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}', "config.json"),
    ],
)
def test_a_directory_that_is_not_a_loadable_pipeline_is_a_model_error(tmp_path, model_index, message):
    (tmp_path / "model_index.json").write_text(model_index)
    with pytest.raises(ModelError) as error:
        make(Generator(CPU), [1], model=str(tmp_path))
    assert str(error.value).startswith(f"cannot load model '{tmp_path}'")
    assert message in str(error.value)


# --- out of memory -------------------------------------------------------------------------------


@pytest.fixture
def sim_target():
    yield Target(kind="simulated", uuid=SIM_UUID)
    simulated.clear_faults(SIM_UUID)


def test_an_oom_splits_the_call_down_to_one_image_and_keeps_every_image_simulated_model(sim_target):
    simulated.set_faults(SIM_UUID, oom_above_batch=1)

    result = make(Generator(sim_target), [1, 2, 3, 4], model="simulated:0")

    assert [i.seed for i in result.images] == [1, 2, 3, 4]
    assert [i.png for i in result.images] == [placeholder_image(s).png for s in (1, 2, 3, 4)]
    assert result.calls == 4
    assert result.notes[0].startswith("out of memory at 4 images per call; retrying at 2")
    assert result.notes[-1].startswith("out of memory at 2 images per call; retrying at 1")


def test_an_oom_splits_the_call_with_the_tiny_model(warm, sim_target):
    simulated.set_faults(SIM_UUID, oom_above_batch=1)
    generator = Generator(sim_target)
    generator.cache.adopt(ImageSpec.of("tiny"), warm.pipeline("tiny"))  # loading is tested above; save the time

    result = make(generator, [31, 32])

    assert [i.seed for i in result.images] == [31, 32]
    assert result.calls == 2
    assert len(result.notes) == 1
    assert result.notes[0].startswith("out of memory at 2 images per call; retrying at 1")
    assert "limit 1" in result.notes[0]
    expected = make(warm, [31])
    assert pixels(result.images[0].png) == pixels(expected.images[0].png)


def test_a_torch_oom_inside_the_pipeline_call_is_translated_and_split(warm):
    import torch

    generator = Generator(CPU)
    real = warm.pipeline("tiny")
    sizes: list[int] = []

    class SmallGpu:
        def __call__(self, **kwargs: Any) -> Any:
            sizes.append(kwargs["num_images_per_prompt"])
            if kwargs["num_images_per_prompt"] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            return real(**kwargs)

    generator.cache.adopt(ImageSpec.of("tiny"), SmallGpu())

    result = make(generator, [1, 2, 3])

    assert sizes == [3, 1, 1, 1]
    assert [i.seed for i in result.images] == [1, 2, 3]
    assert result.notes == [
        "out of memory at 3 images per call; retrying at 1 (CUDA out of memory. Tried to allocate 2.00 GiB)"
    ]


def test_an_oom_at_one_image_per_call_is_raised(sim_target):
    simulated.set_faults(SIM_UUID, oom_above_batch=0)
    with pytest.raises(OutOfMemory, match="out of memory even for one image per call"):
        make(Generator(sim_target), [1, 2], model="simulated:0")


def test_a_simulated_failure_is_raised(sim_target):
    simulated.set_faults(SIM_UUID, fail="driver reset")
    with pytest.raises(RuntimeError, match="simulated failure: driver reset"):
        make(Generator(sim_target), [1], model="simulated:0")


def test_a_simulated_call_reports_its_load_while_it_runs(sim_target):
    seen: list[int] = []

    def alive() -> bool:
        seen.append(simulated.read_state()[SIM_UUID]["busy"])
        return True

    make(Generator(sim_target), [1, 2], model="simulated:0.1", alive=alive)

    assert seen and all(busy == 1 for busy in seen)
    assert simulated.read_state()[SIM_UUID]["busy"] == 0


def test_an_abandoned_simulated_attempt_stops(sim_target):
    with pytest.raises(AttemptLost):
        make(Generator(sim_target), [1], model="simulated:5", alive=lambda: False)


# --- SAMPLES_COMPILE: calls padded to fixed buckets ---------------------------------------------


def test_compiled_calls_are_padded_to_their_bucket_and_the_extras_dropped(warm, settings, monkeypatch):
    """torch.compile itself stands aside here (a CPU compile of even the tiny UNet takes minutes);
    what is checked is what SAMPLES_COMPILE changes around it: the call's shape and its images."""
    from personas import compiled

    plain = make(warm, [31, 32, 33])
    settings.SAMPLES = {**settings.SAMPLES, "COMPILE": True, "COMPILE_BUCKETS": [2, 4, 8]}
    sizes: list[int] = []
    pipe = warm.pipeline("tiny")
    original = pipe.__class__.__call__

    def spy(self, *args, **kwargs):
        sizes.append(len(kwargs["generator"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipe.__class__, "__call__", spy)
    padded = make(warm, [31, 32, 33])

    assert sizes == [4], "3 images run as a call of the 4-image bucket"
    assert [i.seed for i in padded.images] == [31, 32, 33]
    assert [t.images for t in padded.timings] == [3], "the curve learns from the images asked for"
    for a, b in zip(plain.images, padded.images, strict=True):
        assert max(abs(x - y) for x, y in zip(pixels(a.png), pixels(b.png), strict=True)) <= 2
    assert compiled.bucket_for(9, [2, 4, 8]) == 9, "a call above every bucket keeps its size"
    assert compiled.bucket_for(1, [2, 4, 8]) == 2


def test_loading_with_compile_on_compiles_the_unet(built_tiny_model, settings, monkeypatch):
    import torch

    compiled_modules = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled_modules.append(options) or module)
    settings.SAMPLES = {**settings.SAMPLES, "COMPILE": True, "COMPILE_BUCKETS": [1]}
    generator = Generator(CPU)
    with override_settings(DATA_DIR=built_tiny_model.parent.parent):
        generator.warm("tiny")
    assert compiled_modules == [{"fullgraph": True, "dynamic": False}]
