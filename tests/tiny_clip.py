"""A tiny but real CLIP model folder, built at test time (nothing is downloaded).

Laid out as a download of ``openai/clip-vit-large-patch14`` would be after
``save_pretrained``: ``config.json`` + ``model.safetensors`` (a 1-layer text and vision
transformer of width 16), a CLIP BPE tokenizer whose vocabulary is made on the spot
(letters, digits, a few merges, CLIP's start and end tokens) and saved as ``tokenizer.json``,
and an image processor at 32 px (``preprocessor_config.json``).  Seeded: two builds are
identical.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Random weights; this seed gives the test pairs cosines of both signs (so the clamp at 0 of
# CLIPScore is exercised as well as positive scores).
SEED = 3
WIDTH = 16
FEED_FORWARD = 32
LAYERS = 1
HEADS = 2
PROJECTION = 8
TEXT_POSITIONS = 16  # CLIP's 77, shrunk: long prompts are truncated to this
IMAGE_SIZE = 32
PATCH = 8
START, END = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
CHARACTERS = string.ascii_lowercase + string.digits + ".,'-"
MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n"), ("e", "r</w>"))


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary (each character alone and word-final, merged pieces, the two
    special tokens) and its merges."""
    pieces = [*CHARACTERS, *(c + WORD_END for c in CHARACTERS)]
    pieces += [left + right for left, right in MERGES]
    pieces += [START, END]
    return {piece: index for index, piece in enumerate(pieces)}, list(MERGES)


def build_tiny_clip(root: Path) -> Path:
    """Write a tiny CLIP folder (model, tokenizer, image processor) at ``root``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    shape = {
        "hidden_size": WIDTH, "intermediate_size": FEED_FORWARD, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "projection_dim": PROJECTION,
    }  # fmt: skip
    config = CLIPConfig(
        text_config={
            **shape, "vocab_size": len(vocab), "max_position_embeddings": TEXT_POSITIONS,
            "bos_token_id": vocab[START], "eos_token_id": vocab[END], "pad_token_id": vocab[END],
        },
        vision_config={**shape, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        projection_dim=PROJECTION,
    )  # fmt: skip
    torch.manual_seed(SEED)
    CLIPModel(config).eval().save_pretrained(root)
    tokenizer.save_pretrained(root)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor.save_pretrained(root)
    return root
