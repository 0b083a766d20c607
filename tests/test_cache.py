"""The training cache: appends, atomicity, replacement, gc, verify, copying, kill -9."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer.cache import (
    EMPTY_TEXT_META,
    INDEX_NAME,
    SHARDS_DIR,
    Cache,
    CacheError,
    CacheWriter,
    latent_key,
    text_key,
)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "1024x1024"
OTHER_BUCKET = "1152x896"
LATENT_SHAPE = (4, 8, 8)
TEXT_WIDTH = 16
SMALL_SHARD = 2048  # bytes: a few tensors per shard, so appends roll over often


def make_latent(seed: int, shape: tuple[int, ...] = LATENT_SHAPE) -> torch.Tensor:
    """A deterministic float16 latent."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()


def make_text(seed: int, tokens: int) -> torch.Tensor:
    """A deterministic bfloat16 embedding of ``tokens`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((tokens, TEXT_WIDTH), generator=generator).bfloat16()


def keys_for(seed: int, bucket: str = BUCKET) -> tuple[str, str]:
    """The latent and text keys add_sample uses for ``seed``."""
    lkey = latent_key(f"sha-{seed}", bucket, "cover-center", "vae", "float16")
    return lkey, text_key(f"caption {seed}", "t5", 300, "bfloat16")


def add_sample(
    writer: CacheWriter, ref: str, seed: int, *, tokens: int = 5, bucket: str = BUCKET
) -> None:
    """Add a latent, a text and a sample tying them to ``ref`` (keys derived from ``seed``)."""
    lkey, tkey = keys_for(seed, bucket)
    writer.add_latent(lkey, make_latent(seed), bucket=bucket, source_key=f"src-{ref}")
    writer.add_text(tkey, make_text(seed, tokens))
    writer.set_sample(ref, source_key=f"src-{ref}", latent_key=lkey, text_key=tkey, bucket=bucket)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    """An empty cache, closed after the test."""
    opened = Cache.open(tmp_path / "cache", create=True)
    yield opened
    opened.close()


def shard_files(cache: Cache) -> list[Path]:
    """Every file under shards/."""
    return sorted((cache.root / SHARDS_DIR).iterdir())


def test_append_commit_and_load_round_trip(cache: Cache) -> None:
    with cache.writer() as writer:
        add_sample(writer, "asset-1", 1, tokens=7)
        add_sample(writer, "asset-2", 2, tokens=3)
    assert cache.generation == 1
    reopened = Cache.open(cache.root)
    samples = reopened.live_samples()
    assert set(samples) == {"asset-1", "asset-2"}
    row = samples["asset-1"]
    assert reopened.latent_for_source("src-asset-1") == row.latent_key
    assert reopened.latent_bucket(row.latent_key) == BUCKET
    assert reopened.latent_bucket("unknown") is None and reopened.latent_for_source("x") is None
    assert reopened.has_latent(row.latent_key) and reopened.has_text(row.text_key)
    latent = reopened.load_latent(row.latent_key)
    assert latent.dtype == torch.float16 and torch.equal(latent, make_latent(1))
    text = reopened.load_text(row.text_key)
    assert text.dtype == torch.bfloat16 and torch.equal(text, make_text(1, 7))
    stats = reopened.stats()
    assert (stats.samples, stats.latents, stats.texts, stats.shards) == (2, 2, 2, 1)
    assert stats.by_bucket == {BUCKET: 2}
    reopened.close()


def test_keys_cover_every_field_and_are_stable() -> None:
    base = ("abc", BUCKET, "cover-center/lanczos/1024x1024+0+0", "vae@1", "float16")
    assert latent_key(*base) == latent_key(*base)
    for index in range(len(base)):
        changed = list(base)
        changed[index] += "x"
        assert latent_key(*changed) != latent_key(*base)
    assert text_key("a cat", "t5", 300, "bfloat16") != text_key("a cat ", "t5", 300, "bfloat16")
    assert text_key("a cat", "t5", 300, "bfloat16") != text_key("a cat", "t5", 120, "bfloat16")


def test_only_16_bit_tensors_of_the_right_rank_are_accepted(cache: Cache) -> None:
    with cache.writer() as writer:
        with pytest.raises(CacheError, match="float16 or bfloat16"):
            writer.add_latent("k", torch.zeros(LATENT_SHAPE), bucket=BUCKET, source_key="s")
        with pytest.raises(CacheError, match="dimensions"):
            writer.add_text("k", torch.zeros(TEXT_WIDTH, dtype=torch.bfloat16))
        add_sample(writer, "asset-1", 1)
        with pytest.raises(CacheError, match="but its latent is for"):
            lkey, tkey = keys_for(1)
            writer.set_sample("r", source_key="s", latent_key=lkey, text_key=tkey, bucket="x")
        with pytest.raises(CacheError, match="neither stored nor added"):
            writer.set_sample(
                "r", source_key="s", latent_key="nope", text_key="nope", bucket=BUCKET
            )
    assert list(cache.live_samples()) == ["asset-1"]


def test_exception_inside_the_writer_leaves_nothing_visible(cache: Cache) -> None:
    with pytest.raises(RuntimeError), cache.writer(max_shard_bytes=SMALL_SHARD) as writer:
        for index in range(6):  # enough bytes to flush shards before the failure
            add_sample(writer, f"asset-{index}", index)
        raise RuntimeError("encoder crashed")
    assert cache.generation == 0
    assert cache.live_samples() == {}
    assert shard_files(cache) == []  # the shards it had flushed were deleted
    with cache.writer() as writer:  # the lock was released
        add_sample(writer, "asset-0", 0)
    assert list(cache.live_samples()) == ["asset-0"]


def test_shards_roll_over_at_the_size_limit(cache: Cache) -> None:
    with cache.writer(max_shard_bytes=SMALL_SHARD) as writer:
        for index in range(10):
            add_sample(writer, f"asset-{index}", index, tokens=10)
    files = shard_files(cache)
    assert len(files) == cache.stats().shards >= 4
    assert all(path.suffix == ".safetensors" for path in files)
    index_mode = (cache.root / INDEX_NAME).stat().st_mode
    assert all(path.stat().st_mode == index_mode for path in files)
    for index, row in enumerate(cache.live_samples().values()):
        assert torch.equal(cache.load_latent(row.latent_key), make_latent(index))


def test_changed_keys_tombstone_the_old_row(cache: Cache) -> None:
    with cache.writer() as writer:
        add_sample(writer, "asset-1", 1)
    first = cache.live_samples()["asset-1"]
    with cache.writer() as writer:  # same keys again: nothing changes
        add_sample(writer, "asset-1", 1)
    assert cache.generation == 1
    with cache.writer() as writer:  # edited caption and photo: new keys
        add_sample(writer, "asset-1", 11)
    second = cache.live_samples()["asset-1"]
    assert second.id != first.id and second.latent_key != first.latent_key
    rows = sqlite3.connect(cache.root / INDEX_NAME).execute(
        "SELECT id, added_gen, removed_gen FROM samples ORDER BY id"
    )
    assert rows.fetchall() == [(first.id, 1, 2), (second.id, 2, None)]


def test_retire_tombstones_and_bumps_the_generation(cache: Cache) -> None:
    with cache.writer() as writer:
        for index in range(3):
            add_sample(writer, f"asset-{index}", index)
    assert cache.retire(["asset-0", "asset-2", "unknown"]) == 2
    assert list(cache.live_samples()) == ["asset-1"]
    assert cache.generation == 2
    assert cache.retire(["asset-0"]) == 0
    assert cache.generation == 2


def build_churned_cache(cache: Cache) -> None:
    """Ten samples in small shards, then most of them replaced or retired."""
    with cache.writer(max_shard_bytes=SMALL_SHARD) as writer:
        writer.add_text("empty", make_text(99, 1))
        for index in range(10):
            add_sample(writer, f"asset-{index}", index, tokens=8)
    cache.set_meta(EMPTY_TEXT_META, "empty")
    with cache.writer(max_shard_bytes=SMALL_SHARD) as writer:
        for index in range(3):
            add_sample(writer, f"asset-{index}", 100 + index, tokens=8)
    cache.retire([f"asset-{index}" for index in range(3, 9)])


def test_gc_drops_dead_entries_compacts_and_keeps_the_empty_caption(cache: Cache) -> None:
    build_churned_cache(cache)
    orphan = cache.root / SHARDS_DIR / "tmp-deadbeef.partial"
    orphan.write_bytes(b"half a shard")
    live = cache.live_samples()
    before = sum(path.stat().st_size for path in shard_files(cache))
    report = cache.gc()
    after = sum(path.stat().st_size for path in shard_files(cache))
    assert (report.latents_dropped, report.texts_dropped) == (9, 9)
    assert report.shards_rewritten >= 1 and report.orphans_removed == 1
    assert not orphan.exists()
    assert after < before and report.bytes_after < report.bytes_before
    assert cache.has_text("empty")
    assert cache.live_samples() == live
    for row in live.values():
        cache.load_latent(row.latent_key)
        cache.load_text(row.text_key)
    verified = cache.verify()
    assert verified.problems == [] and verified.notes == []
    assert cache.gc().files_removed == 0  # nothing more to do


def test_gc_under_a_reader_only_cleans_the_index(cache: Cache) -> None:
    build_churned_cache(cache)
    files = shard_files(cache)
    assert not cache.training_active()
    with cache.reading():
        assert cache.training_active()
        report = cache.gc()
        assert report.readers_active and report.latents_dropped == 9
        assert shard_files(cache) == files
    assert cache.gc().files_removed > 0
    assert cache.verify().ok


def test_gc_refuses_while_another_writer_appends(cache: Cache) -> None:
    other = Cache.open(cache.root)
    with other.writer(), pytest.raises(CacheError, match="writing"):
        cache.gc()
    other.close()


def populated(cache: Cache) -> Cache:
    """The fixture cache with six samples over several shards."""
    with cache.writer(max_shard_bytes=SMALL_SHARD) as writer:
        for index in range(6):
            add_sample(writer, f"asset-{index}", index)
    return cache


def first_shard(cache: Cache) -> Path:
    return shard_files(cache)[0]


def test_verify_detects_a_truncated_shard(cache: Cache) -> None:
    path = first_shard(populated(cache))
    assert cache.verify().ok
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 10)
    problems = cache.verify(deep=False).problems
    assert any("truncated" in problem for problem in problems)
    assert any("lost with shard" in problem for problem in problems)


def test_verify_detects_a_flipped_byte_only_when_deep(cache: Cache) -> None:
    path = first_shard(populated(cache))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))
    assert cache.verify(deep=False).ok
    assert any("sha256" in problem for problem in cache.verify(deep=True).problems)


def test_verify_detects_a_missing_shard_and_notes_orphans(cache: Cache) -> None:
    path = first_shard(populated(cache))
    path.unlink()
    (cache.root / SHARDS_DIR / "tmp-0001.partial").write_bytes(b"x")
    report = cache.verify()
    assert any("missing" in problem for problem in report.problems)
    assert len(report.notes) == 1 and "tmp-0001.partial" in report.notes[0]


def test_a_copied_cache_reads_back_everything(cache: Cache, tmp_path: Path) -> None:
    populated(cache)
    cache.set_meta("vae_scaling_factor:vae", "0.13025")
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(cache.root, copy)
    shutil.rmtree(cache.root)  # nothing may point back at the original
    moved = Cache.open(copy)
    assert moved.verify().ok
    assert moved.get_meta("vae_scaling_factor:vae") == "0.13025"
    for index, row in enumerate(moved.live_samples().values()):
        assert torch.equal(moved.load_latent(row.latent_key), make_latent(index))
        assert torch.equal(moved.load_text(row.text_key), make_text(index, 5))
    moved.close()


def test_open_refuses_a_missing_or_newer_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no cache"):
        Cache.open(tmp_path / "absent")
    Cache.open(tmp_path / "new", create=True).close()
    sqlite3.connect(tmp_path / "new" / INDEX_NAME).execute("PRAGMA user_version = 99")
    with pytest.raises(CacheError, match="newer"):
        Cache.open(tmp_path / "new")


# The child appends forever; after each commit it prints the refs that commit made durable.
APPENDER = """
import sys
from pathlib import Path
from tests.test_cache import add_sample
from trainer.cache import Cache
cache = Cache.open(Path(sys.argv[1]), create=True)
batch = int(sys.argv[2])
print("ready", flush=True)
while True:
    refs = [f"asset-{batch}-{index}" for index in range(3)]
    with cache.writer(max_shard_bytes=int(sys.argv[3])) as writer:
        for index, ref in enumerate(refs):
            add_sample(writer, ref, batch * 10 + index, tokens=1 + (batch + index) % 9)
    print(" ".join(refs), flush=True)
    batch += 1
