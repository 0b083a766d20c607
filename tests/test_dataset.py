"""Reading the cache: the dataset, the bucket batch sampler (determinism, resume), collate."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from trainer.cache import Cache, CacheError, CacheWriter, latent_key, text_key
from trainer.dataset import BucketBatchSampler, CacheDataset, CachedSample, collate

TEXT_WIDTH = 8
# Latent shapes per bucket name (tiny stand-ins for the real 128x128, 144x112, 112x144).
BUCKET_SHAPES = {"1024x1024": (4, 4, 4), "1152x896": (4, 4, 3), "896x1152": (4, 3, 4)}
BUCKET_NAMES = tuple(BUCKET_SHAPES)
SAMPLES = 23
BATCH = 4


def tokens_of(index: int) -> int:
    """A caption length that varies from sample to sample."""
    return 1 + index % 7


def add_sample(writer: CacheWriter, index: int) -> None:
    """Sample ``asset-<index>`` in bucket index % 3, its tensors derived from ``index``."""
    bucket = BUCKET_NAMES[index % len(BUCKET_NAMES)]
    generator = torch.Generator().manual_seed(index)
    latent = torch.randn(BUCKET_SHAPES[bucket], generator=generator).half()
    text = torch.randn((tokens_of(index), TEXT_WIDTH), generator=generator).bfloat16()
    lkey = latent_key(f"sha-{index}", bucket, "cover-center", "vae", "float16")
    tkey = text_key(f"caption {index}", "t5", 300, "bfloat16")
    writer.add_latent(lkey, latent, bucket=bucket, source_key=f"src-{index}")
    writer.add_text(tkey, text)
    writer.set_sample(
        f"asset-{index}", source_key=f"src-{index}", latent_key=lkey, text_key=tkey, bucket=bucket
    )


def add_samples(cache: Cache, indices: range) -> None:
    """Append and commit several samples."""
    with cache.writer() as writer:
        for index in indices:
            add_sample(writer, index)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    """A cache with SAMPLES samples spread over three buckets."""
    opened = Cache.open(tmp_path / "cache", create=True)
    add_samples(opened, range(SAMPLES))
    yield opened
    opened.close()


def take(sampler: BucketBatchSampler, count: int) -> list[list[int]]:
    """The next ``count`` batches of a sampler's iterator."""
    return list(itertools.islice(iter(sampler), count))


def epoch_length(sampler: BucketBatchSampler) -> int:
    return len(sampler.plan())


def test_dataset_reads_samples_by_id(cache: Cache) -> None:
    dataset = CacheDataset(cache)
    assert len(dataset) == SAMPLES
    ids = dataset.ids()
    rows = cache.live_samples()
    for index in range(SAMPLES):
        item = dataset[rows[f"asset-{index}"].id]
        assert item.bucket == BUCKET_NAMES[index % 3]
        assert torch.equal(item.latent, cache.load_latent(rows[f"asset-{index}"].latent_key))
        assert item.text.shape == (tokens_of(index), TEXT_WIDTH) and item.tokens == tokens_of(index)
    with pytest.raises(CacheError):
        dataset[max(ids) + 100]


def test_batches_come_from_one_bucket_and_cover_the_epoch_once(cache: Cache) -> None:
    sampler = BucketBatchSampler(cache, batch_size=BATCH, seed=1)
    dataset = CacheDataset(cache)
    batches = take(sampler, epoch_length(sampler))
    seen = [sample_id for batch in batches for sample_id in batch]
    assert sorted(seen) == dataset.ids()
    for batch in batches:
        assert 1 <= len(batch) <= BATCH
        assert len({dataset[sample_id].bucket for sample_id in batch}) == 1
    dropping = BucketBatchSampler(cache, batch_size=BATCH, seed=1, drop_last=True)
    assert all(len(batch) == BATCH for batch in take(dropping, epoch_length(dropping)))


def test_the_schedule_depends_only_on_seed_and_epoch(cache: Cache) -> None:
    first = BucketBatchSampler(cache, batch_size=BATCH, seed=7)
    length = epoch_length(first)
    two_epochs = take(first, 2 * length)
    again = take(BucketBatchSampler(cache, batch_size=BATCH, seed=7), 2 * length)
    assert two_epochs == again
    assert two_epochs[:length] != two_epochs[length:]  # epochs differ
    other_seed = take(BucketBatchSampler(cache, batch_size=BATCH, seed=8), length)
    assert other_seed != two_epochs[:length]


@pytest.mark.parametrize("stop_after", [0, 3, 6, 9])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(
    cache: Cache, stop_after: int
) -> None:
    reference = take(BucketBatchSampler(cache, batch_size=BATCH, seed=3), 12)
    interrupted = BucketBatchSampler(cache, batch_size=BATCH, seed=3)
    assert take(interrupted, stop_after) == reference[:stop_after]
    state = interrupted.state_dict()
    resumed = BucketBatchSampler(cache, batch_size=BATCH, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - stop_after) == reference[stop_after:]


