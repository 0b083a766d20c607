"""Optimizers, LR schedule and training config: exact state round trips and convergence."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from trainer.config import (
    OPTIMIZER_DEFAULTS,
    PRESETS,
    TrainConfig,
    config_for,
    step_generator,
)
from trainer.optim import (
    CAME,
    Adafactor,
    AdamW,
    PreciseOptimizer,
    build_optimizer,
    build_schedule,
)

SEED = 5
STEPS_BEFORE_SAVE = 3
STEPS_AFTER_LOAD = 3
QUADRATIC_STEPS = 300
QUADRATIC_LR = 1e-2
LOSS_DROP = 0.1  # the final loss must be below this share of the first one
WARMUP = 4
# Shapes covering every state layout: matrix, vector, 4-D conv kernel, a 2 x N table.
SHAPES = ((16, 8), (16,), (8, 4, 2, 2), (2, 8))

# (optimizer class, precision keywords, params dtype): every state layout and write path.
VARIANTS = {
    "came-bf16-stochastic": (
        CAME,
        {"stochastic_rounding": True, "state_dtype": torch.bfloat16},
        torch.bfloat16,
    ),
    "adafactor-bf16-stochastic": (
        Adafactor,
        {"stochastic_rounding": True, "state_dtype": torch.bfloat16},
        torch.bfloat16,
    ),
    "adamw-master": (AdamW, {"master_weights": True}, torch.bfloat16),
    "adamw-fp32": (AdamW, {}, torch.float32),
}


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Seeded parameters of every shape in SHAPES."""
    generator = torch.Generator().manual_seed(SEED)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES
    ]


def _copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Fresh parameters holding bitwise the same values."""
    return [torch.nn.Parameter(param.detach().clone()) for param in params]


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    """Gradients determined by the step number alone."""
    generator = step_generator(SEED, step, "test-grads")
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def _make(variant: str, params: list[torch.nn.Parameter]) -> PreciseOptimizer:
    """The variant's optimizer over ``params`` (weight decay on, to exercise it)."""
    optimizer_class, precision, _ = VARIANTS[variant]
    return optimizer_class(params, lr=1e-3, weight_decay=0.01, seed=SEED, **precision)


