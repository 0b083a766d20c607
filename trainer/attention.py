"""Recording what the transformer's blocks do during one denoising pass (for the studio).

:func:`attached` puts two instruments on each chosen block for the length of a ``with``:

* a probe around the block's cross-attention processor (``attn2``): the processor still
  computes the output as always, and the probe computes, for the prompt's row of the
  batch, ``softmax(q·kᵀ·scale + bias)`` averaged over heads: for every image position, how
  its attention spreads over the prompt's tokens;
* a forward hook measuring the block's residual update, ``‖block(x) − x‖ / ‖x‖``.

Both are computed on the prompt's row only: in a guided batch ``[negative, prompt]`` that
is the last row, and without guidance the only one.  Maps are average-pooled to at most
:data:`MAP_SIDE` cells a side (a mean of distributions, so a cell's tokens still sum to 1)
and kept as float16 on the CPU: 30 steps × 28 blocks of 32×32 maps is ~1.7 MB per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MAP_SIDE = 32  # recorded attention maps have at most this many cells a side
PROMPT_ROW = -1  # the prompt's row in a batch: last of [negative, prompt], or alone


class AttentionRecorder:
    """Arrays filled during one pass: ``attention`` (steps, active blocks, tokens, rows,
    columns) float16, ``captured`` (steps,) bool, ``block_change`` (steps, block_count)
    float32 with NaN where a block did not run."""

    def __init__(
        self,
        *,
        steps: int,
        blocks: tuple[int, ...],
        tokens: int,
        grid: tuple[int, int],
        block_count: int,
    ) -> None:
        """Room for ``steps`` steps of the ``blocks`` that run, ``tokens`` prompt tokens and
        an image of ``grid`` (rows, columns) patches."""
        self.grid = grid
        self.tokens = tokens
        self.map_grid = pooled_grid(grid)
        self._column = {block: column for column, block in enumerate(blocks)}
        self.attention = np.zeros((steps, len(blocks), tokens, *self.map_grid), np.float16)
        self.captured = np.zeros(steps, dtype=bool)
        self.block_change = np.full((steps, block_count), np.nan, np.float32)
        self.step = 0
        self._capture = False

    def begin_step(self, step: int, *, capture: bool) -> None:
        """Record into step ``step`` from now on; attention only when ``capture`` (the
        prompt whose tokens the maps are of is the one conditioning this step)."""
        self.step = step
        self._capture = capture
        self.captured[step] = capture

    @torch.inference_mode()
    def cross_attention(
        self,
        block: int,
        attn: Any,
        hidden: torch.Tensor,
        encoder: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        """Record block ``block``'s attention probabilities for this step's prompt row."""
        if not self._capture:
            return
        heads = attn.heads
        query = attn.to_q(hidden[PROMPT_ROW:])
        key = attn.to_k(encoder[PROMPT_ROW:])
        head_dim = key.shape[-1] // heads
        query = query.view(1, -1, heads, head_dim).transpose(1, 2)
        key = key.view(1, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        logits = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if bias is not None:
            logits = logits + bias[PROMPT_ROW:].float().reshape(1, 1, 1, -1)
        probs = logits.softmax(dim=-1).mean(dim=1)[0, :, : self.tokens]  # (positions, tokens)
        maps = probs.transpose(0, 1).reshape(1, self.tokens, *self.grid)
        pooled = F.adaptive_avg_pool2d(maps, self.map_grid)[0]
        self.attention[self.step, self._column[block]] = pooled.to("cpu", torch.float16).numpy()

    @torch.inference_mode()
    def block_output(self, block: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Record block ``block``'s relative residual update for this step."""
        x = before[PROMPT_ROW].float()
        update = (after[PROMPT_ROW].float() - x).norm() / x.norm().clamp_min(torch.finfo().tiny)
        self.block_change[self.step, block] = float(update)


def pooled_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The recorded map size for a patch grid: shrunk by one whole factor so that neither
    side exceeds :data:`MAP_SIDE` (the aspect ratio kept)."""
    factor = max(1, math.ceil(max(grid) / MAP_SIDE))
    return math.ceil(grid[0] / factor), math.ceil(grid[1] / factor)


class _CrossAttentionProbe:
    """An attention processor that records, then defers to the block's own processor."""

    def __init__(self, inner: Any, block: int, recorder: AttentionRecorder) -> None:
        """Wrap ``inner``, the processor block ``block``'s cross-attention had."""
        self.inner = inner
        self.block = block
        self.recorder = recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The inner processor's output; the probabilities go to the recorder on the way."""
        if encoder_hidden_states is not None:
            self.recorder.cross_attention(
                self.block, attn, hidden_states, encoder_hidden_states, attention_mask
            )
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@contextmanager
def attached(blocks: Mapping[int, torch.nn.Module], recorder: AttentionRecorder) -> Iterator[None]:
    """Instrument ``blocks`` (index -> transformer block) for the ``with`` body; the blocks'
    own processors are back and the hooks gone afterwards, also after an error."""
    with ExitStack() as stack:
        for index, block in blocks.items():
            stack.enter_context(_probed(index, block, recorder))
        yield


@contextmanager
def _probed(index: int, block: torch.nn.Module, recorder: AttentionRecorder) -> Iterator[None]:
    """One block's probe and hook, removed on exit."""
    cross = block.attn2
    inner = cross.processor
    cross.processor = _CrossAttentionProbe(inner, index, recorder)

    def measure(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        recorder.block_output(index, args[0], output)

    hook = block.register_forward_hook(measure)
    try:
        yield
    finally:
        hook.remove()
        cross.processor = inner
