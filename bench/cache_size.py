"""Cache size: bytes on disk per training sample, against storing embeddings padded to 300.

Builds a real cache (shards + index, through the same writer ``darkroom encode`` uses) of a
few hundred synthetic samples at the real 1024 px shapes:

* a latent of 4 x 128 x 128 in float16: the VAE posterior MEAN times the scaling factor, one
  tensor per photo (neither a random draw nor mean + std; the lead's docs say why);
* a T5 embedding 4096 wide in bfloat16, unpadded, at a caption length drawn from
  normal(120, 35) clipped to [20, 300] tokens (120 is the design's planning figure);
* the one shared empty-caption embedding used for caption dropout (1 token, EOS).

The baseline is what a naive cache would hold per sample: the embedding padded to the
300-token maximum plus the latent, both 16-bit.  The figure is (shards + index) / samples
divided by that baseline.

    python bench/cache_size.py [--samples 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.cache import EMPTY_TEXT_META, Cache, latent_key, text_key  # noqa: E402

TARGET_RATIO = 0.5
LATENT_SHAPE = (4, 128, 128)  # 1024 x 1024 bucket, VAE downscale 8
TEXT_WIDTH = 4096  # T5-XXL d_model
MAX_TOKENS = 300
TOKENS_MEAN, TOKENS_SD = 120, 35
TOKENS_MIN = 20
EMPTY_CAPTION_TOKENS = 1
BYTES_16BIT = 2
SEED = 6
BUCKET = "1024x1024"
VAE_ID = "bench-vae"
ENCODER_ID = "bench-t5"
MIB = 1024 * 1024


def caption_lengths(count: int) -> list[int]:
    """Realistic caption token counts."""
    rng = np.random.default_rng(SEED)
    drawn = rng.normal(TOKENS_MEAN, TOKENS_SD, size=count).round()
    return [int(tokens) for tokens in np.clip(drawn, TOKENS_MIN, MAX_TOKENS)]


def build(root: Path, lengths: list[int]) -> None:
    """Fill a cache with one latent, one caption embedding and one sample per length."""
    generator = torch.Generator().manual_seed(SEED)
    cache = Cache.open(root, create=True)
    empty_key = text_key("", ENCODER_ID, MAX_TOKENS, "bfloat16")
    with cache.writer() as writer:
        writer.add_text(empty_key, torch.randn((EMPTY_CAPTION_TOKENS, TEXT_WIDTH)).bfloat16())
        for index, tokens in enumerate(lengths):
            lkey = latent_key(f"photo-{index}", BUCKET, "cover-center", VAE_ID, "float16")
            tkey = text_key(f"caption {index}", ENCODER_ID, MAX_TOKENS, "bfloat16")
            latent = torch.randn(LATENT_SHAPE, generator=generator).half()
            text = torch.randn((tokens, TEXT_WIDTH), generator=generator).bfloat16()
            writer.add_latent(lkey, latent, bucket=BUCKET, source_key=f"photo-{index}")
            writer.add_text(tkey, text)
            writer.set_sample(
                f"asset-{index}",
                source_key=f"photo-{index}",
                latent_key=lkey,
                text_key=tkey,
                bucket=BUCKET,
            )
    cache.set_meta(EMPTY_TEXT_META, empty_key)
    cache.close()


def on_disk(root: Path) -> int:
    """Bytes of every file in the cache folder (shards, index, lock files)."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    lengths = caption_lengths(args.samples)
    baseline = MAX_TOKENS * TEXT_WIDTH * BYTES_16BIT + int(np.prod(LATENT_SHAPE)) * BYTES_16BIT
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        root = Path(scratch) / "cache"
        build(root, lengths)
        with Cache.open(root) as cache:
            stats = cache.stats()
            assert cache.verify(deep=False).ok
        total = on_disk(root)
    per_sample = total / stats.samples
    ratio = per_sample / baseline
    print(f"samples: {stats.samples}, caption tokens mean {np.mean(lengths):.1f}"
          f" (min {min(lengths)}, max {max(lengths)})")  # fmt: skip
    print(f"cache on disk: {total / MIB:.1f} MiB in {stats.shards} shards + index")
    print(f"per sample: {per_sample / MIB:.3f} MiB stored vs {baseline / MIB:.3f} MiB baseline"
          f" (300-token padded embedding + latent, 16-bit)")  # fmt: skip
    print(f"cache_size: {ratio:.2f}x (target: <= {TARGET_RATIO}x)")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