def test_a_state_from_another_seed_or_batch_size_is_refused(cache: Cache) -> None:
    state = BucketBatchSampler(cache, batch_size=BATCH, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(cache, batch_size=BATCH, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(cache, batch_size=BATCH + 1, seed=3).load_state_dict(state)


def test_samples_added_mid_epoch_join_at_the_next_epoch(cache: Cache) -> None:
    untouched = Cache.open(Path(str(cache.root) + "-copy"), create=True)
    add_samples(untouched, range(SAMPLES))  # same samples, same ids, never grows
    reference = BucketBatchSampler(untouched, batch_size=BATCH, seed=5)
    length = epoch_length(reference)
    expected_epoch = take(reference, length)

    sampler = BucketBatchSampler(cache, batch_size=BATCH, seed=5)
    head = take(sampler, 3)
    add_samples(cache, range(SAMPLES, SAMPLES + 6))
    state = sampler.state_dict()
    rest = take(sampler, length - 3)
    assert head + rest == expected_epoch  # the current epoch did not change

    resumed = BucketBatchSampler(cache, batch_size=BATCH, seed=5)
    resumed.load_state_dict(state)
    assert take(resumed, length - 3) == rest  # nor does a resumed one

    new_ids = {row.id for ref, row in cache.live_samples().items() if int(ref[6:]) >= SAMPLES}
    next_epoch = take(sampler, epoch_length(sampler))
    seen = {sample_id for batch in next_epoch for sample_id in batch}
    assert new_ids <= seen
    untouched.close()


def test_retired_samples_leave_at_the_next_epoch(cache: Cache) -> None:
    sampler = BucketBatchSampler(cache, batch_size=BATCH, seed=2)
    length = epoch_length(sampler)
    first = take(sampler, length)
    gone = cache.live_samples()["asset-0"].id
    cache.retire(["asset-0"])
    assert gone in {sample_id for batch in first for sample_id in batch}
    second = take(sampler, epoch_length(sampler))
    assert gone not in {sample_id for batch in second for sample_id in batch}


def test_collate_pads_text_and_masks_padding() -> None:
    def item(sample_id: int, tokens: int) -> CachedSample:
        text = torch.full((tokens, TEXT_WIDTH), float(sample_id), dtype=torch.bfloat16)
        latent = torch.full((4, 2, 2), float(sample_id), dtype=torch.float16)
        return CachedSample(sample_id, latent, text, tokens, "1024x1024")

    batch = collate([item(1, 3), item(2, 5), item(3, 1)])
    assert batch.sample_ids == [1, 2, 3]
    assert batch.latents.shape == (3, 4, 2, 2) and batch.latents.dtype == torch.float16
    assert batch.text.shape == (3, 5, TEXT_WIDTH) and batch.text.dtype == torch.bfloat16
    assert batch.mask.dtype == torch.long
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert torch.all(batch.text[0, :3] == 1) and torch.all(batch.text[0, 3:] == 0)
    assert torch.all(batch.text[2, 1:] == 0)
    mixed = CachedSample(4, torch.zeros((4, 2, 3), dtype=torch.float16), item(4, 1).text, 1, "x")
    with pytest.raises(ValueError, match="one bucket"):
        collate([item(1, 3), mixed])


def test_dataloader_with_workers_reads_new_samples(cache: Cache) -> None:
    dataset = CacheDataset(cache)  # built before the new samples exist
    add_samples(cache, range(SAMPLES, SAMPLES + 3))
    sampler = BucketBatchSampler(cache, batch_size=BATCH, seed=9)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    seen: set[int] = set()
    for batch in itertools.islice(iter(loader), epoch_length(sampler)):
        assert batch.latents.shape[0] == batch.text.shape[0] == len(batch.sample_ids)
        assert batch.mask.sum(dim=1).tolist() == [
            tokens_of(int(ref[6:]))
            for sample_id in batch.sample_ids
            for ref, row in cache.live_samples().items()
            if row.id == sample_id
        ]
        seen.update(batch.sample_ids)
    assert len(seen) == SAMPLES + 3


def test_a_resume_after_gc_skips_only_the_collected_samples(cache: Cache) -> None:
    reference = take(BucketBatchSampler(cache, batch_size=BATCH, seed=4), 6)
    interrupted = BucketBatchSampler(cache, batch_size=BATCH, seed=4)
    take(interrupted, 2)
    state = interrupted.state_dict()
    victim = reference[3][0]
    ref = next(ref for ref, row in cache.live_samples().items() if row.id == victim)
    cache.retire([ref])
    cache.gc()  # its latent and text are gone for good
    resumed = BucketBatchSampler(cache, batch_size=BATCH, seed=4)
    resumed.load_state_dict(state)
    expected = [[i for i in batch if i != victim] for batch in reference[2:]]
    assert take(resumed, len(expected)) == [batch for batch in expected if batch]
