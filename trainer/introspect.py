"""Looking inside the transformer while it renders: what the studio shows.

One :meth:`Inspector.run` is one ordinary denoising pass (:meth:`Sampler.denoise`) with
instruments attached, so nothing is re-run when the user clicks around afterwards:

* **cross-attention maps** (:mod:`trainer.attention`): for every active block and step, how
  the image positions spread their attention over the prompt's tokens;
* **block change**: how much each block changes its input at each step, measured as the
  relative size of its residual update, ``‖block(x) − x‖ / ‖x‖`` on the prompt's row;
* **previews**: the model's guess of the clean image at each step,
  ``x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t``, averaged down to the preview's size in latent space
  and decoded with the VAE;

and three ways to change the pass:

* **layer subsets**: only the chosen blocks run, the others are skipped (the residual stream
  passes them unchanged);
* **token strength**: one token's cross-attention weight is multiplied by ``scale`` before
  the softmax renormalises (a ``log(scale)`` bias on its logit); 0× masks the token exactly
  as PixArt masks padding, so 0× is the render without that token's effect;
* **prompt blending**: the first prompt conditions steps ``0 … switch_step − 1``, the
  second prompt the rest (switch 0: all second prompt; switch = steps: all first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.attention import AttentionRecorder, attached
from trainer.sampling import Conditioning, Sampler, SampleSettings, forked_rng

PREVIEW_SIDE = 256  # the step previews' longer side in pixels
MAX_STRENGTH = 3.0
# PixArt's own attention bias for a masked token (pixart_transformer_2d turns a 0/1 mask
# into (1 - mask) * -10000): 0× strength uses it, so it equals masking the token.
MASKED_BIAS = -10000.0
SUGGESTIONS = 8  # nearest tokens offered for a clicked word
EMBEDDING_CHUNK = 4096  # rows of T5's embedding table compared at once (bounded memory)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Token:
    """One token of a prompt as the model sees it: its position, sentencepiece piece and id."""

    index: int
    piece: str
    token_id: int
    special: bool

    @property
    def text(self) -> str:
        """The piece for people (:func:`piece_text`)."""
        return piece_text(self.piece)


def piece_text(piece: str) -> str:
    """A sentencepiece piece for people: ``"▁golden"`` -> ``"golden"``; ``"</s>"`` and a
    lone ``"▁"`` stay as they are."""
    return piece.replace("▁", " ").strip() or piece


@dataclass(frozen=True)
class Strength:
    """Scale token ``index`` of the prompt's cross-attention by ``scale`` (0 … 3)."""

    index: int
    scale: float


@dataclass(frozen=True)
class Blend:
    """Condition on ``prompt`` from step ``switch_step`` on (0 … steps)."""

    prompt: str
    switch_step: int


@dataclass(frozen=True)
class InspectRequest:
    """One studio render: the prompt, how to render it, and what to change in the pass.
    ``blocks`` None runs all blocks; otherwise the sorted indexes of those that run."""

    prompt: str
    settings: SampleSettings
    blocks: tuple[int, ...] | None = None
    strength: Strength | None = None
    blend: Blend | None = None


@dataclass(eq=False)
class InspectResult:
    """What one pass recorded.  ``attention`` is (steps, active blocks, tokens, gh, gw)
    float16, each cell the mean over heads of the attention probability (over all the
    prompt's real tokens, so the tokens' maps sum to 1 per cell); ``block_change`` is
    (steps, all blocks) float32, NaN for skipped blocks; ``captured`` marks the steps whose
    attention was recorded (with blending: those conditioned on the first prompt)."""

    image: Image.Image
    tokens: list[Token]
    blocks: tuple[int, ...]
    block_count: int
    attention: np.ndarray
    captured: np.ndarray
    block_change: np.ndarray
    previews: list[Image.Image]

    @property
    def nbytes(self) -> int:
        """About how much memory the result holds (for a cache's budget)."""
        pixels = sum(p.width * p.height * len(p.getbands()) for p in [self.image, *self.previews])
        return self.attention.nbytes + self.block_change.nbytes + pixels

    def heatmap(
        self, token: int, *, step: int | None = None, block: int | None = None
    ) -> np.ndarray:
        """Token ``token``'s attention (gh, gw) float32, averaged over the captured steps
        and the active blocks, or over only ``step`` and/or ``block``; ValueError naming
        what is out of range."""
        if not 0 <= token < len(self.tokens):
            raise ValueError(f"token must be in 0..{len(self.tokens) - 1}, got {token}")
        steps = np.flatnonzero(self.captured)
        if step is not None:
            if step not in steps:
                raise ValueError(f"step {step} has no recorded attention; recorded: {_span(steps)}")
            steps = np.array([step])
        columns = list(range(len(self.blocks)))
        if block is not None:
            if block not in self.blocks:
                raise ValueError(f"block {block} did not run; active blocks: {_span(self.blocks)}")
            columns = [self.blocks.index(block)]
        chosen = self.attention[steps][:, columns, token].astype(np.float32)
        return chosen.mean(axis=(0, 1))


