"""The training objective of PixArt-Sigma, as the design fixes it.

Epsilon prediction with linear betas from 1e-4 to 0.02 over 1,000 steps and timesteps drawn
uniformly; the transformer outputs 8 channels (4 for the noise, 4 for the learned variance),
and the loss is the MSE on the first 4 only.  A share of captions (10%) is replaced by the
empty caption's embedding, so classifier-free guidance keeps working after fine-tuning.
Optionally the loss is weighted by min-SNR (Hang et al. 2023).

Every random draw comes from a generator the caller passes (``step_generator``), so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
NOISE_CHANNELS = 4  # of the 8 output channels, the first 4 predict the noise


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward diffusion process q(x_t | x_0) for the linear beta schedule."""

    alphas_cumprod: torch.Tensor  # (NUM_TIMESTEPS,) float64 on the CPU

    @classmethod
    def linear(cls) -> NoiseSchedule:
        betas = torch.linspace(BETA_START, BETA_END, NUM_TIMESTEPS, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, computed in fp32."""
        abar = self.alphas_cumprod[timesteps.cpu()].to(latents.device, torch.float32)
        abar = abar.view(-1, *([1] * (latents.dim() - 1)))
        return abar.sqrt() * latents.float() + (1.0 - abar).sqrt() * noise.float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) per timestep (fp32, on the CPU)."""
        abar = self.alphas_cumprod[timesteps.cpu()]
        return (abar / (1.0 - abar)).float()


def draw_timesteps(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, NUM_TIMESTEPS) (on the generator's device)."""
    return torch.randint(0, NUM_TIMESTEPS, (batch,), generator=generator, device=generator.device)


def draw_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``latents`` (fp32, on the generator's device)."""
    return torch.randn(
        latents.shape, generator=generator, device=generator.device, dtype=torch.float32
    )


def drop_captions(
    text: torch.Tensor,
    mask: torch.Tensor,
    empty: torch.Tensor,
    rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption with the empty caption's embedding with probability ``rate``.

    ``text`` (B, T, D) and ``mask`` (B, T) as collated; ``empty`` (tokens, D) is the stored
    embedding of "" (its EOS token), so a dropped caption is exactly what encoding "" gives.
    """
    drop = torch.rand(text.shape[0], generator=generator, device=generator.device) < rate
    if not bool(drop.any()):
        return text, mask
    tokens = empty.shape[0]
    text, mask = text.clone(), mask.clone()
    for index in torch.nonzero(drop.cpu()).flatten().tolist():
        text[index] = 0
        text[index, :tokens] = empty.to(text.dtype)
        mask[index] = 0
        mask[index, :tokens] = 1
    return text, mask


def loss_weights(
    schedule: NoiseSchedule, timesteps: torch.Tensor, min_snr_gamma: float | None
) -> torch.Tensor | None:
    """Per-sample weights min(SNR, gamma) / SNR for epsilon prediction; None (all equal)
    without min-SNR weighting.
    """
    if min_snr_gamma is None:
        return None
    snr = schedule.snr(timesteps)
    return torch.clamp(snr, max=min_snr_gamma) / snr


def diffusion_loss(
    prediction: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE on the noise channels (fp32), weighted
    per sample when ``weights`` are given.
    """
    predicted_noise = prediction[:, :NOISE_CHANNELS].float()
    if weights is None:
        return F.mse_loss(predicted_noise, noise.float())
    per_sample = F.mse_loss(predicted_noise, noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights.to(per_sample.device)).mean()
