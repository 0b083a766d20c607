"""darkroom's own small optimizers, so that precision is under our control.

AdamW, Adafactor and CAME share one base (:class:`PreciseOptimizer`): per parameter the
update is computed in fp32 from an fp32 view of the weights, the gradient and the states,
then written back:

* into an fp32 **master** copy kept in the optimizer state (``master_weights=True``), from
  which the (bf16) model parameter is refreshed by a plain cast; or
* straight into the parameter, **stochastically rounded** when it is bf16 and
  ``stochastic_rounding=True`` (see :mod:`trainer.precision`), else a plain cast.

Full-size states (momentum; AdamW's second moment) are stored in ``state_dtype`` and written
back the same way (stochastically rounded when bf16 and enabled).  Factored second-moment
statistics (Adafactor, CAME) are row/column vectors and always stay fp32: their EMAs use
betas of 0.999 and more, whose increments bf16 could not even represent.

``prepare_state()`` creates every state (and master copy) up front, as the first update
would: memory is claimed at start-up, and results are unchanged.

**Which step's random bits.** ``step()`` uses ``optimizer.step_index`` (the number of steps
taken, saved in ``state_dict``) for ``step_generator(seed, step_index, "rounding")`` and then
increments it; ``set_step(n)`` sets it explicitly, e.g. to the training loop's step number.

Each optimizer is deterministic given (state, params, grads, step_index), and
``load_state_dict(state_dict())`` restores the state bitwise: unlike ``torch.optim``'s
loader it keeps every state tensor's dtype (an fp32 master copy is not cast to the bf16
parameter's dtype).  The loaded tensors are moved to the parameter's device, not copied.

* :class:`AdamW` -- Loshchilov & Hutter 2019: Adam moments with bias correction and decoupled
  weight decay.  Two full-size states.
* :class:`Adafactor` -- Shazeer & Stern 2018 with an explicit learning rate (no relative
  step, no parameter scaling): factored second moment with the paper's decay
  ``1 - t^-0.8`` (capped at ``betas[1]``), update clipping at RMS 1, optional momentum
  ``betas[0]`` (0 = none, no full-size state at all).
* :class:`CAME` -- Luo et al. 2023 (the optimizer PixArt-Sigma trains with): Adafactor's
  factored second moment (constant beta2, no bias correction; update clipping handles the
  start), momentum of the clipped update, and a factored estimate of the instability
  ``(update - momentum)^2`` that scales the momentum down where it is unreliable.  Tensors
  of one dimension are not factored and take the momentum directly (no confidence term).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import TrainConfig
from trainer.devices import dtype_named
from trainer.precision import StepRounding

CLIP_THRESHOLD = 1.0  # Adafactor/CAME: an update's RMS is scaled down to at most this
ADAFACTOR_DECAY_EXPONENT = -0.8  # Adafactor's second-moment decay 1 - t^-0.8

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
Closure = Callable[[], torch.Tensor] | None


def _ema(
    stored: torch.Tensor, sample: torch.Tensor, beta: float, rounding: StepRounding
) -> torch.Tensor:
    """``(1 - beta) * sample + beta * stored`` in fp32, written back into ``stored``.

    Returns the fp32 value (the stored one may be its rounded bf16 version).
    """
    value = torch.mul(sample, 1.0 - beta).add_(stored, alpha=beta)
    rounding.write(stored, value)
    return value


def _squares_plus(values: torch.Tensor, eps: float) -> torch.Tensor:
    """``values^2 + eps`` in one pass."""
    return torch.addcmul(
        torch.tensor(eps, dtype=values.dtype, device=values.device), values, values
    )


def _factored_rsqrt(
    row: torch.Tensor, col: torch.Tensor, sample: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update row/column means of ``sample`` (fp32 EMAs); factors of the estimate's rsqrt.

    Over the last two dimensions the rank-1 estimate is ``row[i] * col[j] / mean(row)``
    (exact for a rank-1 non-negative matrix, Adafactor section 3); its inverse square root
    is returned as a row factor and a column factor whose broadcast product gives it, so
    the full-size estimate is never materialised.
    """
    row.mul_(beta).add_(sample.mean(dim=-1), alpha=1.0 - beta)
    col.mul_(beta).add_(sample.mean(dim=-2), alpha=1.0 - beta)
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return row_factor, col.rsqrt().unsqueeze(-2)