def _span(values: object) -> str:
    """``"0, 1, 2"`` for messages."""
    return ", ".join(str(int(v)) for v in values) or "none"  # type: ignore[attr-defined]


class Inspector:
    """Renders with instruments on a loaded :class:`Sampler` (whose checkpoint is chosen by
    the caller with :meth:`Sampler.use_checkpoint`)."""

    def __init__(self, sampler: Sampler, *, preview_side: int = PREVIEW_SIDE) -> None:
        """Wrap ``sampler``; previews are at most ``preview_side`` pixels a side."""
        self.sampler = sampler
        self.preview_side = preview_side
        self._norms: torch.Tensor | None = None

    @property
    def block_count(self) -> int:
        """How many transformer blocks the model has (28 in PixArt-Sigma)."""
        return len(self.sampler.transformer.transformer_blocks)

    # --- tokens ---

    def tokens(self, prompt: str) -> list[Token]:
        """``prompt``'s tokens as encoded for rendering (truncated, EOS last)."""
        tokenizer = self.sampler.pipeline.tokenizer
        ids = self.sampler.token_ids(prompt)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        special = set(tokenizer.all_special_ids)
        return [
            Token(index, piece, token_id, token_id in special)
            for index, (piece, token_id) in enumerate(zip(pieces, ids, strict=True))
        ]

    def substitute(self, tokens: list[Token], index: int, token_id: int) -> str:
        """The prompt of ``tokens`` (from :meth:`tokens`) with token ``index`` replaced by
        ``token_id``, as text."""
        tokenizer = self.sampler.pipeline.tokenizer
        pieces = [t.piece for t in tokens if not t.special]
        pieces[index] = tokenizer.convert_ids_to_tokens(token_id)
        return tokenizer.convert_tokens_to_string(pieces)

    @torch.inference_mode()
    def nearest_tokens(self, token_id: int, k: int = SUGGESTIONS) -> list[tuple[int, float]]:
        """The ``k`` tokens nearest to ``token_id`` in T5's input embedding table by cosine
        similarity, best first, as (token id, similarity); the token itself and special
        tokens are left out."""
        tokenizer = self.sampler.pipeline.tokenizer
        table = self.sampler.pipeline.text_encoder.get_input_embeddings().weight
        vocab = min(len(tokenizer), table.shape[0])  # T5's table has spare rows
        if not 0 <= token_id < vocab:
            raise ValueError(f"token id must be in 0..{vocab - 1}, got {token_id}")
        if self._norms is None:
            self._norms = torch.cat([rows.norm(dim=1) for rows in _chunks(table, vocab)])
        query = table[token_id].float()
        dots = torch.cat([rows @ query for rows in _chunks(table, vocab)])
        similarity = dots / (self._norms * query.norm()).clamp_min(torch.finfo().tiny)
        similarity[[token_id, *tokenizer.all_special_ids]] = -math.inf
        best = similarity.topk(min(k, vocab - 1))
        return [
            (int(i), float(s))
            for i, s in zip(best.indices, best.values, strict=True)
            if math.isfinite(s)
        ]

    # --- the instrumented pass ---

    def run(
        self, request: InspectRequest, on_progress: ProgressCallback | None = None
    ) -> InspectResult:
        """Render ``request`` once, recording attention, block change and previews;
        ``on_progress(done, total)`` after each step.  ValueError for a request that cannot
        work (blocks, strength or blend out of range)."""
        settings = request.settings
        settings.check()
        tokens = self.tokens(request.prompt)
        active = self.check(request, len(tokens))
        first = self._conditioning(request.prompt, settings.negative, request.strength)
        second = (
            self._conditioning(request.blend.prompt, settings.negative, None)
            if request.blend
            else None
        )
        switch = request.blend.switch_step if request.blend else settings.steps
        recorder = AttentionRecorder(
            steps=settings.steps,
            blocks=active,
            tokens=len(tokens),
            grid=self._grid(settings),
            block_count=self.block_count,
        )
        previews: list[Image.Image] = []

        def conditioning_at(step: int) -> Conditioning:
            recorder.begin_step(step, capture=step < switch)
            return first if step < switch or second is None else second

        def on_step(step: int, _latents: torch.Tensor) -> None:
            if on_progress is not None:
                on_progress(step + 1, settings.steps)

        preview = self._previewer(settings, previews)
        transformer = self.sampler.transformer
        blocks = {index: transformer.transformer_blocks[index] for index in active}
        with (
            forked_rng(self.sampler.device),
            attached(blocks, recorder),
            _only_blocks(transformer, active),
        ):
            latents = self.sampler.denoise(
                conditioning_at, settings, on_step=on_step, on_noise=preview
            )
            image = self.sampler.decode(latents)[0]
        self.sampler.pipeline.maybe_free_model_hooks()  # with offload: the last model to RAM
        return InspectResult(
            image=image,
            tokens=tokens,
            blocks=active,
            block_count=self.block_count,
            attention=recorder.attention,
            captured=recorder.captured,
            block_change=recorder.block_change,
            previews=previews,
        )

    def check(self, request: InspectRequest, token_count: int) -> tuple[int, ...]:
        """The active blocks; ValueError for blocks, strength or blend out of range."""
        active = tuple(range(self.block_count)) if request.blocks is None else request.blocks
        if not active or list(active) != sorted(set(active)):
            raise ValueError(
                f"blocks must be a non-empty sorted list without repeats, got {active}"
            )
        if active[0] < 0 or active[-1] >= self.block_count:
            raise ValueError(f"blocks must be in 0..{self.block_count - 1}, got {list(active)}")
        strength = request.strength
        if strength is not None:
            if not 0 <= strength.index < token_count:
                raise ValueError(
                    f"strength token must be in 0..{token_count - 1}, got {strength.index}"
                )
            if not 0 <= strength.scale <= MAX_STRENGTH:
                raise ValueError(f"strength must be in 0..{MAX_STRENGTH:g}, got {strength.scale}")
        blend = request.blend
        if blend is not None and not 0 <= blend.switch_step <= request.settings.steps:
            raise ValueError(
                f"switch step must be in 0..{request.settings.steps}, got {blend.switch_step}"
            )
        return active

    def _conditioning(self, prompt: str, negative: str, strength: Strength | None) -> Conditioning:
        """The encoded prompt with its masks as attention biases (PixArt's own conversion),
        one token's bias moved by ``log(scale)`` when a strength is given."""
        cond = self.sampler.encode_prompt(prompt, negative)
        dtype = self.sampler.dtype
        prompt_bias = _bias(cond.prompt_mask, dtype)
        if strength is not None:
            shift = MASKED_BIAS if strength.scale == 0 else math.log(strength.scale)
            prompt_bias[..., strength.index] += shift
        return Conditioning(
            cond.prompt_embeds, prompt_bias, cond.negative_embeds, _bias(cond.negative_mask, dtype)
        )

    def _grid(self, settings: SampleSettings) -> tuple[int, int]:
        """The transformer's patch grid (rows, columns) for the image size."""
        scale = self.sampler.pipeline.vae_scale_factor * self.sampler.transformer.config.patch_size
        return settings.height // scale, settings.width // scale

    def _previewer(
        self, settings: SampleSettings, previews: list[Image.Image]
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]:
        """An ``on_noise`` callback appending each step's predicted clean image."""
        alphas = self.sampler.scheduler(settings.steps).alphas_cumprod
        vae_scale = self.sampler.pipeline.vae_scale_factor
        longest = max(settings.width, settings.height) // vae_scale
        shrink = max(1, math.ceil(longest / (self.preview_side // vae_scale)))

        def preview(
            _step: int, timestep: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor
        ) -> None:
            alpha = float(alphas[int(timestep)])
            clean = (latents - math.sqrt(1 - alpha) * noise) / math.sqrt(alpha)
            # Decoding latents averaged down to the preview's size costs shrink² less than
            # decoding the whole image and shrinking it, and looks the same at that size.
            previews.append(self.sampler.decode(F.avg_pool2d(clean, shrink))[0])

        return preview


def _chunks(table: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """The first ``rows`` rows of an embedding table in float32, a bounded chunk at a time
    (the whole of T5's table in float32 would be half a gigabyte)."""
    for start in range(0, rows, EMBEDDING_CHUNK):
        yield table[start : min(start + EMBEDDING_CHUNK, rows)].float()


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (1, tokens) 0/1 mask as the (1, 1, tokens) additive bias PixArt makes of it."""
    return ((1 - mask.to(dtype)) * MASKED_BIAS).unsqueeze(1)


@contextmanager
def _only_blocks(transformer: torch.nn.Module, active: tuple[int, ...]) -> Iterator[None]:
    """Run only the ``active`` transformer blocks inside the block; all again after it."""
    blocks = transformer.transformer_blocks
    if len(active) == len(blocks):
        yield
        return
    transformer.transformer_blocks = torch.nn.ModuleList([blocks[i] for i in active])
    try:
        yield
    finally:
        transformer.transformer_blocks = blocks
