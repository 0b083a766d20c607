"""Cache read throughput at 1024 px shapes, and startup time with 100,000 index entries.

Throughput: a cache of 10,000 synthetic samples in the 1024x1024 bucket, each with its own
4 x 128 x 128 float16 latent.  Caption embeddings (4096 wide, bfloat16, unpadded, lengths
drawn from normal(120, 35) clipped to [20, 300]) are shared: 500 distinct ones, so the
folder stays under ~2 GB instead of ~11 GB; every sample still reads a full embedding, and
reading is what the figure measures.  Samples go through the real path a trainer uses:
BucketBatchSampler -> CacheDataset[id] -> collate (padding + mask), in the main process.
The cache was just written, so the figure is WARM-cache (dropping the page cache needs root,
which this machine does not give); a cold read is bound by the disk instead.

Startup: a second cache with 100,000 samples (tiny tensors: what is measured is the index),
timed from Cache.open through CacheDataset and BucketBatchSampler construction to the first
batch collated (which plans the epoch: one SELECT of the members).

    python bench/cache_read.py [--samples 10000] [--read 3000] [--entries 100000]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.cache import Cache, CacheWriter, latent_key, text_key  # noqa: E402
from trainer.dataset import BucketBatchSampler, CacheDataset, collate  # noqa: E402

TARGET_SAMPLES_PER_S = 200
TARGET_STARTUP_S = 3.0
LATENT_SHAPE = (4, 128, 128)
TEXT_WIDTH = 4096
DISTINCT_TEXTS = 500
TOKENS_MEAN, TOKENS_SD, TOKENS_MIN, TOKENS_MAX = 120, 35, 20, 300
TINY_LATENT = (4, 2, 2)
TINY_TEXT_TOKENS, TINY_TEXT_WIDTH = 2, 4
STARTUP_TEXTS = 1000
STARTUP_RUNS = 3
TENSORS_PER_SHARD = 2000
BATCH_SIZE = 8
LOADER_WORKERS = 2
SEED = 6
BUCKET = "1024x1024"
DISK_MARGIN = 1.5  # refuse to start unless free space exceeds the cache size by this factor
GIB = 1024**3
BYTES_16BIT = 2


def add_sample(writer: CacheWriter, index: int, latent: torch.Tensor, text_index: int) -> None:
    """Sample ``asset-<index>`` with its latent and the shared caption ``text_index``."""
    lkey = latent_key(f"photo-{index}", BUCKET, "cover-center", "bench-vae", "float16")
    tkey = text_key(f"caption {text_index}", "bench-t5", TOKENS_MAX, "bfloat16")
    writer.add_latent(lkey, latent, bucket=BUCKET, source_key=f"photo-{index}")
    writer.set_sample(
        f"asset-{index}", source_key=f"photo-{index}", latent_key=lkey, text_key=tkey, bucket=BUCKET
    )


def add_texts(writer: CacheWriter, count: int, lengths: list[int], width: int) -> None:
    """The shared caption embeddings."""
    generator = torch.Generator().manual_seed(SEED)
    for text_index in range(count):
        tokens = lengths[text_index % len(lengths)]
        embedding = torch.randn((tokens, width), generator=generator).bfloat16()
        writer.add_text(
            text_key(f"caption {text_index}", "bench-t5", TOKENS_MAX, "bfloat16"), embedding
        )


def caption_lengths() -> list[int]:
    """Realistic caption token counts, one per distinct embedding."""
    drawn = np.random.default_rng(SEED).normal(TOKENS_MEAN, TOKENS_SD, DISTINCT_TEXTS).round()
    return [int(tokens) for tokens in np.clip(drawn, TOKENS_MIN, TOKENS_MAX)]


def build_read_cache(root: Path, samples: int, lengths: list[int]) -> float:
    """The 1024 px cache; returns the seconds it took to write."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(SEED)
    with Cache.open(root, create=True) as cache, cache.writer() as writer:
        add_texts(writer, DISTINCT_TEXTS, lengths, TEXT_WIDTH)
        for index in range(samples):
            latent = torch.randn(LATENT_SHAPE, generator=generator).half()
            add_sample(writer, index, latent, index % DISTINCT_TEXTS)
    return time.perf_counter() - started


