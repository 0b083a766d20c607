"""Sampling with the tiny PixArt-Sigma: our loop against diffusers' pipeline, seeds, checkpoint
swaps, the global RNG, the size check, checkpoint specs and PNG metadata.

Renders are real 1024 x 1024 images (the tiny VAE decodes one in about two seconds on one
CPU thread) with few steps: the number of steps changes nothing these tests look at.
Checkpoints are written by trainer.checkpoints.save_checkpoint from the tiny transformer with
its weights moved, so they differ from the base model the way a trained one does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from PIL import Image

from tests.tiny_models import DIT_IN_CHANNELS, DIT_LAYERS, tiny_transformer
from trainer.checkpoints import CheckpointError, TrainingState, save_checkpoint
from trainer.model import TRANSFORMER_SUBFOLDER
from trainer.sampling import (
    Conditioning,
    PipelineOptions,
    Sampler,
    SampleSettings,
    read_png_text,
    resolve_checkpoint,
    sample_metadata,
    save_png,
)

STEPS = 2  # enough for a multistep solver to use its history
FAST = SampleSettings(steps=STEPS)
PROMPT = "a tabby cat asleep on the kitchen table by a sunlit window"
WEIGHT_NUDGE = 0.05  # how far a "trained" checkpoint's weights move from the base model's
VAE_DOWNSCALE = 8  # the tiny VAE's 4 blocks, as the real one
BF16_TOLERANCE = 0.1  # bf16 latents may differ from fp32 by this fraction of their range


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons (conftest)


@pytest.fixture(scope="module")
def fp32_sampler(tiny_pixart: Path) -> Iterator[Sampler]:
    """One fp32 sampler for the module: loading and closing cost more than a test."""
    with Sampler(PipelineOptions(model=str(tiny_pixart), device="cpu", dtype="fp32")) as loaded:
        yield loaded


@pytest.fixture
def sampler(fp32_sampler: Sampler) -> Iterator[Sampler]:
    """The module's sampler, back on the base weights after each test."""
    yield fp32_sampler
    fp32_sampler.use_checkpoint(None, 0)


def write_checkpoint(
    output_dir: Path,
    step: int,
    transformer: PixArtTransformer2DModel,
) -> Path:
    state = TrainingState(
        step=step, optimizer={}, schedule={}, sampler={}, ema=None, rng={}, cache_generation=0
    )
    return save_checkpoint(
        output_dir, step, transformer, state, {}, keep_last=10, milestone_every=0
    )


def nudged_transformer(tiny_pixart: Path, *, seed: int) -> PixArtTransformer2DModel:
    """The tiny transformer, in bf16 as a 12 GB training run keeps it, with moved weights."""
    transformer = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart, subfolder=TRANSFORMER_SUBFOLDER, dtype=torch.bfloat16
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(WEIGHT_NUDGE * noise.to(parameter.dtype))
    return transformer


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- the loop ------------------------------------------------------------------------------


