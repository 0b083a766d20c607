"""Reading the cache for training: a map-style dataset, a bucket batch sampler, collate.

The sampler yields lists of sample ids that all share one bucket (so latents stack), the
dataset turns an id into tensors, and :func:`collate` pads the unpadded text embeddings of a
batch to its longest caption with an attention mask::

    loader = DataLoader(CacheDataset(cache), batch_sampler=BucketBatchSampler(cache,
                        batch_size=4, seed=42), collate_fn=collate)

Epoch ``e``'s plan is fixed when the epoch starts: the samples live at the cache generation
``g`` snapshotted then (one SELECT on the index), grouped by bucket, shuffled by a generator
seeded from a sha256 of ``(seed, e)`` (stable across processes and machines), chunked into
batches whose order is shuffled again.  Samples appended later join at the next epoch, so a
run resumed from :meth:`BucketBatchSampler.state_dict` schedules exactly what an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.cache import Cache, CacheError, SampleLocation, ShardReader

SEED_BYTES = 16  # bits of the sha256 that seed the epoch's PCG64 generator (128)
STATE_KEYS = ("seed", "batch_size", "drop_last", "epoch", "generation", "position")


@dataclass(frozen=True)
class CachedSample:
    """One sample's tensors: latent (C, h, w) and unpadded text embedding (tokens, width)."""

    sample_id: int
    latent: torch.Tensor
    text: torch.Tensor
    tokens: int
    bucket: str


@dataclass
class Batch:
    """A same-bucket batch: latents (B, C, h, w), text (B, Tmax, D) zero-padded, mask (B, Tmax)
    with 1 for real tokens and 0 for padding (long, as the transformer's attention mask)."""

    sample_ids: list[int]
    latents: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor


class CacheDataset:
    """Map-style dataset indexed by sample id (not position); torch Dataset compatible.

    Construction reads the live samples' tensor locations with one SELECT and never scans
    shards, so startup grows only with the index.  An id it did not see then (a sample
    appended since, which the sampler schedules from the next epoch) is looked up on first
    use.  Safe to hand to DataLoader workers: index connection and shard handles are
    reopened in each process.
    """

    def __init__(self, cache: Cache) -> None:
        self.root = cache.root
        self._locations = cache.sample_locations()
        self._reader = ShardReader(cache.shards)
        self._index: Cache | None = None  # opened on first look-up, one per process
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._locations)

    def ids(self) -> list[int]:
        """The ids of the samples this dataset knows, ascending."""
        return sorted(self._locations)

    def refresh(self) -> None:
        """Re-read the live samples from the index (e.g. at an epoch boundary)."""
        self._locations = self._cache().sample_locations()

    def __getitem__(self, sample_id: int) -> CachedSample:
        location = self._locations.get(sample_id) or self._look_up(sample_id)
        return CachedSample(
            sample_id=sample_id,
            latent=self._reader.tensor(location.latent_shard, location.latent_tensor),
            text=self._reader.tensor(location.text_shard, location.text_tensor),
            tokens=location.tokens,
            bucket=location.bucket,
        )

    def _look_up(self, sample_id: int) -> SampleLocation:
        found = self._cache().sample_locations([sample_id])
        if sample_id not in found:
            raise CacheError(f"sample {sample_id} is not in the cache at {self.root}")
        self._locations[sample_id] = found[sample_id]
        return found[sample_id]

    def _cache(self) -> Cache:
        """This process's index connection (a forked worker opens its own)."""
        if self._index is None or self._pid != os.getpid():
            self._index = Cache.open(self.root)
            self._reader.forget()
            self._pid = os.getpid()
        return self._index

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_index"] = None
        state["_reader"] = ShardReader(self._reader.shards, capacity=self._reader.capacity)
        return state


def collate(items: list[CachedSample]) -> Batch:
    """Stack a same-bucket batch and pad its text to the longest caption in it."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    buckets = {item.bucket for item in items}
    if len(buckets) > 1:
        raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
    longest = max(item.tokens for item in items)
    width = items[0].text.shape[1]
    text = items[0].text.new_zeros((len(items), longest, width))
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        text[row, : item.tokens] = item.text
        mask[row, : item.tokens] = 1
    return Batch(
        sample_ids=[item.sample_id for item in items],
        latents=torch.stack([item.latent for item in items]),
        text=text,
        mask=mask,
    )


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """A generator fixed by (seed, epoch) alone, the same in every process (no hash())."""
    digest = hashlib.sha256(f"darkroom-sampler/{seed}/{epoch}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:SEED_BYTES], "big")))


def plan_epoch(
    members: list[tuple[int, str, int]], *, seed: int, epoch: int, batch_size: int, drop_last: bool
) -> list[list[int]]:
    """Batches of one epoch from (id, bucket, present) members (see Cache.members_at).

    Members whose tensors are gone (gc ran between a run and its resume) are removed from
    their batches only after planning, so everything else keeps its place.
    """
    rng = epoch_generator(seed, epoch)
    by_bucket: dict[str, list[int]] = {}
    for sample_id, bucket, _present in members:
        by_bucket.setdefault(bucket, []).append(sample_id)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        ids = np.array(sorted(by_bucket[bucket]), dtype=np.int64)
        shuffled = ids[rng.permutation(len(ids))].tolist()
        for start in range(0, len(shuffled), batch_size):
            chunk = shuffled[start : start + batch_size]
            if len(chunk) == batch_size or not drop_last:
                batches.append(chunk)
    order = rng.permutation(len(batches)).tolist()
    absent = {sample_id for sample_id, _bucket, present in members if not present}
    return [[i for i in batches[index] if i not in absent] for index in order]


class BucketBatchSampler:
    """Infinite batch sampler over the cache: same-bucket batches, epoch after epoch.

    ``state_dict()`` counts the batches this iterator has handed out; with a DataLoader that
    prefetches, save the state as it was when the batch being trained on was drawn.
    """

    def __init__(self, cache: Cache, *, batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.generation: int | None = None  # snapshotted when the epoch's plan is made
        self.position = 0  # batches of this epoch already handed out
        self._plan: list[list[int]] | None = None

    def plan(self) -> list[list[int]]:
        """The batches of the epoch the next batch comes from (an epoch whose batches were all
        handed out gives way to the next one; its plan is made and its generation snapshotted
        on first need)."""
        while True:
            if self._plan is None:
                self._plan = self._make_plan()
            if self.position < len(self._plan):
                return self._plan
            self.epoch += 1
            self.position = 0
            self.generation = None
            self._plan = None

    def _make_plan(self) -> list[list[int]]:
        if self.generation is None:
            self.generation = self.cache.generation
        elif self.generation > self.cache.generation:
            raise CacheError(
                f"the saved sampler state is at cache generation {self.generation}, but the"
                f" cache at {self.cache.root} is only at {self.cache.generation}"
            )
        plan = plan_epoch(
            self.cache.members_at(self.generation),
            seed=self.seed,
            epoch=self.epoch,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )
        if not any(plan):
            raise CacheError(f"no batch to train on in the cache at {self.cache.root}")
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            plan = self.plan()
            batch = plan[self.position]
            self.position += 1
            if batch:
                yield list(batch)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this sampler is."""
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the seed, batch size and drop_last must match."""
        for key in ("seed", "batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler"
                    f" {key}={getattr(self, key)!r}: the schedule would not continue exactly"
                )
        self.epoch = int(state["epoch"])
        generation = state["generation"]
        self.generation = None if generation is None else int(generation)
        self.position = int(state["position"])
        self._plan = None
