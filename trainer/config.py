"""What a training run is told: one frozen TrainConfig, built from a named memory preset.

A preset is a documented bundle of the settings that decide whether a 1024 px step fits a
card and whether tiny updates survive bf16; anything else (paths, seed, schedule of
checkpoints) is given per run.  ``config_for("12gb", model=..., cache_dir=..., output_dir=...,
**overrides)`` starts from the bundle and applies overrides; the result is validated, and
``to_json()`` is the snapshot stored in every checkpoint (``from_json`` reads it back).

============  ==========================================  ==========================================
preset        what                                        why
============  ==========================================  ==========================================
``12gb``      bf16 weights updated with stochastic        ``bench/memory.py`` measures one 1024 px
(default)     rounding; gradient checkpointing; CAME as   step at 6.2 GB (weights 1.14 + grads 1.14
              PixArt-Sigma trains with it (lr 2e-5, wd    + CAME state 1.15 + activations ~2.6 GB
              0, betas 0.9/0.999/0.9999, eps 1e-30/       per sample): batch 2-3 fits a 12 GB card.
              1e-16, grad clip 0.01) with its momentum    bf16 rounded to nearest would drop every
              in bf16, also stochastically rounded, and   lr-2e-5 update; stochastic rounding keeps
              its factored statistics in fp32; batch 1    them in expectation with no fp32 copy.
              x accumulation 4; 100 warm-up steps.        fp32 momentum measures 7.4 GB (batch 2);
                                                          bf16 + rounding keeps its EMA unbiased.
``24gb``      bf16 weights with an fp32 master copy in    The classic mixed-precision recipe: the
              the optimizer (the bf16 weights are cast    master keeps every update exactly, AdamW
              from it), bf16 autocast, gradient           is the best-understood optimizer. Fixed
              checkpointing, AdamW (fp32 states, wd       9.1 GB (weights 1.14, master 2.28, grads
              0.01, grad clip 1.0), batch 4 x             1.14, AdamW 4.55) + 4 x ~2.6 GB of
              accumulation 1, 100 warm-up steps.          activations + 1 GB for CUDA: ~20 GB.
``cpu-test``  fp32 weights, AdamW (fp32 states), no       For tiny test models on a CPU: nothing to
              checkpointing, batch 2, lr 1e-4, no         reason about precision-wise, and an lr a
              warm-up.                                    2-layer model visibly learns with in a
                                                          few dozen steps.
============  ==========================================  ==========================================

Warm-up: PixArt-Sigma warms up over 1000 steps when training from scratch; a fine-tune starts
from trained weights, and CAME's update clipping already tames its first steps, so 100
optimizer steps (400 images at accumulation 4) suffice.  Grad clip 0.01 is PixArt-Sigma's:
CAME's update does not depend on the gradient's scale, so the clip only evens out how much
each step's batch counts.

Optimizer-specific ``betas`` and ``eps`` follow the optimizer: changing ``optimizer`` in an
override without giving ``betas``/``eps`` takes that optimizer's defaults
(:data:`OPTIMIZER_DEFAULTS`).  Configurations that would silently stop learning are refused:
bf16 weights need ``stochastic_rounding`` or ``master_weights``, and bitsandbytes' 8-bit AdamW
(which has no stochastic rounding) needs fp32 weights.

Every random choice of a step is drawn from :func:`step_generator` ``(seed, step, purpose)``
rather than the global RNG, so a run resumed at step ``n`` draws exactly what it would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_PRESET = "12gb"
WEIGHT_DTYPES = ("bf16", "fp32")
AUTOCAST_DTYPES = ("bf16", "fp16")
STATE_DTYPES = ("bf16", "fp32")
OPTIMIZERS = ("came", "adafactor", "adamw", "adamw8bit")

# Each optimizer's (betas, eps), with the lengths its update rule uses.
OPTIMIZER_DEFAULTS: dict[str, dict[str, tuple[float, ...]]] = {
    # Luo et al. 2023 and PixArt-Sigma's configs: update, square-gradient, instability EMAs.
    "came": {"betas": (0.9, 0.999, 0.9999), "eps": (1e-30, 1e-16)},
    # (momentum, cap on the 1 - t^-0.8 second-moment decay); eps regularises the squared grad.
    "adafactor": {"betas": (0.9, 0.999), "eps": (1e-30,)},
    "adamw": {"betas": (0.9, 0.999), "eps": (1e-8,)},
    "adamw8bit": {"betas": (0.9, 0.999), "eps": (1e-8,)},
}

# PixArt-Sigma fine-tunes with lr 2e-5 (its 1024 px config); presets may change it.
DEFAULT_LEARNING_RATE = 2e-5
PIXART_SIGMA_GRAD_CLIP = 0.01  # PixArt-Sigma's gradient_clip; CAME's update is scale-free
DEFAULT_WARMUP_STEPS = 100
SEED_BYTES = 8  # bytes of the sha256 digest that seed a step's generator (64 bits)

PRESETS: dict[str, dict[str, object]] = {
    "12gb": {
        "weights_dtype": "bf16",
        "autocast_dtype": None,
        "master_weights": False,
        "stochastic_rounding": True,
        "gradient_checkpointing": True,
        "optimizer": "came",
        "optimizer_state_dtype": "bf16",
        "learning_rate": DEFAULT_LEARNING_RATE,
        "weight_decay": 0.0,
        "batch_size": 1,
        "grad_accumulation": 4,
        "grad_clip": PIXART_SIGMA_GRAD_CLIP,
        "warmup_steps": DEFAULT_WARMUP_STEPS,
    },
    "24gb": {
        "weights_dtype": "bf16",
        "autocast_dtype": "bf16",
        "master_weights": True,
        "stochastic_rounding": False,
        "gradient_checkpointing": True,
        "optimizer": "adamw",
        "optimizer_state_dtype": "fp32",
        "learning_rate": DEFAULT_LEARNING_RATE,
        "weight_decay": 0.01,
        "batch_size": 4,
        "grad_accumulation": 1,
        "grad_clip": 1.0,
        "warmup_steps": DEFAULT_WARMUP_STEPS,
    },
    "cpu-test": {
        "weights_dtype": "fp32",
        "autocast_dtype": None,
        "master_weights": False,
        "stochastic_rounding": False,
        "gradient_checkpointing": False,
        "optimizer": "adamw",
        "optimizer_state_dtype": "fp32",
        "learning_rate": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 2,
        "grad_accumulation": 1,
        "grad_clip": 1.0,
        "warmup_steps": 0,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told; the defaults are the ``12gb`` preset's bundle."""

    model: str  # local PixArt-Sigma diffusers folder or Hugging Face id (transformer is used)
    cache_dir: Path  # the encode stage's cache (latents + caption embeddings)
    output_dir: Path  # checkpoints/, logs and samples of this run
    preset: str = DEFAULT_PRESET  # which bundle the memory settings came from (see PRESETS)
    device: str = "auto"  # "auto" (cuda, xpu, mps, cpu) or a device name such as "cuda:1"
    seed: int = 0  # seeds every step_generator: noise, timesteps, dropout, rounding
    weights_dtype: str = "bf16"  # dtype the transformer's parameters are held in
    autocast_dtype: str | None = None  # torch.autocast dtype for the forward, None = off
    master_weights: bool = False  # fp32 copy of bf16 weights in the optimizer state
    stochastic_rounding: bool = True  # round bf16 weights/states stochastically, not nearest
    gradient_checkpointing: bool = True  # recompute block activations in backward
    optimizer: str = "came"  # one of OPTIMIZERS
    optimizer_state_dtype: str = "bf16"  # full-size optimizer states (momentum) dtype
    learning_rate: float = DEFAULT_LEARNING_RATE  # peak lr after warm-up
    weight_decay: float = 0.0  # decoupled (AdamW-style) weight decay
    betas: tuple[float, ...] = OPTIMIZER_DEFAULTS["came"]["betas"]  # per optimizer
    eps: tuple[float, ...] = OPTIMIZER_DEFAULTS["came"]["eps"]  # per optimizer
    batch_size: int = 1  # samples per forward/backward (one bucket)
    grad_accumulation: int = 4  # micro-batches summed per optimizer step
    grad_clip: float | None = PIXART_SIGMA_GRAD_CLIP  # max global grad norm, None = off
    warmup_steps: int = DEFAULT_WARMUP_STEPS  # optimizer steps of linear lr warm-up
    caption_dropout: float = 0.1  # share of captions replaced by the empty caption
    min_snr_gamma: float | None = None  # min-SNR loss weighting gamma, None = plain MSE
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    keep_last: int = 3  # newest checkpoints kept (besides milestones)
    milestone_every: int = 5000  # checkpoints at multiples of this are kept forever, 0 = none
    ema_decay: float | None = None  # EMA of the weights, None = no EMA
    log_every: int = 10  # optimizer steps per log line
    tensorboard: bool = False  # also write TensorBoard event files (the tensorboard extra)
    device_watts: float | None = None  # power draw for the energy estimate; None: read it
    energy_price_per_kwh: float | None = None  # electricity price, for the cost estimate

    def __post_init__(self) -> None:
        """Normalise paths and tuples (as read from JSON) and refuse inconsistent settings."""
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        _check_choices(self)
        _check_precision(self)
        _check_optimizer(self)
        _check_numbers(self)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready snapshot (paths as strings, tuples as lists)."""
        snapshot: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            snapshot[field.name] = value
        return snapshot

    @classmethod
    def from_json(cls, snapshot: dict[str, Any]) -> TrainConfig:
        """The config a :meth:`to_json` snapshot describes; ValueError for unknown keys."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(snapshot) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}: known are {sorted(known)}")
        return cls(**snapshot)


