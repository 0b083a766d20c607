"""Loss on photos the model never trained on, comparable from checkpoint to checkpoint.

Each held-out sample gets the same timestep and noise at every evaluation (drawn from
``step_generator(seed, sample id, "held-out")``) and no caption dropout, so two
evaluations differ only by the weights: a falling held-out loss means the model learned
something that carries over to new photos, not that it memorised the training set.
"""

from __future__ import annotations

import torch

from trainer.cache import Cache
from trainer.config import step_generator
from trainer.dataset import CacheDataset, collate
from trainer.model import predict
from trainer.objective import NoiseSchedule, diffusion_loss, draw_noise, draw_timesteps

HELD_OUT = "held-out"


@torch.no_grad()
def held_out_loss(
    transformer: torch.nn.Module, cache: Cache, *, seed: int, device: torch.device
) -> float:
    """Mean noise-prediction loss over every sample of ``cache`` (a held-out cache)."""
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
