"""The studio's instruments on the tiny PixArt-Sigma: attention maps, block change, previews,
layer subsets, token strength, prompt blending and nearest tokens.

Renders are 1024 x 1024 with few steps in fp32 on one thread, so "equal" below is bitwise
or within float rounding of the sum of the same numbers in another order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import DIT_LAYERS
from trainer.attention import MAP_SIDE
from trainer.introspect import (
    Blend,
    Inspector,
    InspectRequest,
    InspectResult,
    Strength,
)
from trainer.sampling import Conditioning, PipelineOptions, Sampler, SampleSettings

STEPS = 3
FAST = SampleSettings(steps=STEPS)
PROMPT = "a golden sunset over the harbour"
OTHER = "a blue night in a snowy forest"
PIXEL_TOLERANCE = 1  # 8-bit levels: the same latents summed in another order
CHANGED = 4 * PIXEL_TOLERANCE  # 8-bit levels somewhere in the image: a real change
PROB_TOLERANCE = 5e-3  # float16 maps of probabilities that sum to 1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inspector(tiny_pixart: Path) -> Iterator[Inspector]:
    """One fp32 sampler for the module, wrapped by the inspector."""
    with Sampler(PipelineOptions(model=str(tiny_pixart), device="cpu", dtype="fp32")) as sampler:
        yield Inspector(sampler)


@pytest.fixture(scope="module")
def plain(inspector: Inspector) -> InspectResult:
    """The prompt inspected with nothing changed."""
    return inspector.run(InspectRequest(PROMPT, FAST))


def pixels(image: object) -> np.ndarray:
    """An image as signed ints, for differences."""
    return np.asarray(image, dtype=np.int16)


def assert_same_image(a: object, b: object) -> None:
    """Two renders equal within float rounding."""
    assert np.abs(pixels(a) - pixels(b)).max() <= PIXEL_TOLERANCE


def assert_different_image(a: object, b: object) -> None:
    """Two renders apart by more than rounding (the tiny random model changes little)."""
    assert np.abs(pixels(a) - pixels(b)).max() > CHANGED


def test_the_instruments_do_not_change_the_render(
    inspector: Inspector, plain: InspectResult
) -> None:
    """Recording attention and previews leaves the image exactly as Sampler.render makes it,
    and the model is left as it was (its own processors, no hooks, all blocks)."""
    (rendered,) = inspector.sampler.render(PROMPT, FAST, bar=False)
    assert_same_image(plain.image, rendered)
    transformer = inspector.sampler.transformer
    assert len(transformer.transformer_blocks) == DIT_LAYERS
    for block in transformer.transformer_blocks:
        assert type(block.attn2.processor).__module__.startswith("diffusers")
        assert not block._forward_hooks


def test_one_map_per_token_and_they_sum_to_one(inspector: Inspector, plain: InspectResult) -> None:
    """Every token has a map per step and block; at every cell the tokens' shares add up to
    1 (the softmax over the prompt's real tokens), and the maps are not all alike."""
    tokens = inspector.tokens(PROMPT)
    assert [t.index for t in plain.tokens] == list(range(len(tokens)))
    assert plain.tokens[-1].special and not plain.tokens[0].special  # EOS last
    assert plain.attention.shape == (STEPS, DIT_LAYERS, len(tokens), MAP_SIDE, MAP_SIDE)
    assert plain.captured.all()
    total = plain.attention.astype(np.float32).sum(axis=2)
    np.testing.assert_allclose(total, 1.0, atol=PROB_TOLERANCE)
    maps = [plain.heatmap(t) for t in range(len(tokens))]
    np.testing.assert_allclose(sum(maps), 1.0, atol=PROB_TOLERANCE)
    assert all(m.min() >= 0 for m in maps)
    assert np.ptp([m.mean() for m in maps]) > 0  # tokens draw different shares
    assert np.ptp(maps[0]) > 0  # and a token's share varies over the image


def test_one_step_and_one_block_pick_their_slice(plain: InspectResult) -> None:
    """``step`` and ``block`` choose one slice; the default is the mean over all."""
    one = plain.heatmap(1, step=2, block=1)
    np.testing.assert_allclose(one, plain.attention[2, 1, 1].astype(np.float32))
    np.testing.assert_allclose(
        plain.heatmap(1), plain.attention[:, :, 1].astype(np.float32).mean(axis=(0, 1)), rtol=1e-5
    )
    for bad in ({"step": STEPS}, {"block": DIT_LAYERS}):
        with pytest.raises(ValueError, match=r"step|block"):
            plain.heatmap(0, **bad)
    with pytest.raises(ValueError, match="token must be in"):
        plain.heatmap(len(plain.tokens))


def test_block_change_is_recorded_per_block_and_step(plain: InspectResult) -> None:
    """Each block changes its input by a finite, positive relative amount at each step."""
    assert plain.block_change.shape == (STEPS, DIT_LAYERS)
    assert np.isfinite(plain.block_change).all()
    assert (plain.block_change > 0).all()


def test_previews_show_the_predicted_clean_image(
    inspector: Inspector, plain: InspectResult
) -> None:
    """One small preview per step, each a different guess; the solver's last step lands on
    its clean-image prediction, so the last preview is the final latents at preview size."""
    assert len(plain.previews) == STEPS
    assert all(p.size == (256, 256) for p in plain.previews)
    sampler = inspector.sampler
    final = sampler.denoise(sampler.encode_prompt(PROMPT, FAST.negative), FAST)
    shrink = final.shape[-1] // (256 // sampler.pipeline.vae_scale_factor)
    (expected,) = sampler.decode(torch.nn.functional.avg_pool2d(final, shrink))
    assert np.abs(pixels(plain.previews[-1]) - pixels(expected)).mean() < PIXEL_TOLERANCE
    assert_different_image(plain.previews[0], plain.previews[-1])


def test_a_layer_subset_skips_the_other_blocks(inspector: Inspector, plain: InspectResult) -> None:
    """With only block 0, block 1 records nothing and the image changes."""
    result = inspector.run(InspectRequest(PROMPT, FAST, blocks=(0,)))
    assert result.blocks == (0,)
    assert (
        np.isnan(result.block_change[:, 1]).all() and np.isfinite(result.block_change[:, 0]).all()
    )
    assert result.attention.shape[1] == 1
    assert_different_image(result.image, plain.image)
    with pytest.raises(ValueError, match="did not run"):
        result.heatmap(0, block=1)
    assert len(inspector.sampler.transformer.transformer_blocks) == DIT_LAYERS


def test_strength_zero_equals_removing_the_token(
    inspector: Inspector, plain: InspectResult
) -> None:
    """0× renders exactly what masking the token out of the cross-attention renders; 1×
    is the plain render; 3× moves the image; the token's attention share follows."""
    index = 1
    sampler = inspector.sampler
    cond = sampler.encode_prompt(PROMPT, FAST.negative)
    mask = cond.prompt_mask.clone()
    mask[0, index] = 0
    removed = Conditioning(cond.prompt_embeds, mask, cond.negative_embeds, cond.negative_mask)
    (without,) = sampler.decode(sampler.denoise(removed, FAST))
    zero = inspector.run(InspectRequest(PROMPT, FAST, strength=Strength(index, 0.0)))
    assert_same_image(zero.image, without)
    assert_different_image(zero.image, plain.image)
    assert zero.heatmap(index).max() < 1e-3
    one = inspector.run(InspectRequest(PROMPT, FAST, strength=Strength(index, 1.0)))
    assert_same_image(one.image, plain.image)
    three = inspector.run(InspectRequest(PROMPT, FAST, strength=Strength(index, 3.0)))
    assert_different_image(three.image, plain.image)
    assert three.heatmap(index).mean() > plain.heatmap(index).mean()


def test_blending_switches_prompts_at_the_step(inspector: Inspector, plain: InspectResult) -> None:
    """Switch at 0 is the second prompt throughout, at the last step the first prompt;
    attention is recorded for the first prompt's steps only."""
    (second,) = inspector.sampler.render(OTHER, FAST, bar=False)
    at_start = inspector.run(InspectRequest(PROMPT, FAST, blend=Blend(OTHER, 0)))
    assert_same_image(at_start.image, second)
    assert not at_start.captured.any()
    at_end = inspector.run(InspectRequest(PROMPT, FAST, blend=Blend(OTHER, STEPS)))
    assert_same_image(at_end.image, plain.image)
    middle = inspector.run(InspectRequest(PROMPT, FAST, blend=Blend(OTHER, 1)))
    assert middle.captured.tolist() == [True, False, False]
    # Step 0 saw the first prompt, so its guess is the plain run's; the tiny model's first
    # step decides most of the image, so the result is far from the second prompt's.
    assert_same_image(middle.previews[0], plain.previews[0])
    assert_different_image(middle.image, second)
    with pytest.raises(ValueError, match="no recorded attention"):
        middle.heatmap(0, step=2)


def test_requests_that_cannot_work_are_refused(inspector: Inspector) -> None:
    """Out-of-range blocks, strengths and switch steps name what is wrong."""
    cases = {
        "blocks must be in": InspectRequest(PROMPT, FAST, blocks=(0, DIT_LAYERS)),
        "without repeats": InspectRequest(PROMPT, FAST, blocks=(1, 0)),
        "strength token": InspectRequest(PROMPT, FAST, strength=Strength(99, 1.0)),
        "strength must be in": InspectRequest(PROMPT, FAST, strength=Strength(0, 3.5)),
        "switch step": InspectRequest(PROMPT, FAST, blend=Blend(OTHER, STEPS + 1)),
        "steps must be": InspectRequest(PROMPT, replace(FAST, steps=0)),
    }
    for message, request in cases.items():
        with pytest.raises(ValueError, match=message):
            inspector.run(request)


def test_nearest_tokens_by_cosine_similarity(inspector: Inspector) -> None:
    """Suggestions are the most similar rows of T5's embedding table, best first, without
    the token itself or special tokens; substituting one rewrites the prompt."""
    token = inspector.tokens(PROMPT)[1]
    nearest = inspector.nearest_tokens(token.token_id, k=5)
    assert len(nearest) == 5
    similarities = [s for _, s in nearest]
    assert similarities == sorted(similarities, reverse=True)
    table = inspector.sampler.pipeline.text_encoder.get_input_embeddings().weight.detach().float()
    cosine = torch.nn.functional.cosine_similarity(table, table[token.token_id][None], dim=1)
    tokenizer = inspector.sampler.pipeline.tokenizer
    cosine[[token.token_id, *tokenizer.all_special_ids]] = -2
    cosine = cosine[: len(tokenizer)]
    assert nearest[0][0] == int(cosine.argmax())
    assert nearest[0][1] == pytest.approx(float(cosine.max()), abs=1e-5)
    ids = {i for i, _ in nearest}
    assert token.token_id not in ids and not ids & set(tokenizer.all_special_ids)
    replaced = inspector.substitute(inspector.tokens(PROMPT), 1, nearest[0][0])
    assert inspector.tokens(replaced)[1].token_id == nearest[0][0]
    with pytest.raises(ValueError, match="token id"):
        inspector.nearest_tokens(len(tokenizer) + 5)