def test_denoise_computes_what_the_diffusers_pipeline_does(sampler: Sampler) -> None:
    cond = sampler.encode_prompt(PROMPT, FAST.negative)
    seen: list[tuple[int, torch.Tensor]] = []
    ours = sampler.denoise(cond, FAST, on_step=lambda index, x: seen.append((index, x.clone())))
    theirs = sampler.pipeline(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=cond.prompt_embeds,
        prompt_attention_mask=cond.prompt_mask,
        negative_prompt_embeds=cond.negative_embeds,
        negative_prompt_attention_mask=cond.negative_mask,
        num_inference_steps=FAST.steps,
        guidance_scale=FAST.guidance,
        width=FAST.width,
        height=FAST.height,
        generator=torch.Generator("cpu").manual_seed(FAST.seed),
        use_resolution_binning=False,
        output_type="latent",
    ).images
    latent_size = (FAST.height // VAE_DOWNSCALE, FAST.width // VAE_DOWNSCALE)
    assert ours.shape == (1, DIT_IN_CHANNELS, *latent_size)
    assert torch.equal(ours, theirs)
    assert [index for index, _ in seen] == list(range(STEPS))
    assert torch.equal(seen[-1][1], ours)


def test_prompts_are_encoded_as_the_training_cache_encodes_captions(sampler: Sampler) -> None:
    cond = sampler.encode_prompt("A Tabby Cat", "")
    lower = sampler.encode_prompt("a tabby cat", "")
    # Unlike the pipeline's encode_prompt, no lower-casing: case reaches T5 as in training.
    assert not torch.equal(cond.prompt_embeds, lower.prompt_embeds)
    # Padded to one length (the longer of the two) with a mask, as a training batch is.
    assert cond.prompt_embeds.shape == cond.negative_embeds.shape
    assert int(cond.negative_mask.sum()) == 1  # "" is EOS alone
    assert int(cond.prompt_mask.sum()) == cond.prompt_mask.shape[1]
    assert cond.prompt_embeds.dtype == torch.bfloat16  # the cache's dtype


def test_render_depends_on_the_seed_alone_and_leaves_the_global_rng(sampler: Sampler) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first, second = sampler.render(PROMPT, FAST, count=2, bar=False)
    assert torch.equal(torch.get_rng_state(), before)
    again = sampler.render(PROMPT, SampleSettings(steps=STEPS, seed=FAST.seed + 1), bar=False)
    assert first.size == (FAST.width, FAST.height) and first.mode == "RGB"
    assert np.array_equal(pixels(second), pixels(again[0]))  # image 2 of count=2 is seed + 1
    assert not np.array_equal(pixels(first), pixels(second))


def test_guidance_one_runs_the_prompt_alone(sampler: Sampler) -> None:
    cond = sampler.encode_prompt(PROMPT, FAST.negative)
    calls: list[int] = []
    handle = sampler.transformer.register_forward_pre_hook(
        lambda _module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True
    )
    try:
        sampler.denoise(cond, SampleSettings(steps=STEPS, guidance=1.0))
        sampler.denoise(cond, FAST)
    finally:
        handle.remove()
    assert calls == [1] * STEPS + [2] * STEPS  # rows per transformer call


def test_bf16_sampling_stays_close_to_fp32(tiny_pixart: Path, sampler: Sampler) -> None:
    reference = sampler.denoise(sampler.encode_prompt(PROMPT, FAST.negative), FAST)
    options = PipelineOptions(model=str(tiny_pixart), device="cpu", dtype="bf16")
    with Sampler(options) as half:
        latents = half.denoise(half.encode_prompt(PROMPT, FAST.negative), FAST)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    spread = float(reference.abs().max())
    assert float((latents - reference).abs().max()) < BF16_TOLERANCE * spread


def test_a_size_outside_the_buckets_is_refused(sampler: Sampler) -> None:
    small = SampleSettings(steps=STEPS, width=512, height=512)
    with pytest.raises(ValueError, match=r"512x512 is not a size .* 1024x1024, 1152x896"):
        small.check()
    with pytest.raises(ValueError, match="512x512"):
        sampler.render(PROMPT, small, bar=False)
    with pytest.raises(ValueError, match="steps"):
        SampleSettings(steps=0).check()
    SampleSettings(width=832, height=1216).check()  # a portrait bucket


def test_describe() -> None:
    assert SampleSettings().describe() == "30 steps, guidance 4.5, seed 42, 1024×1024"


# --- checkpoints ---------------------------------------------------------------------------


def test_use_checkpoint_swaps_the_weights_and_back(
    tiny_pixart: Path, sampler: Sampler, tmp_path: Path
) -> None:
    path = write_checkpoint(tmp_path, 500, nudged_transformer(tiny_pixart, seed=1))
    cond = sampler.encode_prompt(PROMPT, FAST.negative)
    base = sampler.denoise(cond, FAST)
    assert (sampler.step, sampler.label) == (0, "base")

    sampler.use_checkpoint(path, 500)  # bf16 weights, cast into the fp32 sampler
    assert (sampler.step, sampler.label) == (500, "step 500")
    trained = sampler.denoise(cond, FAST)
    assert not torch.equal(trained, base)
    sampler.use_checkpoint(path, 500)  # already there: nothing changes
    assert torch.equal(sampler.denoise(cond, FAST), trained)

    sampler.use_checkpoint(None, 0)
    assert sampler.label == "base"
    assert torch.equal(sampler.denoise(cond, FAST), base)


def test_a_checkpoint_of_another_model_is_refused_untouched(
    tiny_pixart: Path, sampler: Sampler, tmp_path: Path
) -> None:
    other = tiny_transformer(layers=DIT_LAYERS + 1)
    path = write_checkpoint(tmp_path, 500, other)
    before = {name: tensor.clone() for name, tensor in sampler.transformer.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit"):
        sampler.use_checkpoint(path, 500)
    assert sampler.step == 0
    after = sampler.transformer.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="base model"):
        sampler.use_checkpoint(None, 500)


def test_resolve_checkpoint(tiny_pixart: Path, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match=r"available: base$"):
        resolve_checkpoint(tmp_path, "latest")
    transformer = nudged_transformer(tiny_pixart, seed=2)
    first = write_checkpoint(tmp_path, 500, transformer)
    second = write_checkpoint(tmp_path, 1000, transformer)

    assert resolve_checkpoint(tmp_path, "base") == (0, None)
    assert resolve_checkpoint(tmp_path, " Latest ") == (1000, second)
    assert resolve_checkpoint(tmp_path, "500") == (500, first)
    assert resolve_checkpoint(tmp_path, "step-00000500") == (500, first)
    for unknown in ("700", "step-7", "yesterday", ""):
        with pytest.raises(LookupError, match="available: base, latest, 500, 1000"):
            resolve_checkpoint(tmp_path, unknown)

    weights = next((first / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1])  # a truncated file: the manifest says so
    with pytest.raises(LookupError, match="checkpoint 500 is not usable"):
        resolve_checkpoint(tmp_path, "500")


# --- PNG files -----------------------------------------------------------------------------


def test_png_metadata_round_trip(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (200, 120, 40))
    prompt = "café at dawn — long shadows 🌅"  # Latin-1 and beyond
    metadata = sample_metadata(
        prompt, FAST, seed=FAST.seed + 1, checkpoint="step 500", model="tiny"
    )
    path = save_png(image, tmp_path / "render.png", metadata)

    assert read_png_text(path) == metadata
    assert metadata["prompt"] == prompt and metadata["seed"] == "43"
    assert metadata["software"].startswith("darkroom")
    with Image.open(path) as saved:
        assert np.array_equal(pixels(saved), pixels(image))
    assert [p.name for p in tmp_path.iterdir()] == ["render.png"]  # no temp file left


def test_conditioning_batches_negative_first() -> None:
    ones, zeros = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    mask = torch.ones(1, 3, dtype=torch.long)
    cond = Conditioning(ones, mask, zeros, mask)
    text, batch_mask = cond.batch(guided=True)
    assert torch.equal(text, torch.cat([zeros, ones])) and batch_mask.shape == (2, 3)
    assert cond.batch(guided=False)[0] is ones
