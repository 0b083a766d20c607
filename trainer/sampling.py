"""Rendering images from the base model or a training checkpoint, through our own loop.

:class:`Sampler` loads the base PixArt-Sigma pipeline once (T5, transformer, VAE, scheduler)
and swaps only the transformer's weights between checkpoints, so rendering the same prompts
at every checkpoint costs one model load.  The denoising loop is written out here rather
than calling the pipeline, for three reasons:

* prompts are encoded exactly as the training cache encodes captions (the cache's own
  :class:`~trainer.encoders.TextEncoder`: no lower-casing or caption cleaning, embeddings
  rounded to the cache's bf16), so a fine-tune sees at sampling what it saw in training;
* every image's seed is explicit: the initial noise comes from a CPU generator seeded with
  ``seed + offset``, the same on every device, and rendering never touches (and never moves)
  torch's global RNG streams;
* later features hook into it: ``on_step`` sees the latents after every step, and the
  studio's attention capture wraps :meth:`Sampler.predict_noise`.

Given the same conditioning and seed, :meth:`Sampler.denoise` computes exactly what
diffusers' ``PixArtSigmaPipeline`` does (tests/test_sampling.py checks this in fp32); it
keeps the latents in float32 between steps, where the pipeline rounds them to the model's
dtype.

Renders are saved as PNGs whose text chunks record how they were made (:func:`save_png`).
"""

from __future__ import annotations

import gc
import inspect
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from PIL import Image

from trainer.buckets import BUCKETS, Bucket
from trainer.checkpoints import (
    TRANSFORMER_DIR,
    check_fits,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
)
from trainer.devices import check_dtype_supported, dtype_named, empty_cache, pick_device
from trainer.encoders import DEFAULT_MAX_LENGTH, EMBEDDING_DTYPE, TextEncoder
from trainer.model import predict
from trainer.progress import Progress
from trainer.progress_file import STEP_PREFIX
from trainer.sample_defaults import (
    BASE_LABEL,
    DEFAULT_GUIDANCE,
    DEFAULT_NEGATIVE,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    step_label,
)
from trainer.sheets import png_text as png_text  # the PNG helpers, torch-free, are API here too
from trainer.sheets import read_png_text as read_png_text
from trainer.sheets import save_png as save_png

log = logging.getLogger("darkroom.sampling")

BASE = BASE_LABEL  # the checkpoint spec, and the label, of the untouched base model
LATEST = "latest"
# At or below this guidance the unconditional pass is skipped (it would not change the
# result at exactly 1, and the pipeline treats anything below 1 the same way).
NO_GUIDANCE = 1.0
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
PIXEL_MAX = 255  # 8-bit output; the VAE decodes to [-1, 1]
DISTRIBUTION = "immich-darkroom"