def _factored_zeros(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 row (shape[:-1]) and column (shape[:-2] + shape[-1:]) statistics of zeros."""
    shape = param.shape
    row = torch.zeros(shape[:-1], dtype=torch.float32, device=param.device)
    col = torch.zeros((*shape[:-2], shape[-1]), dtype=torch.float32, device=param.device)
    return row, col


def _clip_rms_(update: torch.Tensor, threshold: float) -> torch.Tensor:
    """``update`` divided in place by max(1, RMS(update) / threshold)."""
    rms = torch.linalg.vector_norm(update) / update.numel() ** 0.5
    return update.div_(torch.clamp(rms / threshold, min=1.0))


def _hyperparameters(
    name: str,
    lr: float,
    betas: tuple[float, ...],
    eps: tuple[float, ...],
    weight_decay: float,
    lengths: tuple[int, int],
) -> dict[str, Any]:
    """The optimizer's param-group defaults; ValueError for a non-positive lr or betas/eps
    of the wrong length or range.
    """
    betas, eps = tuple(betas), tuple(eps)
    if lr <= 0:
        raise ValueError(f"{name}: learning rate must be positive, got {lr}")
    if len(betas) != lengths[0] or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"{name}: needs {lengths[0]} betas in [0, 1), got {betas}")
    if len(eps) != lengths[1] or not all(value > 0 for value in eps):
        raise ValueError(f"{name}: needs {lengths[1]} positive eps, got {eps}")
    return {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}


class PreciseOptimizer(Optimizer):
    """Base: fp32 update per parameter, written back by master copy or (stochastic) rounding.

    Subclasses implement :meth:`_init_state` and :meth:`_direction` (the update before the
    learning rate); the base applies ``w <- w - lr * (direction + weight_decay * w)``.
    """

    def __init__(
        self,
        params: Params,
        defaults: dict[str, Any],
        *,
        seed: int = 0,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        super().__init__(params, defaults)
        self.seed = seed
        self.stochastic_rounding = stochastic_rounding
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.step_index = 0

    def set_step(self, step: int) -> None:
        """Use ``step``'s rounding bits for the next ``step()`` (then step + 1, ...)."""
        self.step_index = step

    @torch.no_grad()
    def step(self, closure: Closure = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rounding = StepRounding(self.seed, self.step_index, enabled=self.stochastic_rounding)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update_param(param, group, rounding)
        self.step_index += 1
        return loss

    def _update_param(
        self, param: torch.Tensor, group: dict[str, Any], rounding: StepRounding
    ) -> None:
        """Compute the fp32 update of one parameter and write weights (and states) back."""
        if param.grad is None or param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} needs dense gradients")
        state = self.state[param]
        if not state:
            self._create_state(param, state, group)
        state["step"] += 1
        weights = state.get("master", param)
        direction = self._direction(param.grad.float(), state, group, rounding)
        lr, decay = group["lr"], group["weight_decay"]
        # fp32 result whatever the weights' dtype (type promotion with the fp32 direction).
        updated = torch.add(weights, direction, alpha=-lr)
        if decay:
            updated.add_(weights, alpha=-lr * decay)
        if "master" in state:
            state["master"].copy_(updated)
            param.copy_(updated)
        else:
            rounding.write(param, updated)

    def _create_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Step counter, fp32 master copy if configured, and the optimizer's zero states."""
        state["step"] = 0
        if self.master_weights and param.dtype != torch.float32:
            state["master"] = param.detach().to(torch.float32, copy=True)
        self._init_state(param, state, group)

    @torch.no_grad()
    def prepare_state(self) -> None:
        """Create every parameter's state now, as its first update would.

        Claims the optimizer's memory up front (an out-of-memory error at start-up rather
        than after the first forward and backward), and lets a benchmark measure the steady
        state.  Changes no weight and no result: the first update finds the same zeros.
        """
        for group in self.param_groups:
            for param in group["params"]:
                if not self.state[param]:
                    self._create_state(param, self.state[param], group)

    def _full_size(self, param: torch.Tensor) -> torch.Tensor:
        """A zero state shaped like ``param`` in the configured state dtype."""
        return torch.zeros_like(
            param, dtype=self.state_dtype, memory_format=torch.contiguous_format
        )

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Create the optimizer's zero states for ``param``."""
        raise NotImplementedError

    def _direction(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        rounding: StepRounding,
    ) -> torch.Tensor:
        """The fp32 update before the learning rate; updates ``state`` (never ``grad``)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``step_index`` (the rounding step of the next update)."""
        packed = super().state_dict()
        packed["step_index"] = self.step_index
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly: tensors keep their dtype (moved, not copied).

        ValueError when the parameter groups do not match this optimizer's.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state has {len(saved_groups)} parameter groups, "
                f"this optimizer {len(self.param_groups)}"
            )
        params_by_id: dict[int, torch.Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("a parameter group's size differs from the saved state's")
            params_by_id.update(zip(saved["params"], group["params"], strict=True))
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for param_id, values in state_dict["state"].items():
            param = params_by_id[param_id]
            state[param] = {
                key: value.to(device=param.device) if torch.is_tensor(value) else value
                for key, value in values.items()
            }
        self.state = state
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
        self.step_index = int(state_dict["step_index"])


class AdamW(PreciseOptimizer):
    """AdamW (decoupled weight decay) with fp32 math and configurable state precision."""

    def __init__(
        self,
        params: Params,
        lr: float,
        betas: tuple[float, ...] = (0.9, 0.999),
        eps: tuple[float, ...] = (1e-8,),
        weight_decay: float = 0.0,
        **precision: Any,
    ) -> None:
        defaults = _hyperparameters("AdamW", lr, betas, eps, weight_decay, (2, 1))
        super().__init__(params, defaults, **precision)

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """First and second moments, full size."""
        state["exp_avg"] = self._full_size(param)
        state["exp_avg_sq"] = self._full_size(param)

    def _direction(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        rounding: StepRounding,
    ) -> torch.Tensor:
        """Bias-corrected ``m / (sqrt(v) + eps)``."""
        beta1, beta2 = group["betas"]
        (eps,) = group["eps"]
        step = state["step"]
        mean = _ema(state["exp_avg"], grad, beta1, rounding)
        square = _ema(state["exp_avg_sq"], grad.square(), beta2, rounding)
        # m_hat / (sqrt(v_hat) + eps) with the bias corrections folded into scalars.
        denominator = square.sqrt_().div_((1.0 - beta2**step) ** 0.5).add_(eps)
        return mean.div_(denominator).div_(1.0 - beta1**step)


class _FactoredOptimizer(PreciseOptimizer):
    """Shared parts of Adafactor and CAME: factored (or, for 1-D, full) second moments."""

    def _init_second_moment(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Row/column fp32 statistics for tensors of 2+ dimensions, else a full fp32 one."""
        if param.dim() >= 2:
            state["exp_avg_sq_row"], state["exp_avg_sq_col"] = _factored_zeros(param)
        else:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)

    @staticmethod
    def _normalised(
        grad: torch.Tensor, state: dict[str, Any], beta2: float, eps: float
    ) -> torch.Tensor:
        """``grad / sqrt(second moment)``, clipped to RMS <= CLIP_THRESHOLD."""
        square = _squares_plus(grad, eps)
        if "exp_avg_sq_row" in state:
            row_factor, col_factor = _factored_rsqrt(
                state["exp_avg_sq_row"], state["exp_avg_sq_col"], square, beta2
            )
            update = torch.mul(grad, row_factor).mul_(col_factor)
        else:
            second = state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1.0 - beta2)
            update = torch.mul(grad, second.rsqrt())
        return _clip_rms_(update, CLIP_THRESHOLD)


class Adafactor(_FactoredOptimizer):
    """Adafactor with an explicit learning rate; optional momentum in ``state_dtype``."""

    def __init__(
        self,
        params: Params,
        lr: float,
        betas: tuple[float, ...] = (0.9, 0.999),
        eps: tuple[float, ...] = (1e-30,),
        weight_decay: float = 0.0,
        **precision: Any,
    ) -> None:
        defaults = _hyperparameters("Adafactor", lr, betas, eps, weight_decay, (2, 1))
        super().__init__(params, defaults, **precision)

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Factored second moment; full-size momentum only when betas[0] > 0."""
        self._init_second_moment(param, state)
        if group["betas"][0] > 0:
            state["exp_avg"] = self._full_size(param)

    def _direction(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        rounding: StepRounding,
    ) -> torch.Tensor:
        """Clipped normalised gradient, averaged by momentum when enabled."""
        beta1, beta2_cap = group["betas"]
        (eps,) = group["eps"]
        beta2 = min(beta2_cap, 1.0 - state["step"] ** ADAFACTOR_DECAY_EXPONENT)
        update = self._normalised(grad, state, beta2, eps)
        if "exp_avg" not in state:
            return update
        return _ema(state["exp_avg"], update, beta1, rounding)


class CAME(_FactoredOptimizer):
    """CAME: Adafactor's memory with confidence-guided momentum (Luo et al. 2023)."""

    def __init__(
        self,
        params: Params,
        lr: float,
        betas: tuple[float, ...] = (0.9, 0.999, 0.9999),
        eps: tuple[float, ...] = (1e-30, 1e-16),
        weight_decay: float = 0.0,
        **precision: Any,
    ) -> None:
        defaults = _hyperparameters("CAME", lr, betas, eps, weight_decay, (3, 2))
        super().__init__(params, defaults, **precision)

    def _init_state(
        self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Momentum (full size), factored second moment and instability statistics."""
        state["exp_avg"] = self._full_size(param)
        self._init_second_moment(param, state)
        if param.dim() >= 2:
            state["exp_avg_res_row"], state["exp_avg_res_col"] = _factored_zeros(param)

    def _direction(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        rounding: StepRounding,
    ) -> torch.Tensor:
        """Momentum of the clipped update, divided by sqrt(instability) when factored."""
        beta1, beta2, beta3 = group["betas"]
        eps_square, eps_instability = group["eps"]
        update = self._normalised(grad, state, beta2, eps_square)
        momentum = _ema(state["exp_avg"], update, beta1, rounding)
        if "exp_avg_res_row" not in state:
            return momentum
        instability = _squares_plus(update.sub_(momentum), eps_instability)
        row_factor, col_factor = _factored_rsqrt(
            state["exp_avg_res_row"], state["exp_avg_res_col"], instability, beta3
        )
        return momentum.mul_(row_factor).mul_(col_factor)


OPTIMIZER_CLASSES: dict[str, type[PreciseOptimizer]] = {
    "came": CAME,
    "adafactor": Adafactor,
    "adamw": AdamW,
}


def _bitsandbytes_adamw8bit(params: list[Any], config: TrainConfig) -> Optimizer:
    """bitsandbytes' AdamW8bit on CUDA; ValueError naming what is missing otherwise."""
    try:
        bnb_optim = importlib.import_module("bitsandbytes.optim")
    except ImportError as error:
        raise ValueError(
            "optimizer 'adamw8bit' needs bitsandbytes, which is not installed "
            "(pip install bitsandbytes), or choose 'came' or 'adafactor'"
        ) from error
    devices = {
        tensor.device.type
        for entry in params
        for tensor in (entry["params"] if isinstance(entry, dict) else [entry])
    }
    if devices != {"cuda"}:
        raise ValueError(
            f"optimizer 'adamw8bit' (bitsandbytes) needs the model on a CUDA device, "
            f"not {sorted(devices)}: choose 'came' or 'adafactor'"
        )
    (eps,) = config.eps
    return bnb_optim.AdamW8bit(
        params,
        lr=config.learning_rate,
        betas=config.betas,
        eps=eps,
        weight_decay=config.weight_decay,
    )


def build_optimizer(params: Params, config: TrainConfig) -> Optimizer:
    """The optimizer ``config`` names, with its precision settings, over ``params``."""
    params = list(params)
    if config.optimizer == "adamw8bit":
        return _bitsandbytes_adamw8bit(params, config)
    optimizer_class = OPTIMIZER_CLASSES[config.optimizer]
    return optimizer_class(
        params,
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        seed=config.seed,
        stochastic_rounding=config.stochastic_rounding,
        master_weights=config.master_weights,
        state_dtype=dtype_named(config.optimizer_state_dtype),
    )


class LinearWarmup:
    """LR factor: ``(n + 1) / warmup_steps`` for the first warmup_steps steps, then 1.

    A callable object, not a lambda, so LambdaLR's state_dict saves (and restores) it.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        """Factor for the ``step``-th optimizer step (0-based)."""
        if step >= self.warmup_steps:
            return 1.0
        return (step + 1) / self.warmup_steps


def build_schedule(optimizer: Optimizer, config: TrainConfig) -> LambdaLR:
    """Linear warm-up over ``config.warmup_steps`` optimizer steps, then constant."""
    return LambdaLR(optimizer, LinearWarmup(config.warmup_steps))
