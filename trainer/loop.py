"""The training loop: resume from the latest checkpoint, train a step at a time, checkpoint.

Read top to bottom, one optimizer step is:

1. draw ``grad_accumulation`` same-bucket batches from the sampler;
2. for each, with randomness from ``step_generator(seed, step, purpose)``: timesteps,
   noise, caption dropout; noise the latents; predict; MSE on the noise channels;
   backward (split in halves on an out-of-memory error, see below);
3. clip the gradient norm, step the optimizer (told the step for its rounding bits) and
   the learning-rate schedule, update the EMA;
4. every ``log_every`` steps a progress record, every ``checkpoint_every`` a checkpoint.

A run ends at its step or time limit, or when asked to stop (SIGTERM), always with a
checkpoint of where it got to.  Nothing random depends on what ran before, so resuming
from a checkpoint continues bit for bit as if the run had never stopped.

**Out of memory** (a device error, never on the CPU): the batch is retried in two halves,
and so on down to single samples; a sample that does not fit even alone makes the step be
skipped (logged with its bucket).  ``MAX_OOM_STEPS`` skipped steps in a row stop the run
with :class:`TrainingStopped`: the settings do not fit the card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.cache import EMPTY_TEXT_META, Cache, CacheError
from trainer.checkpoints import (
    TrainingState,
    capture_rng,
    load_latest,
    restore_rng,
    save_checkpoint,
)
from trainer.config import TrainConfig, step_generator
from trainer.dataset import Batch, BucketBatchSampler, CacheDataset, collate
from trainer.devices import check_dtype_supported, dtype_named, empty_cache, pick_device
from trainer.distributed import World
from trainer.limits import RunLimits
from trainer.model import load_transformer, predict
from trainer.objective import (
    NoiseSchedule,
    diffusion_loss,
    draw_noise,
    draw_timesteps,
    drop_captions,
    loss_weights,
)
from trainer.optim import PreciseOptimizer, build_optimizer, build_schedule
from trainer.run_log import RunLog

log = logging.getLogger("darkroom.train")

MAX_OOM_STEPS = 3
SECONDS_PER_MINUTE = 60


class TrainingStopped(Exception):
    """Training cannot go on with these settings (the message says why and what to change)."""


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    grad_norm: float
    images: int
    skipped: bool = False


@dataclass
class RunResult:
    """Where a run ended and why."""

    first_step: int
    last_step: int
    reason: str
    checkpoints: list[Path] = field(default_factory=list)


Fault = Callable[[Batch], None]


class Trainer:
    """One training run over a cache (see the module docstring).

    ``before_forward`` is called with every micro-batch before its forward pass; tests use
    it to raise the device out-of-memory error that a CPU never raises.
    """

    def __init__(self, config: TrainConfig, *, before_forward: Fault | None = None) -> None:
        self.config = config
        self.world = World.from_env()
        self.device = self.world.device_for(pick_device(config.device))
        self.world.join(self.device)
        self.cache = Cache.open(config.cache_dir)
        empty_key = self.cache.get_meta(EMPTY_TEXT_META)
        if empty_key is None:
            raise CacheError(f"{config.cache_dir}: no empty-caption embedding: run encode first")
        self.empty = self.cache.load_text(empty_key).to(self.device)
        self.dataset = CacheDataset(self.cache)
        self.sampler = BucketBatchSampler(
            self.cache, batch_size=config.batch_size, seed=config.seed
        )
        self.dtype = dtype_named(config.weights_dtype)
        check_dtype_supported(self.device, self.dtype)  # bf16 on a pre-Ampere card: say so
        self.transformer = load_transformer(
            config.model,
            dtype=self.dtype,
            device=self.device,
            checkpointing=config.gradient_checkpointing,
        )
        self.model = self.world.wrap(self.transformer, self.device)  # DDP when distributed
        self.parameters = list(self.transformer.parameters())  # not walked again each step
        self.optimizer = build_optimizer(self.parameters, config)
        self.schedule = build_schedule(self.optimizer, config)
        self.noise_schedule = NoiseSchedule.linear()
        self.ema = self._new_ema()
        self.step = 0
        self.before_forward = before_forward
        self._batches: Iterator[list[int]] | None = None
        self._oom_steps = 0

    # -- state ------------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Continue from the newest valid checkpoint, if there is one."""
        found = load_latest(self.config.output_dir, self.transformer)
        if found is None:
            log.info("no checkpoint in %s: starting from the base model", self.config.output_dir)
            return None
        path, state = found
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        self.sampler.load_state_dict(state.sampler)
        if self.ema is not None and state.ema is not None:
            self.ema = {name: tensor.to(self.device) for name, tensor in state.ema.items()}
        restore_rng(state.rng)
        self.step = state.step
        log.info("resumed from %s (step %d)", path, self.step)
        return path

    def save(self) -> Path:
        """A checkpoint of exactly where the run is."""
        ema = None if self.ema is None else {n: t.cpu() for n, t in self.ema.items()}
        state = TrainingState(
            step=self.step,
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            sampler=self.sampler.state_dict(),
            ema=ema,
            rng=capture_rng(),
            cache_generation=self.cache.generation,
        )
        return save_checkpoint(
            self.config.output_dir, self.step, self.transformer, state, self.config.to_json(),
            keep_last=self.config.keep_last, milestone_every=self.config.milestone_every,
        )  # fmt: skip

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accumulation`` micro-batches."""
        total_loss, images = 0.0, 0
        try:
            for micro in range(self.config.grad_accumulation):
                ids = next(self._batch_iter())
                batch = collate([self.dataset[sample_id] for sample_id in ids])
                total_loss += self._accumulate(batch, micro)
                images += len(ids)
        except _SkipStep as skip:
            return self._skip(skip)
        self._oom_steps = 0
        grad_norm = self._clip()
        if isinstance(self.optimizer, PreciseOptimizer):  # its rounding bits for this step
            self.optimizer.set_step(self.step)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        self.step += 1
        return StepResult(total_loss, grad_norm, images)

    def _batch_iter(self) -> Iterator[list[int]]:
        if self._batches is None:
            self._batches = self.world.deal(iter(self.sampler))
        return self._batches

    def _accumulate(self, batch: Batch, micro: int) -> float:
        """Draw this micro-batch's randomness, then forward and backward it (in pieces when
        the device runs out of memory); returns its share of the step's loss.
        """

        rank = f"/{self.world.rank}" if self.world.distributed else ""

        def generator(purpose: str) -> torch.Generator:
            name = f"{purpose}/{micro}{rank}"
            return step_generator(self.config.seed, self.step, name, self.device)

        latents = batch.latents.to(self.device)
        text, mask = batch.text.to(self.device), batch.mask.to(self.device)
        timesteps = draw_timesteps(latents.shape[0], generator("timesteps"))
        noise = draw_noise(latents, generator("noise"))
        text, mask = drop_captions(
            text, mask, self.empty, self.config.caption_dropout, generator("dropout")
        )
        noisy = self.noise_schedule.add_noise(latents, noise, timesteps)
        weights = loss_weights(self.noise_schedule, timesteps, self.config.min_snr_gamma)
        parts = _Parts(batch, noisy, noise, timesteps, text, mask, weights)
        return self._backward(parts, share=1.0 / self.config.grad_accumulation)

    def _backward(self, parts: _Parts, share: float) -> float:
        try:
            if self.before_forward is not None:
                self.before_forward(parts.batch)
            with self._autocast():
                prediction = predict(
                    self.model, parts.noisy, parts.timesteps, parts.text, parts.mask,
                    dtype=self.dtype,
                )  # fmt: skip
            loss = diffusion_loss(prediction, parts.noise, parts.weights)
            if share != 1.0:
                loss = loss * share
            loss.backward()
            return float(loss.detach())
        except torch.OutOfMemoryError:
            return self._retry_smaller(parts, share)

    def _retry_smaller(self, parts: _Parts, share: float) -> float:
        size = parts.noisy.shape[0]
        height, width = parts.noisy.shape[-2:]
        bucket = f"{width}x{height} latent"
        empty_cache(self.device)
        if self.world.distributed:  # every rank must run the same backward passes
            raise TrainingStopped(f"out of device memory on a batch of {size} ({bucket})")
        if size == 1:
            raise _SkipStep(f"one sample of {bucket} does not fit in device memory")
        log.warning("out of memory on a batch of %d (%s): retrying in halves", size, bucket)
        half = size // 2
        return sum(
            self._backward(piece, share * piece.noisy.shape[0] / size)
            for piece in (parts.slice(0, half), parts.slice(half, size))
        )

    def _skip(self, skip: _SkipStep) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        self._oom_steps += 1
        log.warning("step %d skipped: %s", self.step, skip)
        if self._oom_steps >= MAX_OOM_STEPS:
            raise TrainingStopped(
                f"out of device memory {self._oom_steps} steps in a row ({skip}): use a "
                "smaller preset or batch size"
            )
        self.step += 1  # the step's batches are consumed; resume stays exact
        return StepResult(float("nan"), float("nan"), 0, skipped=True)

    def _autocast(self) -> Any:
        if self.config.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype_named(self.config.autocast_dtype))

    def _clip(self) -> float:
        limit = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.parameters, limit))

    def _new_ema(self) -> dict[str, torch.Tensor] | None:
        if self.config.ema_decay is None:
            return None
        return {n: p.detach().float().clone() for n, p in self.transformer.named_parameters()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None or self.config.ema_decay is None:
            return
        for name, param in self.transformer.named_parameters():
            self.ema[name].lerp_(param.detach().float(), 1.0 - self.config.ema_decay)

    # -- the run ------------------------------------------------------------------------------

    def run(self, limits: RunLimits, should_stop: Callable[[], bool] = lambda: False) -> RunResult:
        """Train until a limit is reached or ``should_stop()``; checkpoint on the way out."""
        first = self.step
        target = limits.target_step(first)
        started = time.monotonic()
        result = RunResult(first, first, "step limit")
        run_log_enabled = self.world.main
        with (
            self.cache.reading(),
            RunLog(self.config, first, target, enabled=run_log_enabled) as run_log,
        ):
            while target is None or self.step < target:
                outcome = self.train_step()
                run_log.record(self.step, outcome, self.schedule.get_last_lr()[0], self.device)
                if self.step % self.config.checkpoint_every == 0:
                    result.checkpoints.append(self._checkpoint(run_log))
                if should_stop():
                    result.reason = "asked to stop"
                    break
                minutes = (time.monotonic() - started) / SECONDS_PER_MINUTE
                if limits.max_minutes is not None and minutes >= limits.max_minutes:
                    result.reason = "time limit"
                    break
            if self.step != first and self.step % self.config.checkpoint_every != 0:
                result.checkpoints.append(self._checkpoint(run_log))
            result.last_step = self.step
            run_log.finish(self.step, result.reason)
        return result

    def _checkpoint(self, run_log: RunLog) -> Path:
        """Rank 0 writes the checkpoint; every rank waits until it is complete."""
        path = self.save() if self.world.main else self.config.output_dir
        self.world.barrier()
        run_log.checkpointed(self.step, path)
        return path

    def close(self) -> None:
        """Release the cache and leave the process group (the model goes with the object)."""
        self.cache.close()
        self.world.leave()


class _SkipStep(Exception):
    """This step cannot be trained (a single sample does not fit in device memory)."""


@dataclass(frozen=True)
class _Parts:
    """A micro-batch after its random draws, sliceable for out-of-memory retries."""

    batch: Batch
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor | None

    def slice(self, start: int, stop: int) -> _Parts:
        batch = Batch(
            sample_ids=self.batch.sample_ids[start:stop],
            latents=self.batch.latents[start:stop],
            text=self.batch.text[start:stop],
            mask=self.batch.mask[start:stop],
        )
        return _Parts(
            batch, self.noisy[start:stop], self.noise[start:stop], self.timesteps[start:stop],
            self.text[start:stop], self.mask[start:stop],
            None if self.weights is None else self.weights[start:stop],
        )  # fmt: skip