def _save_and_load(state: dict) -> dict:
    """Through torch.save and torch.load, as a checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_states_equal(first: dict, second: dict) -> None:
    """Two optimizer state dicts hold bitwise-equal tensors with equal dtypes."""
    assert first["step_index"] == second["step_index"]
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for index, values in first["state"].items():
        assert values.keys() == second["state"][index].keys()
        for key, value in values.items():
            other = second["state"][index][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype, key
                assert torch.equal(value, other), key
            else:
                assert value == other, key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_round_trips_bitwise(variant: str) -> None:
    """Step, save, load into a fresh optimizer on copied params, step both: identical."""
    params = _params(VARIANTS[variant][2])
    optimizer = _make(variant, params)
    for step in range(STEPS_BEFORE_SAVE):
        _set_grads(params, step)
        optimizer.step()
    saved = _save_and_load(optimizer.state_dict())
    resumed_params = _copy(params)
    resumed = _make(variant, resumed_params)
    resumed.load_state_dict(saved)
    _assert_states_equal(optimizer.state_dict(), resumed.state_dict())
    for step in range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_LOAD):
        for group in (params, resumed_params):
            _set_grads(group, step)
        optimizer.step()
        resumed.step()
    for param, resumed_param in zip(params, resumed_params, strict=True):
        assert torch.equal(param, resumed_param)
    _assert_states_equal(optimizer.state_dict(), resumed.state_dict())


def test_master_copy_keeps_its_dtype_through_load() -> None:
    """torch.optim's loader would cast the fp32 master to the bf16 param's dtype; ours not."""
    params = _params(torch.bfloat16)
    optimizer = _make("adamw-master", params)
    _set_grads(params, 0)
    optimizer.step()
    resumed = _make("adamw-master", _copy(params))
    resumed.load_state_dict(_save_and_load(optimizer.state_dict()))
    masters = [state["master"] for state in resumed.state.values()]
    assert masters and all(master.dtype == torch.float32 for master in masters)


def test_set_step_selects_the_rounding_bits() -> None:
    """Same state + same step -> same result; another step index -> other rounding."""
    results = []
    for step_index in (7, 7, 8):
        params = _params(torch.bfloat16)
        optimizer = _make("came-bf16-stochastic", params)
        optimizer.set_step(step_index)
        _set_grads(params, 0)
        optimizer.step()
        assert optimizer.step_index == step_index + 1
        results.append(torch.cat([param.detach().flatten().float() for param in params]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def _one_step(*, prepare: bool) -> tuple[list[torch.nn.Parameter], dict]:
    """One CAME step on fresh bf16 params, with or without prepare_state() first."""
    params = _params(torch.bfloat16)
    optimizer = _make("came-bf16-stochastic", params)
    if prepare:
        optimizer.prepare_state()
        assert len(optimizer.state) == len(params)
    _set_grads(params, 0)
    optimizer.step()
    return params, optimizer.state_dict()


def test_prepare_state_changes_no_result() -> None:
    """States created up front give bitwise the same step as states created by the step."""
    params, state = _one_step(prepare=False)
    prepared_params, prepared_state = _one_step(prepare=True)
    _assert_states_equal(state, prepared_state)
    for param, prepared in zip(params, prepared_params, strict=True):
        assert torch.equal(param, prepared)


def test_load_refuses_mismatched_groups() -> None:
    """A state for other parameters is an error, not a silent partial load."""
    params = _params(torch.float32)
    optimizer = _make("adamw-fp32", params)
    smaller = _make("adamw-fp32", _copy(params)[:2])
    with pytest.raises(ValueError, match="size differs"):
        smaller.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("optimizer_class", [CAME, Adafactor, AdamW])
def test_optimizers_reduce_a_quadratic_loss(optimizer_class: type[PreciseOptimizer]) -> None:
    """Least squares for a 16 x 8 matrix: the loss falls by at least 10x."""
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(64, 8, generator=generator)
    targets = inputs @ torch.randn(8, 16, generator=generator)
    weight = torch.nn.Parameter(torch.zeros(16, 8))
    bias = torch.nn.Parameter(torch.zeros(16))
    optimizer = optimizer_class([weight, bias], lr=QUADRATIC_LR)
    losses = []
    for _ in range(QUADRATIC_STEPS):
        optimizer.zero_grad()
        loss = ((inputs @ weight.T + bias - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < LOSS_DROP * losses[0]


def test_states_are_in_the_configured_dtype() -> None:
    """Full-size momentum in bf16, factored statistics fp32 (their EMAs need the bits)."""
    params = _params(torch.bfloat16)
    optimizer = _make("came-bf16-stochastic", params)
    _set_grads(params, 0)
    optimizer.step()
    matrix_state = optimizer.state[params[0]]
    assert matrix_state["exp_avg"].dtype == torch.bfloat16
    assert matrix_state["exp_avg_sq_row"].shape == (16,)
    assert matrix_state["exp_avg_sq_col"].shape == (8,)
    assert matrix_state["exp_avg_res_row"].dtype == torch.float32
    assert "exp_avg_res_row" not in optimizer.state[params[1]]  # 1-D: not factored


def _config(tmp_path: Path, preset: str = "12gb", **overrides: object) -> TrainConfig:
    """A config with throwaway paths."""
    return config_for(preset, model="tiny", cache_dir=tmp_path, output_dir=tmp_path, **overrides)


def test_build_optimizer_follows_the_config(tmp_path: Path) -> None:
    """12gb builds CAME with bf16 states and stochastic rounding; 24gb AdamW with masters."""
    twelve = build_optimizer(_params(torch.bfloat16), _config(tmp_path))
    assert isinstance(twelve, CAME)
    assert twelve.stochastic_rounding and twelve.state_dtype == torch.bfloat16
    assert twelve.param_groups[0]["betas"] == (0.9, 0.999, 0.9999)
    big = build_optimizer(_params(torch.bfloat16), _config(tmp_path, "24gb"))
    assert isinstance(big, AdamW) and big.master_weights


def test_adamw8bit_names_what_is_missing(tmp_path: Path) -> None:
    """Without bitsandbytes (or CUDA) the error says which piece is missing."""
    config = _config(
        tmp_path,
        optimizer="adamw8bit",
        weights_dtype="fp32",
        stochastic_rounding=False,
        optimizer_state_dtype="fp32",
    )
    with pytest.raises(ValueError, match=r"bitsandbytes|CUDA"):
        build_optimizer(_params(torch.float32), config)
    with pytest.raises(ValueError, match="adamw8bit"):
        _config(tmp_path, optimizer="adamw8bit")  # bf16 weights: would stop learning


def test_schedule_warms_up_linearly_and_round_trips(tmp_path: Path) -> None:
    """lr rises over warmup_steps optimizer steps, then stays; its state reloads."""
    params = _params(torch.float32)
    config = _config(tmp_path, "cpu-test", warmup_steps=WARMUP)
    optimizer = build_optimizer(params, config)
    schedule = build_schedule(optimizer, config)
    rates = []
    for step in range(WARMUP + 2):
        rates.append(optimizer.param_groups[0]["lr"])
        _set_grads(params, step)
        optimizer.step()
        schedule.step()
    peak = config.learning_rate
    assert rates == pytest.approx([peak * (n + 1) / WARMUP for n in range(WARMUP)] + [peak] * 2)
    fresh = build_schedule(build_optimizer(_copy(params), config), config)
    fresh.load_state_dict(_save_and_load(schedule.state_dict()))
    assert fresh.state_dict() == schedule.state_dict()


def test_config_json_round_trip_and_defaults(tmp_path: Path) -> None:
    """Every preset survives to_json -> json -> from_json; defaults are the 12gb bundle."""
    for preset in PRESETS:
        config = _config(tmp_path, preset)
        assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert TrainConfig(model="tiny", cache_dir=tmp_path, output_dir=tmp_path) == _config(tmp_path)
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_json({**_config(tmp_path).to_json(), "colour": "blue"})


def test_config_for_validates(tmp_path: Path) -> None:
    """Unknown presets list the valid ones; optimizer overrides bring their own betas."""
    with pytest.raises(ValueError, match="12gb"):
        config_for("8gb", model="tiny", cache_dir=tmp_path, output_dir=tmp_path)
    adafactor = _config(tmp_path, optimizer="adafactor")
    assert adafactor.betas == OPTIMIZER_DEFAULTS["adafactor"]["betas"]
    with pytest.raises(ValueError, match="takes 3 betas"):
        _config(tmp_path, betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="caption_dropout"):
        _config(tmp_path, caption_dropout=1.0)
    with pytest.raises(ValueError, match="master_weights"):
        _config(tmp_path, "cpu-test", master_weights=True)


def _draw(seed: int, step: int, purpose: str) -> list[float]:
    """Four uniform draws from the step generator of (seed, step, purpose)."""
    return torch.rand(4, generator=step_generator(seed, step, purpose)).tolist()


def test_step_generator_is_stable_and_separates_purposes() -> None:
    """Same (seed, step, purpose) -> same draws; any change -> different draws."""
    assert _draw(1, 2, "noise") == _draw(1, 2, "noise")
    keys = [(1, 2, "noise"), (1, 3, "noise"), (2, 2, "noise"), (1, 2, "rounding")]
    assert len({tuple(_draw(*key)) for key in keys}) == len(keys)
