"""The PixArt-Sigma transformer: the only part of the model training loads.

The VAE and T5 never load while training (their work is in the cache).  ``model`` is a
local diffusers folder or a Hugging Face id with the ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``
layout; only its ``transformer/`` subfolder is read.
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

TRANSFORMER_SUBFOLDER = "transformer"
# PixArt-Sigma uses no micro-conditions (resolution, aspect ratio): pass them as None.
NO_MICRO_CONDITIONS: dict[str, None] = {"resolution": None, "aspect_ratio": None}


def load_transformer(
    model: str, *, dtype: torch.dtype, device: torch.device, checkpointing: bool
) -> PixArtTransformer2DModel:
    """The transformer in ``dtype`` on ``device``, in training mode."""
    transformer = PixArtTransformer2DModel.from_pretrained(
        model, subfolder=TRANSFORMER_SUBFOLDER, dtype=dtype
    )
    transformer.to(device)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    *,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The transformer's (or its DDP wrapper's) 8-channel output for noisy latents under
    caption embeddings.

    ``dtype`` is the weights' dtype, given by the caller: diffusers' ``transformer.dtype``
    walks every parameter on each call.
    """
    return transformer(
        noisy.to(dtype),
        encoder_hidden_states=text.to(dtype),
        encoder_attention_mask=mask,
        timestep=timesteps,
        added_cond_kwargs=NO_MICRO_CONDITIONS,
        return_dict=False,
    )[0]