def _one_of(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """ValueError naming the setting and its allowed values unless value is one of them."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid: use one of {list(allowed)}")


def _check_choices(config: TrainConfig) -> None:
    """Names that must come from a fixed list."""
    _one_of("preset", config.preset, tuple(PRESETS))
    _one_of("weights_dtype", config.weights_dtype, WEIGHT_DTYPES)
    _one_of("autocast_dtype", config.autocast_dtype, (None, *AUTOCAST_DTYPES))
    _one_of("optimizer_state_dtype", config.optimizer_state_dtype, STATE_DTYPES)
    _one_of("optimizer", config.optimizer, OPTIMIZERS)


def _check_precision(config: TrainConfig) -> None:
    """Refuse precision settings that lose updates or waste memory for nothing."""
    bf16_weights = config.weights_dtype == "bf16"
    if bf16_weights and not (config.stochastic_rounding or config.master_weights):
        raise ValueError(
            "bf16 weights rounded to nearest lose most updates at small learning rates: "
            "set stochastic_rounding=True or master_weights=True (or weights_dtype='fp32')"
        )
    if config.master_weights and not bf16_weights:
        raise ValueError(
            "master_weights keeps an fp32 copy of bf16 weights; with fp32 weights "
            "it only doubles their memory: set master_weights=False"
        )
    if config.optimizer == "adamw8bit" and bf16_weights:
        raise ValueError(
            "adamw8bit (bitsandbytes) updates the weights itself without stochastic rounding "
            "or master weights, so bf16 weights would stop learning: use weights_dtype='fp32' "
            "or optimizer 'came'/'adafactor'"
        )


def _check_optimizer(config: TrainConfig) -> None:
    """betas/eps must have the lengths the chosen optimizer's update rule uses."""
    defaults = OPTIMIZER_DEFAULTS[config.optimizer]
    for name in ("betas", "eps"):
        value = getattr(config, name)
        if len(value) != len(defaults[name]):
            raise ValueError(
                f"{config.optimizer} takes {len(defaults[name])} {name} "
                f"(e.g. {defaults[name]}), got {value}"
            )
    if not all(0.0 <= beta < 1.0 for beta in config.betas):
        raise ValueError(f"betas must lie in [0, 1), got {config.betas}")
    if not all(eps > 0.0 for eps in config.eps):
        raise ValueError(f"eps must be positive, got {config.eps}")


def _check_numbers(config: TrainConfig) -> None:
    """Counts, rates and probabilities within their ranges."""
    at_least_one = ("batch_size", "grad_accumulation", "checkpoint_every", "keep_last", "log_every")
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "milestone_every", "weight_decay"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {config.learning_rate}")
    if not 0.0 <= config.caption_dropout < 1.0:
        raise ValueError(f"caption_dropout must lie in [0, 1), got {config.caption_dropout}")
    for name in ("grad_clip", "min_snr_gamma", "device_watts", "energy_price_per_kwh"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive or None, got {value}")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {config.ema_decay}")


def config_for(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's bundle with ``overrides`` applied (model, cache_dir, output_dir needed).

    Overriding ``optimizer`` without ``betas``/``eps`` takes the new optimizer's defaults.
    ValueError names the valid presets, or the unknown setting.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {list(PRESETS)}")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}: known are {sorted(known)}")
    settings: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    optimizer = overrides.get("optimizer", settings["optimizer"])
    settings.update(OPTIMIZER_DEFAULTS.get(optimizer, {}))  # unknown: refused below
    settings.update(overrides)
    return TrainConfig(**settings)


def step_generator(
    seed: int, step: int, purpose: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on ``device`` seeded from sha256(seed, step, purpose).

    The same triple gives the same stream in any process on any machine, and different
    purposes ("noise", "timesteps", "dropout", "rounding") give independent streams, so no
    training randomness depends on what ran before: resuming at a step redraws it exactly.
    """
    digest = hashlib.sha256(f"darkroom:{seed}:{step}:{purpose}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:SEED_BYTES], "little"))
    return generator