StepCallback = Callable[[int, torch.Tensor], None]
# Called with (step index, timestep, the step's input latents, the guided noise estimate).
NoiseCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSettings:
    """How one image is rendered: steps, guidance, seed, size (one of the nine buckets: the
    sizes the model was trained at) and the negative prompt."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = DEFAULT_SEED
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    negative: str = DEFAULT_NEGATIVE

    def check(self) -> None:
        """ValueError naming the first setting that cannot work."""
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must not be negative, got {self.guidance}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if Bucket(self.width, self.height) not in BUCKETS:
            sizes = ", ".join(bucket.name for bucket in BUCKETS)
            raise ValueError(
                f"{self.width}x{self.height} is not a size the model was trained at; use one"
                f" of the nine buckets: {sizes}"
            )

    def describe(self) -> str:
        """One line for captions and logs: ``"30 steps, guidance 4.5, seed 42, 1024×1024"``."""
        return (
            f"{self.steps} steps, guidance {self.guidance:g}, seed {self.seed},"
            f" {self.width}×{self.height}"
        )


@dataclass(frozen=True)
class PipelineOptions:
    """Which model to load and where: ``model`` is a diffusers PixArt-Sigma folder or hub id;
    ``cpu_offload`` keeps idle parts in host RAM (a GPU only), ``vae_tiling`` decodes in
    tiles; ``max_length`` is the T5 token limit the training cache used."""

    model: str
    device: str = "auto"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    cpu_offload: bool = False
    vae_tiling: bool = False
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass(frozen=True, eq=False)  # tensors have no truth value to compare by
class Conditioning:
    """A prompt and its negative as T5 embeddings on the sampler's device, zero-padded to one
    length so they batch: embeds (1, tokens, width), masks (1, tokens) with 1 for real
    tokens, as the training batches are built (trainer.dataset.collate)."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor

    def batch(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The text and mask to denoise with: [negative, prompt] when guided (the pipeline's
        order), the prompt alone otherwise."""
        if not guided:
            return self.prompt_embeds, self.prompt_mask
        text = torch.cat([self.negative_embeds, self.prompt_embeds])
        return text, torch.cat([self.negative_mask, self.prompt_mask])


# --- the sampler ---------------------------------------------------------------------------


class Sampler:
    """The base pipeline, loaded once, whose transformer can take any checkpoint's weights."""

    def __init__(self, options: PipelineOptions) -> None:
        """Load ``options.model`` on the chosen device (ValueError for one that cannot work)."""
        if options.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {options.max_length}")
        self.options = options
        self.device = pick_device(options.device)
        self.dtype = dtype_named(options.dtype)
        check_dtype_supported(self.device, self.dtype)
        pipeline = PixArtSigmaPipeline.from_pretrained(options.model, dtype=self.dtype)
        pipeline.set_progress_bar_config(disable=True)
        self._pipeline: PixArtSigmaPipeline | None = pipeline
        self._place(pipeline)
        self._text = TextEncoder(
            pipeline.tokenizer,
            pipeline.text_encoder,
            identity=options.model,
            precision=options.dtype,
            max_length=options.max_length,
        )
        self.step = 0
        self._base_weights: dict[str, torch.Tensor] | None = None

    def _place(self, pipeline: PixArtSigmaPipeline) -> None:
        """Put the models on the device (or behind offload hooks), tiling, VAE precision."""
        if self.options.cpu_offload and self.device.type != "cpu":
            pipeline.enable_model_cpu_offload(device=self.device)
        else:
            pipeline.to(self.device)
        if self.options.vae_tiling:
            pipeline.vae.enable_tiling()
        if self.dtype == torch.float16 and pipeline.vae.config.get("force_upcast", False):
            log.info("the VAE overflows in fp16 (force_upcast): decoding in fp32")
            pipeline.vae.to(torch.float32)

    @property
    def pipeline(self) -> PixArtSigmaPipeline:
        """The loaded pipeline (its parts: tokenizer, text_encoder, transformer, vae,
        scheduler); RuntimeError once closed."""
        if self._pipeline is None:
            raise RuntimeError("this Sampler was closed")
        return self._pipeline

    @property
    def transformer(self) -> PixArtTransformer2DModel:
        """The denoiser whose weights :meth:`use_checkpoint` swaps (hooks attach here)."""
        return self.pipeline.transformer

    @property
    def label(self) -> str:
        """The weights in use, for people: ``"base"`` or ``"step 500"``."""
        return step_label(self.step)

    # --- weights ---

    def use_checkpoint(self, path: Path | None, step: int) -> None:
        """Give the transformer the weights of checkpoint ``path`` (trained to ``step``), or
        the base model's with ``path=None`` (and step 0).  A no-op when already there.

        The weights are copied in place (cast to the sampling dtype); names and shapes must
        match exactly, else CheckpointError and the current weights are kept.  The base
        weights are kept as a CPU copy from the first switch away from them.
        """
        if (path is None) != (step == 0):
            raise ValueError(f"step 0 is the base model (path None), got {path} for step {step}")
        if step == self.step:
            return
        if path is None:
            assert self._base_weights is not None  # kept before the first switch away
            weights = self._base_weights
        else:
            weights = load_weights(Path(path) / TRANSFORMER_DIR)
            check_fits(Path(path), self.transformer, weights, exact_dtype=False)
            self._keep_base_weights()
        self.transformer.load_state_dict(weights, strict=True)
        self.step = step
        log.info("sampling with %s", self.label)

    def _keep_base_weights(self) -> None:
        """Copy the base weights to host memory once, before the first checkpoint replaces
        them (a re-load would need the model's files and, for a hub id, the network)."""
        if self._base_weights is None:
            state = self.transformer.state_dict()
            self._base_weights = {name: t.to("cpu", copy=True) for name, t in state.items()}

    # --- the three stages ---

    def token_ids(self, prompt: str) -> list[int]:
        """The token ids :meth:`encode_prompt` encodes ``prompt`` from (EOS last)."""
        return self._text.token_ids(prompt)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str, negative: str) -> Conditioning:
        """T5 embeddings of ``prompt`` and ``negative``, tokenized and rounded as the training
        cache does it (truncated to ``max_length`` tokens, EOS kept)."""
        prompt_embeds, negative_embeds = self._text.encode([prompt, negative])
        longest = max(len(prompt_embeds), len(negative_embeds))
        text = torch.zeros((2, longest, prompt_embeds.shape[1]), dtype=EMBEDDING_DTYPE)
        mask = torch.zeros((2, longest), dtype=torch.long)
        for row, embeds in enumerate((prompt_embeds, negative_embeds)):
            text[row, : len(embeds)] = embeds
            mask[row, : len(embeds)] = 1
        text, mask = text.to(self.device), mask.to(self.device)
        return Conditioning(text[:1], mask[:1], text[1:], mask[1:])

    @torch.inference_mode()
    def denoise(
        self,
        cond: Conditioning | Callable[[int], Conditioning],
        settings: SampleSettings,
        *,
        seed_offset: int = 0,
        on_step: StepCallback | None = None,
        on_noise: NoiseCallback | None = None,
    ) -> torch.Tensor:
        """Denoise fresh noise (seed ``settings.seed + seed_offset``) into float32 latents
        (1, C, height/8, width/8) on the device; ``on_step(index, latents)`` after each step.

        ``cond`` may be a function of the step index (the studio's prompt blending), and
        ``on_noise`` sees each step's noise estimate (its previews of the clean image).
        """
        settings.check()
        scheduler = self.scheduler(settings.steps)
        generator = torch.Generator("cpu").manual_seed(settings.seed + seed_offset)
        latents = self._initial_noise(settings, generator) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator)
        for index, timestep in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, timestep)
            step_cond = cond(index) if callable(cond) else cond
            noise = self.predict_noise(model_input, timestep, step_cond, settings.guidance)
            if on_noise is not None:
                on_noise(index, timestep, model_input, noise)
            latents = scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(index, latents)
        return latents

    def predict_noise(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        """The guided noise estimate (float32) for one step of :meth:`denoise`.

        PixArt predicts 2C channels: the noise, then a learned variance the solver does not
        use, so the first C are kept.  Classifier-free guidance moves the estimate away from
        the negative prompt's: ``negative + guidance * (prompt - negative)``.
        """
        guided = guidance > NO_GUIDANCE
        text, mask = cond.batch(guided)
        rows = text.shape[0]
        output = predict(
            self.transformer,
            torch.cat([latents] * rows),
            timestep.reshape(1).expand(rows),
            text,
            mask,
            dtype=self.dtype,
        )
        noise = output[:, : latents.shape[1]].float()
        if not guided:
            return noise
        negative, positive = noise.chunk(2)
        return negative + guidance * (positive - negative)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """RGB images of latents made by :meth:`denoise` (the VAE's own scaling undone)."""
        vae = self.pipeline.vae
        shift = float(vae.config.get("shift_factor") or 0.0)
        scaled = latents / vae.config.scaling_factor + shift
        pixels = vae.decode(scaled.to(self.device, vae.dtype), return_dict=False)[0]
        unit = (pixels.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        rgb = (unit * PIXEL_MAX).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(row)) for row in rgb]

    def render(
        self, prompt: str, settings: SampleSettings, *, count: int = 1, bar: bool | None = None
    ) -> list[Image.Image]:
        """``count`` images of ``prompt`` with seeds ``settings.seed``, ``+1``, ...

        Torch's global RNG streams (CPU and the device) are the same afterwards as before.
        ``bar``: a progress bar (None: when stderr is a terminal), else log lines.
        """
        settings.check()
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        images: list[Image.Image] = []
        with (
            forked_rng(self.device),
            torch.inference_mode(),
            Progress(count * settings.steps, "steps", bar=bar) as progress,
        ):
            cond = self.encode_prompt(prompt, settings.negative)
            for offset in range(count):
                latents = self.denoise(
                    cond, settings, seed_offset=offset, on_step=lambda *_: progress.update()
                )
                images.extend(self.decode(latents))
        self.pipeline.maybe_free_model_hooks()  # with offload: the last model back to RAM
        return images

    def close(self) -> None:
        """Drop the models and give their device memory back."""
        self._pipeline = None
        self._base_weights = None
        gc.collect()
        empty_cache(self.device)

    def __enter__(self) -> Self:
        """Use as ``with Sampler(options) as sampler:`` to close it when done."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving the block."""
        self.close()

    # --- helpers ---

    def scheduler(self, steps: int) -> Any:
        """A fresh copy of the model's scheduler set to ``steps`` steps: schedulers keep
        per-run state (multistep history), so each image gets its own."""
        base = self.pipeline.scheduler
        scheduler = type(base).from_config(base.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def _initial_noise(self, settings: SampleSettings, generator: torch.Generator) -> torch.Tensor:
        """Standard normal latents for the image size, drawn on the CPU (the same numbers on
        every device) in float32, then moved to the device."""
        scale = self.pipeline.vae_scale_factor
        channels = self.transformer.config.in_channels
        shape = (1, channels, settings.height // scale, settings.width // scale)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, torch.Generator]:
    """The seeded generator for schedulers whose step draws noise (SDE solvers, ancestral):
    with it, the seed fixes the whole render, not only the starting noise."""
    accepts = "generator" in inspect.signature(scheduler.step).parameters
    return {"generator": generator} if accepts else {}


def forked_rng(device: torch.device) -> AbstractContextManager[None]:
    """A context that restores the CPU's and ``device``'s global RNG states on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


# --- which checkpoint ----------------------------------------------------------------------


def resolve_checkpoint(output_dir: Path, spec: str) -> tuple[int, Path | None]:
    """The step and folder a user's checkpoint spec names: ``"base"`` -> (0, None);
    ``"latest"`` -> the newest valid checkpoint (hash-verified); ``"500"`` or
    ``"step-00000500"`` -> that step's.  LookupError naming the available steps otherwise."""
    wanted = spec.strip().lower()
    if wanted == BASE:
        return 0, None
    if wanted == LATEST:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise LookupError(f"no valid checkpoint in {output_dir}; {_available(output_dir)}")
        return _parse_step(path.name) or 0, path
    step = _parse_step(wanted)
    for info in list_checkpoints(output_dir):
        if info.step == step and info.valid:
            return info.step, info.path
        if info.step == step:
            raise LookupError(f"checkpoint {step} is not usable ({info.problem})")
    raise LookupError(f"no checkpoint {spec!r} in {output_dir}; {_available(output_dir)}")


def _parse_step(spec: str) -> int | None:
    """The step in ``"500"`` or ``"step-00000500"``, None for anything else."""
    digits = spec.removeprefix(STEP_PREFIX)
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _available(output_dir: Path) -> str:
    """``"available: base, 500, 1000"``: what a spec may name."""
    steps = [str(info.step) for info in list_checkpoints(output_dir) if info.valid]
    return f"available: {', '.join([BASE, LATEST, *steps] if steps else [BASE])}"


# --- PNG files -----------------------------------------------------------------------------


def software() -> str:
    """``"darkroom 0.1.0"``: who made a render, for its PNG metadata."""
    try:
        return f"darkroom {version(DISTRIBUTION)}"
    except PackageNotFoundError:
        return "darkroom"


def sample_metadata(
    prompt: str, settings: SampleSettings, *, seed: int, checkpoint: str, model: str
) -> dict[str, str]:
    """The PNG text of one render (for :func:`save_png`); ``seed`` is the image's own
    (``settings.seed + index`` for the index-th image of :meth:`Sampler.render`)."""
    return {
        "prompt": prompt,
        "negative": settings.negative,
        "seed": str(seed),
        "steps": str(settings.steps),
        "guidance": f"{settings.guidance:g}",
        "width": str(settings.width),
        "height": str(settings.height),
        "checkpoint": checkpoint,
        "model": model,
        "software": software(),
    }
