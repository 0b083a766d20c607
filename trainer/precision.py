"""Writing fp32 results into bf16 tensors without losing small updates: stochastic rounding.

bf16 keeps 8 significant bits, so a weight near 1.0 only moves in steps of 2^-8 (or 2^-7
above 1.0).  An lr-2e-5 update is ~1/200 of that step and round-to-nearest throws it away
every time: the weight never moves.  Stochastic rounding rounds up with probability equal to
the dropped fraction, so the *expected* stored value equals the fp32 result and many tiny
updates add up as they would in fp32 (Zamirai et al. 2020, "Revisiting BFloat16 Training").

bf16 is the upper half of an fp32 bit pattern, so the rounding is integer arithmetic: add a
uniform random 16-bit integer to the pattern (viewed as int32) and clear the low half.  A
carry happens exactly when ``low half + random >= 2^16``, i.e. with probability
``low half / 2^16`` -- the dropped fraction -- and it moves the magnitude up for either sign.
Non-finite values (and finite ones whose rounding would overflow to inf) are rounded to
nearest instead, as a plain cast would.

The random bits come from ``step_generator(seed, step, "rounding")``, consumed in a fixed
order (parameter by parameter, each one's states before the parameter itself), so a step's
rounding is reproducible and a resumed run rounds exactly as an uninterrupted one.  Each
48-bit draw of the generator gives three 16-bit random values: on a CPU the generator is
the slow part, and this takes a third of the draws.
"""

from __future__ import annotations

import torch

from trainer.config import step_generator

ROUNDING_PURPOSE = "rounding"
DROPPED_BITS = 16  # fp32 keeps 23 mantissa bits, bf16 keeps 7: the low 16 bits are dropped
HIGH_HALF = -(1 << DROPPED_BITS)  # 0xFFFF0000 as an int32: keeps sign, exponent, 7 mantissa
BF16_MAX = torch.finfo(torch.bfloat16).max
# Random bits: each int64 draw uniform on [0, 2^48) is read as three 16-bit lanes (the int16
# view of an int64; torch tensors are little-endian, so lanes 0-2 are its low 48 bits).
# One 48-bit draw instead of three 16-bit ones: the generator is the slow part on a CPU.
DRAW_BITS = 48
LANES_PER_DRAW = DRAW_BITS // DROPPED_BITS
WORDS_PER_INT64 = 4
LANE_OFFSET = 1 << (DROPPED_BITS - 1)  # a signed 16-bit lane + 2^15 is uniform on [0, 2^16)


def random_halfwords(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` uniform signed 16-bit integers (int16) drawn from ``generator``."""
    draws = -(-count // LANES_PER_DRAW)
    words = torch.empty(draws, dtype=torch.int64, device=device)
    words.random_(0, 1 << DRAW_BITS, generator=generator)
    lanes = words.view(torch.int16).view(draws, WORDS_PER_INT64)[:, :LANES_PER_DRAW]
    return lanes.reshape(-1)[:count]


def stochastic_round_to_bf16(
    values: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``values`` (any float dtype, read as fp32) rounded stochastically to bf16.

    Written into ``out`` (a bf16 tensor of the same shape) when given, else a new tensor.
    Draws ``ceil(values.numel() / 3)`` 48-bit integers from ``generator``.
    """
    values32 = values.float().contiguous()
    noise = random_halfwords(values32.numel(), generator, values32.device).view(values32.shape)
    # One pass finds NaN (it propagates through aminmax), inf and values past bf16's range.
    low, high = torch.aminmax(values32)
    if low.item() >= -BF16_MAX and high.item() <= BF16_MAX:
        rounded = _add_and_truncate(values32, noise)
    else:
        rounded = _round_with_specials(values32, noise)
    if out is None:
        return rounded.to(torch.bfloat16)
    return out.copy_(rounded)  # exact: the low halves are zero


def _add_and_truncate(values32: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rounding proper, as fp32 with zeroed low halves (values within bf16's range)."""
    bits = values32.view(torch.int32)
    total = torch.add(bits, noise).add_(LANE_OFFSET)  # + uniform [0, 2^16): cannot overflow
    return total.bitwise_and_(HIGH_HALF).view(torch.float32)


def _round_with_specials(values32: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rounding when NaN, inf or huge values are present: those get a plain cast."""
    finite = torch.isfinite(values32)
    # Zeroing non-finite entries keeps the integer add free of int32 overflow (NaN patterns).
    rounded = _add_and_truncate(torch.where(finite, values32, 0.0), noise)
    keep = finite & torch.isfinite(rounded)
    return torch.where(keep, rounded, values32.to(torch.bfloat16).float())


class StepRounding:
    """How one optimizer step writes fp32 results back into params and states.

    bf16 targets are rounded stochastically when ``enabled`` (random bits from
    ``step_generator(seed, step, "rounding")``, one generator per device, created on first
    use); every other case is a plain ``copy_`` (round-to-nearest for bf16, exact for fp32).
    """

    def __init__(self, seed: int, step: int, *, enabled: bool) -> None:
        self.seed = seed
        self.step = step
        self.enabled = enabled
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        """This step's rounding generator on ``device``."""
        if device not in self._generators:
            self._generators[device] = step_generator(
                self.seed, self.step, ROUNDING_PURPOSE, device
            )
        return self._generators[device]

    def write(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """Store fp32 ``values`` into ``target`` (same shape), rounding as described above."""
        if self.enabled and target.dtype == torch.bfloat16:
            stochastic_round_to_bf16(values, self._generator(target.device), out=target)
        else:
            target.copy_(values)
