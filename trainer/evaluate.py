"""Loss on photos the model never trained on, comparable from checkpoint to checkpoint.

Each held-out sample gets the same timestep and noise at every evaluation (drawn from
``step_generator(seed, sample id, ...)``) and no caption dropout, so two evaluations differ
only by the weights: a falling held-out loss means the model learned something that carries
over to new photos, not that it memorised the training set.

:func:`binned_held_out_loss` splits the figure by timestep into thirds of the diffusion
process, because each third is a different job of the model and fine-tuning moves them
differently:

* early  (the noisiest third, the first sampling steps): composition and layout;
* middle: shapes, light and colour;
* late   (the least noisy third, the last sampling steps): texture and fine detail.

The split shows which of these jobs a fine-tune changes, and which it may be unlearning
(a third whose figure rises).  The three figures are on different scales (predicting the
noise is easy when the picture is almost all noise), so compare each with itself across
checkpoints, not with the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.cache import Cache
from trainer.config import step_generator
from trainer.dataset import Batch, CacheDataset, collate
from trainer.model import predict
from trainer.objective import (
    NOISE_CHANNELS,
    NUM_TIMESTEPS,
    NoiseSchedule,
    diffusion_loss,
    draw_noise,
    draw_timesteps,
)

HELD_OUT = "held-out"
BIN_NAMES = ("early", "middle", "late")  # noisiest third first, as sampling runs
DRAW_DEVICE = "cpu"  # binned draws on the CPU: the same figures whatever device evaluates


@dataclass(frozen=True)
class TimestepBin:
    """Timesteps ``low <= t < high`` of one third of the diffusion process."""

    name: str
    low: int
    high: int

    def __contains__(self, timestep: int) -> bool:
        return self.low <= timestep < self.high


def timestep_bins(num_timesteps: int = NUM_TIMESTEPS) -> tuple[TimestepBin, ...]:
    """Thirds of ``[0, num_timesteps)``, noisiest first: early, middle, late.

    For 1,000 timesteps: early [667, 1000), middle [333, 667), late [0, 333).
    """
    count = len(BIN_NAMES)
    bounds = [round(num_timesteps * k / count) for k in range(count + 1)]  # ascending
    return tuple(
        TimestepBin(name, bounds[count - index - 1], bounds[count - index])
        for index, name in enumerate(BIN_NAMES)
    )


TIMESTEP_BINS = timestep_bins()


@dataclass(frozen=True)
class BinnedLoss:
    """Held-out loss (MSE on the noise) per third of the timesteps, their mean, and the
    number of held-out samples it was measured on."""

    early: float
    middle: float
    late: float
    overall: float
    samples: int


@torch.no_grad()
def held_out_loss(
    transformer: torch.nn.Module, cache: Cache, *, seed: int, device: torch.device
) -> float:
    """Mean noise-prediction loss over every sample of ``cache`` (a held-out cache), one
    timestep drawn uniformly per sample."""
    dataset = CacheDataset(cache)
    schedule = NoiseSchedule.linear()
    dtype = next(transformer.parameters()).dtype
    was_training = transformer.training
    transformer.eval()
    losses = []
    for sample_id in sorted(dataset.ids()):
        batch = collate([dataset[sample_id]])
        generator = step_generator(seed, sample_id, HELD_OUT, device)
        latents = batch.latents.to(device)
        timesteps = draw_timesteps(1, generator)
        noise = draw_noise(latents, generator)
        noisy = schedule.add_noise(latents, noise, timesteps)
        prediction = predict(
            transformer, noisy, timesteps, batch.text.to(device), batch.mask.to(device),
            dtype=dtype,
        )  # fmt: skip
        losses.append(float(diffusion_loss(prediction, noise, None)))
    transformer.train(was_training)
    if not losses:
        raise ValueError(f"{cache.root}: no samples to evaluate")
    return sum(losses) / len(losses)


def held_out_draws(
    seed: int, sample_id: int, timestep_bin: TimestepBin, latent_shape: torch.Size, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` timesteps uniform in the bin and as many noise tensors shaped like the
    sample's latent (fp32, on the CPU), the same at every call with the same arguments."""
    generator = step_generator(seed, sample_id, f"{HELD_OUT}/{timestep_bin.name}", DRAW_DEVICE)
    timesteps = torch.randint(
        timestep_bin.low, timestep_bin.high, (count,), generator=generator, device=DRAW_DEVICE
    )
    noise = torch.randn((count, *latent_shape), generator=generator, dtype=torch.float32)
    return timesteps, noise


@torch.no_grad()
def binned_held_out_loss(
    transformer: torch.nn.Module,
    cache: Cache,
    *,
    seed: int,
    device: torch.device,
    per_bin: int = 1,
) -> BinnedLoss:
    """The held-out loss of ``transformer`` on every live sample of ``cache``, per timestep
    third (:data:`TIMESTEP_BINS`), with ``per_bin`` draws per sample and third.

    Draws come from :func:`held_out_draws`, so two evaluations of the same weights on the
    same held-out set give the same figures; ``overall`` is the mean of the three thirds.
    The transformer is put in eval mode for the evaluation and restored afterwards.
    """
    if per_bin < 1:
        raise ValueError(f"per_bin must be at least 1, got {per_bin}")
    dataset = CacheDataset(cache)
    if not len(dataset):
        raise ValueError(f"{cache.root}: no samples to evaluate")
    schedule = NoiseSchedule.linear()
    dtype = next(transformer.parameters()).dtype
    totals = dict.fromkeys(BIN_NAMES, 0.0)
    was_training = transformer.training
    transformer.eval()
    try:
        for sample_id in dataset.ids():
            batch = collate([dataset[sample_id]])
            for timestep_bin in TIMESTEP_BINS:
                draws = held_out_draws(
                    seed, sample_id, timestep_bin, batch.latents.shape[1:], per_bin
                )
                totals[timestep_bin.name] += _bin_loss(
                    transformer, schedule, batch, draws, device=device, dtype=dtype
                )
    finally:
        transformer.train(was_training)
    means = {name: total / len(dataset) for name, total in totals.items()}
    overall = sum(means.values()) / len(means)
    return BinnedLoss(**means, overall=overall, samples=len(dataset))


def _bin_loss(
    transformer: torch.nn.Module,
    schedule: NoiseSchedule,
    batch: Batch,
    draws: tuple[torch.Tensor, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Mean MSE on the noise of one sample (a batch of 1) over its draws in one bin, all
    draws in one forward pass."""
    timesteps, noise = draws
    count = timesteps.shape[0]
    latents = batch.latents.to(device).expand(count, -1, -1, -1)
    noise = noise.to(device)
    noisy = schedule.add_noise(latents, noise, timesteps)
    text = batch.text.to(device).expand(count, -1, -1)
    mask = batch.mask.to(device).expand(count, -1)
    prediction = predict(transformer, noisy, timesteps.to(device), text, mask, dtype=dtype)
    return float(F.mse_loss(prediction[:, :NOISE_CHANNELS].float(), noise))


def held_out_digest(cache: Cache) -> str:
    """sha256 naming a held-out set: every live sample's id, ref, latent and caption keys.

    Figures are compared only between evaluations on the same digest.  The keys are in it
    because a re-captioned or re-encoded photo is a different sample (other tensors); the
    id is in it because the draws of :func:`binned_held_out_loss` are keyed by sample id.
    """
    digest = hashlib.sha256()
    for ref, row in sorted(cache.live_samples().items()):
        digest.update(f"{row.id}\t{ref}\t{row.latent_key}\t{row.text_key}\n".encode())
    return digest.hexdigest()
