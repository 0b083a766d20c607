"""Tiny updates survive bf16: stochastic rounding, master weights, and every preset.

The failure mode shown alongside: a bf16 weight at 1.0 updated at lr 2e-5 with plain
round-to-nearest never moves (each update is ~1/200 of bf16's spacing there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import PRESETS, TrainConfig, config_for, step_generator
from trainer.devices import dtype_named
from trainer.optim import OPTIMIZER_CLASSES, build_optimizer
from trainer.precision import StepRounding, stochastic_round_to_bf16

LR = 2e-5
STEPS = 200
SHAPE = (64, 64)
GRADIENT_MEAN = 1.0  # positive: the weights move down, by about STEPS * LR or more
NOISE_SEED = 11
BF16_SPACING_BELOW_ONE = 2.0**-8
DRAWS = 20_000
# Mean of 4096 stochastically rounded weights vs the fp32 run: rounding noise averages out.
REFERENCE_TOLERANCE = 0.05
MIN_MOVE = 0.5 * STEPS * LR
SEEDS = 20
NEAR_BF16_MAX_BITS = 0x7F7F7000  # just above bf16's maximum, rounds down to it by nearest
NEGATIVE_NAN_BITS = -1  # 0xFFFFFFFF: a NaN whose integer add would overflow int32


def _run(config: TrainConfig, dtype: torch.dtype) -> tuple[torch.nn.Parameter, dict]:
    """STEPS updates of a weight matrix at 1.0 with noisy positive gradients (seeded)."""
    param = torch.nn.Parameter(torch.ones(SHAPE, dtype=dtype))
    optimizer = build_optimizer([param], config)
    noise = torch.Generator().manual_seed(NOISE_SEED)
    for _ in range(STEPS):
        param.grad = (GRADIENT_MEAN + torch.randn(SHAPE, generator=noise)).to(dtype)
        optimizer.step()
    return param, optimizer.state[param]


def _config(preset: str, tmp_path: Path, **overrides: object) -> TrainConfig:
    """The preset at lr 2e-5 (paths are never touched)."""
    return config_for(
        preset,
        model="tiny",
        cache_dir=tmp_path,
        output_dir=tmp_path,
        learning_rate=LR,
        **overrides,
    )


def _effective_mean(param: torch.Tensor, state: dict) -> float:
    """Mean of the weights the optimizer keeps: the fp32 master when there is one."""
    weights = state["master"] if "master" in state else param.detach()
    return weights.float().mean().item()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tiny_update_survives_each_preset(preset: str, tmp_path: Path) -> None:
    """Each preset moves the weights as its optimizer does in pure fp32 (within 5%)."""
    config = _config(preset, tmp_path)
    param, state = _run(config, dtype_named(config.weights_dtype))
    reference_config = _config(
        preset,
        tmp_path,
        weights_dtype="fp32",
        master_weights=False,
        stochastic_rounding=False,
        optimizer_state_dtype="fp32",
    )
    reference, _ = _run(reference_config, torch.float32)
    moved = 1.0 - _effective_mean(param, state)
    expected = 1.0 - reference.detach().mean().item()
    assert expected >= MIN_MOVE
    assert moved == pytest.approx(expected, rel=REFERENCE_TOLERANCE)
    if config.master_weights:
        assert state["master"].dtype == torch.float32
        assert torch.equal(param.detach(), state["master"].to(param.dtype))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_to_nearest_bf16_does_not_move(preset: str, tmp_path: Path) -> None:
    """The failure mode: the same optimizer on bf16 weights without either remedy."""
    config = _config(preset, tmp_path)
    optimizer_class = OPTIMIZER_CLASSES[config.optimizer]
    param = torch.nn.Parameter(torch.ones(SHAPE, dtype=torch.bfloat16))
    optimizer = optimizer_class(
        [param], lr=LR, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    noise = torch.Generator().manual_seed(NOISE_SEED)
    for _ in range(STEPS):
        param.grad = (GRADIENT_MEAN + torch.randn(SHAPE, generator=noise)).bfloat16()
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(SHAPE, dtype=torch.bfloat16))


def test_config_refuses_bf16_weights_without_a_remedy(tmp_path: Path) -> None:
    """A configuration that would silently stop learning is an error, not a run."""
    with pytest.raises(ValueError, match="stochastic_rounding=True or master_weights=True"):
        _config("12gb", tmp_path, stochastic_rounding=False)


def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds() -> None:
    """1 + 0.3 spacing rounds to 1 or 1 + spacing, up ~30% of the time; the mean is exact."""
    spacing_above_one = 2.0**-7
    value = 1.0 + 0.3 * spacing_above_one
    values = torch.full((DRAWS,), value, dtype=torch.float32)
    rounded = stochastic_round_to_bf16(values, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + spacing_above_one}
    assert rounded.mean().item() == pytest.approx(value, abs=spacing_above_one * 0.01)
    negative = stochastic_round_to_bf16(-values, torch.Generator().manual_seed(0)).float()
    assert torch.equal(negative, -rounded)


def test_stochastic_rounding_is_reproducible_and_exact_on_bf16_values() -> None:
    """Same generator seed, same bits; values bf16 already holds come back unchanged."""
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    first = stochastic_round_to_bf16(values, step_generator(7, 5, "rounding"))
    again = stochastic_round_to_bf16(values, step_generator(7, 5, "rounding"))
    other = stochastic_round_to_bf16(values, step_generator(7, 6, "rounding"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    exact = values.bfloat16().float()
    assert torch.equal(stochastic_round_to_bf16(exact, torch.Generator()), exact.bfloat16())


def test_non_finite_values_round_as_a_cast_would() -> None:
    """inf, -inf and NaN (any payload) pass through; nothing near bf16's maximum overflows."""
    bf16_max = torch.finfo(torch.bfloat16).max
    near_max = torch.tensor([NEAR_BF16_MAX_BITS], dtype=torch.int32).view(torch.float32).item()
    negative_nan = torch.tensor([NEGATIVE_NAN_BITS], dtype=torch.int32).view(torch.float32).item()
    values = torch.tensor(
        [float("inf"), float("-inf"), float("nan"), negative_nan, bf16_max, near_max, -near_max]
    )
    expected = values.to(torch.bfloat16)
    assert expected[-2].item() == bf16_max  # a cast keeps it finite: so must rounding
    for seed in range(SEEDS):
        rounded = stochastic_round_to_bf16(values, torch.Generator().manual_seed(seed))
        assert torch.equal(rounded.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert torch.equal(rounded[finite], expected[finite])


def test_step_rounding_only_touches_bf16_targets() -> None:
    """fp32 targets get the exact value; disabled rounding is a plain cast."""
    values = torch.full((8,), 1.0 + 2.0**-12)
    exact = torch.zeros(8)
    StepRounding(0, 0, enabled=True).write(exact, values)
    assert torch.equal(exact, values)
    nearest = torch.zeros(8, dtype=torch.bfloat16)
    StepRounding(0, 0, enabled=False).write(nearest, values)
    assert torch.equal(nearest, values.bfloat16())


def test_bf16_spacing_below_one_is_what_the_tests_assume() -> None:
    """The premise: 1 - 2^-8 is the bf16 neighbour below 1.0, far above an lr-2e-5 step."""
    below = torch.nextafter(
        torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(0.0, dtype=torch.bfloat16)
    )
    assert 1.0 - below.item() == BF16_SPACING_BELOW_ONE
    assert LR < BF16_SPACING_BELOW_ONE / 2
