"""CLIP score of a render against its prompt: how well the image matches the words.

CLIPScore (Hessel et al. 2021, as torchmetrics computes it): ``max(100 * cos(E_image,
E_text), 0)`` with the embeddings of a CLIP model.  It watches prompt adherence while the
held-out loss watches the denoiser, so a fine-tune that drifts away from following prompts
shows up even when its loss looks fine.

The CLIP model is a LOCAL folder (``samples.clip_model``, e.g. a download of
``openai/clip-vit-large-patch14``), loaded with ``local_files_only``: darkroom never reaches
a hub on its own.  Images go through CLIP's PIL image processor rather than the torchvision
one, so a score does not change with whether torchvision happens to be installed.  Prompts
are cut to CLIP's text length (77 tokens for the OpenAI models): PixArt prompts run longer,
and only their beginning is scored.

Torch-free at import (torch and transformers load in :meth:`ClipScorer.load`), so
:func:`clip_unavailable` can tell the reason without the training extra.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

CLIP_MODEL_TYPE = "clip"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # either one
SCORE_SCALE = 100.0  # CLIPScore's weight on the cosine
NOT_CONFIGURED = "no CLIP model configured (samples.clip_model)"


def _model_type(config: Path) -> str | None:
    """``model_type`` of a config.json, None when unreadable."""
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def clip_unavailable(path: Path | None) -> str | None:
    """None when ``path`` looks like a loadable CLIP folder, else why it is not.

    Checks the files only (no weights are read); :meth:`ClipScorer.load` can still fail on
    a corrupt file.
    """
    if path is None:
        return NOT_CONFIGURED
    if not path.is_dir():
        return f"{path}: no such folder"
    config = path / CONFIG_FILE
    if not config.is_file():
        return f"{path}: not a CLIP model folder (no {CONFIG_FILE})"
    model_type = _model_type(config)
    if model_type != CLIP_MODEL_TYPE:
        return f"{path}: not a CLIP model folder (model_type {model_type!r} in {CONFIG_FILE})"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"{path}: no weights (one of {', '.join(WEIGHT_FILES)})"
    if not any(all((path / name).is_file() for name in names) for names in TOKENIZER_FILES):
        return f"{path}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        return f"{path}: no image processor ({' or '.join(PROCESSOR_FILES)})"
    return None


class ClipScorer:
    """A CLIP model with its tokenizer and image processor, on one device."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        processor: CLIPImageProcessorPil,
        device: torch.device,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.device = device
        self.max_tokens: int = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: Path, device: torch.device | str) -> ClipScorer:
        """Load the CLIP folder at ``path`` (local files only) in fp32 on ``device``;
        ValueError saying why when :func:`clip_unavailable` finds it unusable."""
        reason = clip_unavailable(path)
        if reason is not None:
            raise ValueError(reason)
        import torch
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        target = torch.device(device)
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
        return cls(model.to(target).eval(), tokenizer, processor, target)

    def score(self, images: Sequence[Image], texts: Sequence[str]) -> list[float]:
        """The CLIP score of each image against the text at the same position."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: pair them one to one")
        if not images:
            return []
        import torch

        text = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens,
            return_tensors="pt",
        )  # fmt: skip
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            output = self.model(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
                pixel_values=pixels.to(self.device),
            )
        # CLIPModel returns both embeddings L2-normalised: their dot product is the cosine.
        cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
        return (SCORE_SCALE * cosine).clamp(min=0.0).tolist()
