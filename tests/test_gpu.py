"""Real-GPU checks (marker `gpu`): skipped where NVML finds no GPU; run them on a GPU machine with
`pytest -m gpu`. They run the same Generator code a gpuworker runs, in this process."""

from __future__ import annotations

import pytest

from personas.imagegen import Generator, ModelSpec, Target

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sd15_generator(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from personas.imagegen import build_sd15_shaped_pipeline

    directory = tmp_path_factory.mktemp("sd15")
    build_sd15_shaped_pipeline().save_pretrained(directory)
    generator = Generator(Target(kind="cuda", uuid="gpu0"))
    generator.pipeline(ModelSpec("local", str(directory)))
    generator.model = str(directory)
    return generator


def _generate(generator: Generator, images: int, steps: int = 5) -> object:
    return generator.generate(
        model=generator.model,
        prompt="portrait, studio light",
        negative_prompt="",
        seeds=list(range(images)),
        steps=steps,
        guidance=7.5,
    )


def test_a_real_out_of_memory_error_splits_the_call_and_gives_the_memory_back(sd15_generator):
    import torch

    _generate(sd15_generator, 1)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # Room for the weights and a call of 2 images (about 1.5 GiB each at 512 px), not one of 8.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (baseline + 3.5 * 1024**3) / total))
    try:
        result = _generate(sd15_generator, 8)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(result.images) == 8
    assert result.calls > 1 and any("out of memory" in note for note in result.notes)
    sd15_generator.free_memory()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + 16 * 1024**2


def test_a_hundred_real_jobs_keep_reserved_memory_flat(sd15_generator):
    import torch

    for _ in range(10):  # warm-up: the allocator settles on its pools
        _generate(sd15_generator, 4)
    reserved = torch.cuda.memory_reserved()
    for _ in range(100):
        _generate(sd15_generator, 4)
    assert torch.cuda.memory_reserved() <= reserved * 1.01