"""
KILL_ROUNDS = 5
KILL_AFTER_S = (0.02, 0.4)


def seed_and_tokens(ref: str) -> tuple[int, int]:
    """What the appender used for ``asset-<batch>-<index>``."""
    _, batch, index = ref.split("-")
    return int(batch) * 10 + int(index), 1 + (int(batch) + int(index)) % 9


def kill_an_appender(root: Path, first_batch: int, delay_s: float) -> list[str]:
    """Run the appender, SIGKILL it after ``delay_s``; the refs it reported committed."""
    child = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(root), str(first_batch), str(SMALL_SHARD)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay_s)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    output = child.stdout.read()
    child.stdout.close()
    complete = output.split("\n")[:-1]  # a line cut by the kill has no newline: skip it
    return [ref for line in complete for ref in line.split()]


def test_kill_9_during_appends_leaves_a_cache_that_verifies(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    chooser = random.Random(6)
    committed: list[str] = []
    for round_number in range(KILL_ROUNDS):
        delay_s = chooser.uniform(*KILL_AFTER_S)
        committed += kill_an_appender(root, 1000 * (round_number + 1), delay_s)
    assert committed, "no append committed before the kills"
    cache = Cache.open(root)
    report = cache.verify(deep=True)
    assert report.problems == []
    live = cache.live_samples()
    assert set(committed) <= set(live)
    for ref, row in live.items():
        seed, tokens = seed_and_tokens(ref)
        assert torch.equal(cache.load_latent(row.latent_key), make_latent(seed))
        assert torch.equal(cache.load_text(row.text_key), make_text(seed, tokens))
    cache.gc()
    assert cache.verify().notes == []
    cache.close()


def test_index_records_relative_paths_only(cache: Cache) -> None:
    populated(cache)
    dump = "\n".join(sqlite3.connect(cache.root / INDEX_NAME).iterdump())
    assert str(cache.root) not in dump
    assert json.loads(
        sqlite3.connect(cache.root / INDEX_NAME)
        .execute("SELECT shape FROM latents LIMIT 1")
        .fetchone()[0]
    ) == list(LATENT_SHAPE)