def build_startup_cache(root: Path, entries: int) -> None:
    """100,000 samples with tiny tensors: a big index; shards hold as many tensors as real
    256 MiB shards of 1024 px latents would (~2,000), so their headers are realistic."""
    shard_bytes = TENSORS_PER_SHARD * int(np.prod(TINY_LATENT)) * BYTES_16BIT
    with (
        Cache.open(root, create=True) as cache,
        cache.writer(max_shard_bytes=shard_bytes) as writer,
    ):
        add_texts(writer, STARTUP_TEXTS, [TINY_TEXT_TOKENS], TINY_TEXT_WIDTH)
        latents = torch.randn((entries, *TINY_LATENT)).half()
        for index in range(entries):
            add_sample(writer, index, latents[index], index % STARTUP_TEXTS)


def read_rate(root: Path, count: int, workers: int) -> float:
    """Samples per second through sampler -> dataset -> collate, in a DataLoader with
    ``workers`` processes, or with 0 in this process on one intra-op thread (what a DataLoader
    worker uses: two OpenMP threads collapse when another process holds the other core)."""
    threads = torch.get_num_threads()
    with Cache.open(root) as cache:
        dataset = CacheDataset(cache)
        sampler = BucketBatchSampler(cache, batch_size=BATCH_SIZE, seed=SEED)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        batches = iter(loader)
        next(batches)  # workers started, first batch in
        torch.set_num_threads(1 if workers == 0 else threads)
        started = time.perf_counter()
        read = sum(
            len(batch.sample_ids) for batch in itertools.islice(batches, count // BATCH_SIZE)
        )
        seconds = time.perf_counter() - started
        torch.set_num_threads(threads)
        del batches
    return read / seconds


def startup_seconds(root: Path) -> float:
    """Cache.open + CacheDataset + BucketBatchSampler + first batch collated."""
    started = time.perf_counter()
    with Cache.open(root) as cache:
        dataset = CacheDataset(cache)
        sampler = BucketBatchSampler(cache, batch_size=BATCH_SIZE, seed=SEED)
        collate([dataset[sample_id] for sample_id in next(iter(sampler))])
        seconds = time.perf_counter() - started
        assert len(dataset) == cache.stats().samples
    return seconds


def needed_bytes(samples: int, lengths: list[int]) -> int:
    latents = samples * int(np.prod(LATENT_SHAPE)) * BYTES_16BIT
    return latents + sum(lengths) * TEXT_WIDTH * BYTES_16BIT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--read", type=int, default=3_000)
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    lengths = caption_lengths()
    needed = needed_bytes(args.samples, lengths)
    free = shutil.disk_usage(REPO).free
    print(f"cache size {needed / GIB:.2f} GiB, free disk {free / GIB:.1f} GiB")
    if free < needed * DISK_MARGIN:
        print("cache_read: not run, not enough free disk")
        return 1
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        build_s = build_read_cache(Path(scratch) / "read", args.samples, lengths)
        print(f"built {args.samples} samples in {build_s:.0f} s; reading {args.read} (warm cache)")
        in_process = read_rate(Path(scratch) / "read", args.read, workers=0)
        print(f"in-process, one thread: {in_process:.0f} samples/s")
        rate = read_rate(Path(scratch) / "read", args.read, workers=LOADER_WORKERS)
        print(f"DataLoader, {LOADER_WORKERS} workers: {rate:.0f} samples/s")
        shutil.rmtree(Path(scratch) / "read")
        build_startup_cache(Path(scratch) / "startup", args.entries)
        startup = max(startup_seconds(Path(scratch) / "startup") for _ in range(STARTUP_RUNS))
    print(f"startup: {startup:.2f} s (worst of {STARTUP_RUNS})")
    print(f"cache_read: {rate:.0f} samples/s, startup {startup:.2f} s at {args.entries} entries"
          f" (target: >= {TARGET_SAMPLES_PER_S} samples/s, <= {TARGET_STARTUP_S:g} s)")  # fmt: skip
    return 0 if rate >= TARGET_SAMPLES_PER_S and startup <= TARGET_STARTUP_S else 1


if __name__ == "__main__":
    sys.exit(main())
