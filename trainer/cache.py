"""The training cache: VAE latents and T5 embeddings, content-addressed, append-only.

A cache is one self-contained folder (copy it anywhere and train from it as is)::

    index.sqlite                          the index: entries, shards, samples, meta
    shards/NNNNNNNN-<sha256[:16]>.safetensors   tensors, immutable once renamed into place
    .write.lock                           flock: one appender (or gc) at a time
    .read.lock                            trainers hold it shared; gc deletes files only
                                          when it can take it exclusively

Every path in the index is relative (a shard's file name inside ``shards/``).  Tensors live
in safetensors shards under the names ``l/<key>`` (latents) and ``t/<key>`` (text
embeddings).  Only 16-bit tensors are accepted: the caller casts (latents float16, text
bfloat16) before handing them over, so nothing 32-bit can bloat the cache unnoticed.

Crash safety: a writer saves tensors to ``shards/tmp-*.partial``, fsyncs, renames the file to
its final name and fsyncs the folder, and only THEN records entries, samples and the new
generation in one SQLite transaction (rollback journal, ``synchronous=FULL``; no WAL so a
copied folder holds the whole index).  A crash before that commit leaves at most an orphan
file that no index row points to: invisible to readers, removed by :meth:`Cache.gc`,
reported as a note by :meth:`Cache.verify`.

Samples are rows ``(id, ref, source_key, latent_key, text_key, bucket, added_gen,
removed_gen)``; a sample is live while ``removed_gen IS NULL``.  Tombstones are kept, so the
membership at any past generation can be recomputed (exact resume of an epoch).

This module holds the index, keys, :class:`Cache` and :class:`CacheWriter`.  The shard files
and locks themselves are in :mod:`trainer.shards`; gc and verify are in
:mod:`trainer.cache_upkeep`.  ``CacheError`` and ``ShardReader`` are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from trainer.shards import (
    CACHE_FORMAT,
    MIB,
    CacheError,
    FileLock,
    ShardFile,
    ShardReader,
    shard_sequence,
    write_shard,
)

if TYPE_CHECKING:
    from trainer.cache_upkeep import GcReport, VerifyReport

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_MAX_SHARD_BYTES",
    "EMPTY_TEXT_META",
    "INDEX_NAME",
    "SHARDS_DIR",
    "Cache",
    "CacheError",
    "CacheStats",
    "CacheWriter",
    "SampleLocation",
    "SampleRow",
    "ShardReader",
    "latent_key",
    "text_key",
]

INDEX_NAME = "index.sqlite"
SHARDS_DIR = "shards"
WRITE_LOCK = ".write.lock"
READ_LOCK = ".read.lock"
LATENT_PREFIX = "l/"
TEXT_PREFIX = "t/"
DEFAULT_MAX_SHARD_BYTES = 256 * MIB
SQLITE_BUSY_TIMEOUT_S = 60.0
SQLITE_CACHE_KIB = 64 * 1024  # page cache per connection: a 100,000-sample index fits
LATENT_DIMS = 3  # (C, h, w)
TEXT_DIMS = 2  # (tokens, width)
EMPTY_TEXT_META = "empty_text_key"
GENERATION_META = "generation"
STORAGE_DTYPES: dict[torch.dtype, str] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
ENTRY_TABLES = ("latents", "texts")
INSERT_SHARD = "INSERT INTO shards (name, bytes, payload, sha256, added_gen) VALUES (?, ?, ?, ?, ?)"

# MIGRATIONS[n] brings an index from PRAGMA user_version n to n + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"INSERT INTO meta (key, value) VALUES ('{GENERATION_META}', '0')",
        "CREATE TABLE shards (name TEXT PRIMARY KEY, bytes INTEGER NOT NULL,"
        " payload INTEGER NOT NULL, sha256 TEXT NOT NULL, added_gen INTEGER NOT NULL)",
        "CREATE TABLE latents (key TEXT PRIMARY KEY, shard TEXT NOT NULL, tensor TEXT NOT NULL,"
        " shape TEXT NOT NULL, dtype TEXT NOT NULL, nbytes INTEGER NOT NULL,"
        " bucket TEXT NOT NULL, source_key TEXT NOT NULL, added_gen INTEGER NOT NULL)"
        " WITHOUT ROWID",
        "CREATE INDEX latents_by_source ON latents (source_key)",
        "CREATE INDEX latents_by_shard ON latents (shard)",
        "CREATE TABLE texts (key TEXT PRIMARY KEY, shard TEXT NOT NULL, tensor TEXT NOT NULL,"
        " shape TEXT NOT NULL, dtype TEXT NOT NULL, nbytes INTEGER NOT NULL,"
        " tokens INTEGER NOT NULL, added_gen INTEGER NOT NULL) WITHOUT ROWID",
        "CREATE INDEX texts_by_shard ON texts (shard)",
        "CREATE TABLE samples (id INTEGER PRIMARY KEY AUTOINCREMENT, ref TEXT NOT NULL,"
        " source_key TEXT NOT NULL, latent_key TEXT NOT NULL, text_key TEXT NOT NULL,"
        " bucket TEXT NOT NULL, added_gen INTEGER NOT NULL, removed_gen INTEGER)",
        "CREATE UNIQUE INDEX samples_live_ref ON samples (ref) WHERE removed_gen IS NULL",
        "CREATE INDEX samples_by_source ON samples (source_key)",
    ),
)
assert len(MIGRATIONS) == CACHE_FORMAT


def _canonical_key(fields: dict[str, object]) -> str:
    """sha256 hex of canonical JSON: the same fields always give the same key, anywhere."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def latent_key(checksum: str, bucket: str, crop_signature: str, vae_id: str, dtype: str) -> str:
    """Key of a latent: which image bytes, how they were framed, which VAE, which dtype."""
    return _canonical_key(
        {
            "kind": "latent",
            "checksum": checksum,
            "bucket": bucket,
            "crop": crop_signature,
            "vae": vae_id,
            "dtype": dtype,
        }
    )


def text_key(caption: str, encoder_id: str, max_length: int, dtype: str) -> str:
    """Key of a text embedding: the exact caption, the tokenizer/encoder identity, length, dtype."""
    return _canonical_key(
        {
            "kind": "text",
            "caption": caption,
            "encoder": encoder_id,
            "max_length": max_length,
            "dtype": dtype,
        }
    )


@dataclass(frozen=True)
class SampleRow:
    """One training sample: a photo (ref) paired with its latent and caption embedding."""

    id: int
    ref: str
    source_key: str
    latent_key: str
    text_key: str
    bucket: str


class SampleLocation(NamedTuple):
    """Where a sample's tensors are, so a dataset can read them without touching the index.

    A NamedTuple, not a dataclass: a dataset builds one per sample at startup."""

    sample_id: int
    bucket: str
    latent_shard: str
    latent_tensor: str
    text_shard: str
    text_tensor: str
    tokens: int


@dataclass(frozen=True)
class CacheStats:
    """Sizes of a cache; ``bytes`` counts shard files plus the index file."""

    samples: int
    latents: int
    texts: int
    shards: int
    bytes: int
    by_bucket: dict[str, int]


def check_storage_tensor(tensor: torch.Tensor, dims: int, what: str) -> torch.Tensor:
    """A CPU copy of ``tensor`` with its own storage, after checking it is 16-bit and shaped."""
    if tensor.dtype not in STORAGE_DTYPES:
        raise CacheError(f"{what} must be float16 or bfloat16, got {tensor.dtype}")
    if tensor.dim() != dims or 0 in tensor.shape:
        raise CacheError(f"{what} must have {dims} non-empty dimensions, got {tuple(tensor.shape)}")
    # clone: its own storage (safetensors refuses tensors that share memory, e.g. batch slices)
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


class Cache:
    """An open cache folder: index queries, loading, appends (via :meth:`writer`), gc, verify."""

    def __init__(self, root: Path, db: sqlite3.Connection) -> None:
        self.root = root
        self.shards = root / SHARDS_DIR
        self.db = db
        self.reader = ShardReader(self.shards)
        self.write_lock = FileLock(root / WRITE_LOCK)
        self.read_lock = FileLock(root / READ_LOCK)
        self.writing = False

    @classmethod
    def open(cls, root: Path, *, create: bool = False) -> Cache:
        """Open (or with ``create`` make) the cache at ``root``; migrate an older index."""
        root = Path(root)
        index = root / INDEX_NAME
        if not index.is_file() and not create:
            raise CacheError(f"no cache at {root} (missing {INDEX_NAME})")
        if create:
            (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(index, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            _migrate(db, root, create=create)
        except (CacheError, sqlite3.Error):
            db.close()
            raise
        return cls(root, db)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close shard handles and the index connection."""
        self.reader.forget()
        self.write_lock.release()
        self.read_lock.release()
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            if self.db.in_transaction:  # the body may have rolled back a no-op on purpose
                self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    @property
    def generation(self) -> int:
        """Bumped by every committed append, retire or gc that changed something."""
        return int(self.get_meta(GENERATION_META) or 0)

    def bump_generation(self, db: sqlite3.Connection) -> int:
        """Inside a transaction: advance the generation and return the new value."""
        row = db.execute("SELECT value FROM meta WHERE key = ?", (GENERATION_META,)).fetchone()
        new = int(row[0]) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (str(new), GENERATION_META))
        return new

    def get_meta(self, key: str) -> str | None:
        """A value stored with :meth:`set_meta`, or None."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a small string (e.g. ``empty_text_key``, ``vae_scaling_factor:<vae_id>``)."""
        if key == GENERATION_META:
            raise CacheError("the generation is managed by the cache itself")
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def has_latent(self, key: str) -> bool:
        """True when a latent with this key is committed."""
        return self.db.execute("SELECT 1 FROM latents WHERE key = ?", (key,)).fetchone() is not None

    def has_text(self, key: str) -> bool:
        """True when a text embedding with this key is committed."""
        return self.db.execute("SELECT 1 FROM texts WHERE key = ?", (key,)).fetchone() is not None

    def latent_for_source(self, source_key: str) -> str | None:
        """Key of the newest stored latent made from this source, or None.

        A latent is stored once, under the source that first made it; a sample records
        its own source, so a second source of the same pixels (say, a preview used when
        the original was refused) is found through the samples that used it.
        """
        row = self.db.execute(
            "SELECT key FROM latents WHERE source_key = ? ORDER BY added_gen DESC LIMIT 1",
            (source_key,),
        ).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT s.latent_key FROM samples s JOIN latents l ON l.key = s.latent_key "
                "WHERE s.source_key = ? ORDER BY s.id DESC LIMIT 1",
                (source_key,),
            ).fetchone()
        return None if row is None else str(row[0])

    def latent_bucket(self, key: str) -> str | None:
        """The bucket a stored latent was made for, or None when it is not stored."""
        row = self.db.execute("SELECT bucket FROM latents WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def training_active(self) -> bool:
        """True while some process (a trainer) holds ``.read.lock`` through :meth:`reading`."""
        probe = FileLock(self.root / READ_LOCK)
        if not probe.acquire(shared=False, wait=False):
            return True
        probe.release()
        return False

    def live_samples(self) -> dict[str, SampleRow]:
        """Every live sample, by ref."""
        rows = self.db.execute(
            "SELECT id, ref, source_key, latent_key, text_key, bucket FROM samples"
            " WHERE removed_gen IS NULL ORDER BY id"
        )
        return {row[1]: SampleRow(*row) for row in rows}

    def members_at(self, generation: int) -> list[tuple[int, str, int]]:
        """(id, bucket, 1 if its tensors are still stored else 0) of the samples live at
        ``generation``, by id: one SELECT."""
        rows = self.db.execute(
            # gc keeps every entry a live sample uses, so only retired members are looked up
            "SELECT id, bucket, CASE WHEN removed_gen IS NULL THEN 1 ELSE"
            " EXISTS (SELECT 1 FROM latents WHERE key = latent_key)"
            " AND EXISTS (SELECT 1 FROM texts WHERE key = text_key) END FROM samples"
            " WHERE added_gen <= ?1 AND (removed_gen IS NULL OR removed_gen > ?1) ORDER BY id",
            (generation,),
        )
        return rows.fetchall()

    def sample_locations(self, ids: Iterable[int] | None = None) -> dict[int, SampleLocation]:
        """Shard and tensor names of live samples (or of the given ids, live or not): one SELECT."""
        query = (
            "SELECT s.id, s.bucket, l.shard, l.tensor, t.shard, t.tensor, t.tokens FROM samples s"
            " JOIN latents l ON l.key = s.latent_key JOIN texts t ON t.key = s.text_key"
        )
        if ids is None:
            rows = self.db.execute(query + " WHERE s.removed_gen IS NULL")
        else:
            wanted = json.dumps([int(sample_id) for sample_id in ids])
            rows = self.db.execute(
                query + " WHERE s.id IN (SELECT value FROM json_each(?))", (wanted,)
            )
        return {row[0]: SampleLocation._make(row) for row in rows}

    def writer(self, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> CacheWriter:
        """An appender holding ``.write.lock`` (waits for another writer or gc to finish)."""
        return CacheWriter(self, max_shard_bytes=max_shard_bytes)

    def retire(self, refs: Iterable[str]) -> int:
        """Tombstone the live samples of these refs; returns how many were retired."""
        wanted = json.dumps(list(refs))
        with self.transaction() as db:
            generation = self.bump_generation(db)
            count = db.execute(
                "UPDATE samples SET removed_gen = ? WHERE removed_gen IS NULL"
                " AND ref IN (SELECT value FROM json_each(?))",
                (generation, wanted),
            ).rowcount
            if count == 0:
                db.execute("ROLLBACK")  # nothing changed: keep the generation as it was
        return count

    def retire_all_except(self, keep: Iterable[str]) -> int:
        """Retire every live sample whose ref is not in ``keep`` (photos no longer wanted)."""
        kept = set(keep)
        return self.retire(ref for ref in self.live_samples() if ref not in kept)

    def load_latent(self, key: str) -> torch.Tensor:
        """The latent stored under ``key`` (C, h, w)."""
        return self._load("latents", key)

    def load_text(self, key: str) -> torch.Tensor:
        """The text embedding stored under ``key`` (tokens, width), unpadded."""
        return self._load("texts", key)

    def _load(self, table: str, key: str) -> torch.Tensor:
        row = self.db.execute(f"SELECT shard, tensor FROM {table} WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise CacheError(f"no {table[:-1]} {key} in the cache at {self.root}")
        return self.reader.tensor(row[0], row[1])

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold ``.read.lock`` shared while training, so gc deletes no file under a reader."""
        lock = FileLock(self.root / READ_LOCK)
        lock.acquire(shared=True, wait=True)
        try:
            yield
        finally:
            lock.release()

    def file_mode(self) -> int:
        """Permission bits for new shards: those of the index file."""
        return stat.S_IMODE((self.root / INDEX_NAME).stat().st_mode)

    def next_shard_sequence(self) -> int:
        """1 + the highest sequence among indexed shards and files on disk (orphans too)."""
        names = [row[0] for row in self.db.execute("SELECT name FROM shards")]
        names += [path.name for path in self.shards.iterdir()]
        numbers = [number for name in names if (number := shard_sequence(name)) is not None]
        return max(numbers, default=0) + 1

    def gc(self, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> GcReport:
        """Drop entries no live sample uses (never the empty-caption text), rewrite shards whose
        live bytes fell below half, delete dead shards and orphan files.  Files are touched only
        when no trainer holds the read lock; CacheError if a writer is busy."""
        from trainer.cache_upkeep import collect_garbage  # late: cache_upkeep imports this module

        return collect_garbage(self, max_shard_bytes=max_shard_bytes)

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every shard, entry and live sample; ``deep`` re-hashes every shard."""
        from trainer.cache_upkeep import verify_cache  # late: cache_upkeep imports this module

        return verify_cache(self, deep=deep)

    def stats(self) -> CacheStats:
        """Counts and sizes (live samples only)."""

        def count(sql: str) -> int:
            return int(self.db.execute(sql).fetchone()[0])

        by_bucket = dict(
            self.db.execute(
                "SELECT bucket, COUNT(*) FROM samples WHERE removed_gen IS NULL GROUP BY bucket"
                " ORDER BY bucket"
            ).fetchall()
        )
        shard_bytes = count("SELECT COALESCE(SUM(bytes), 0) FROM shards")
        return CacheStats(
            samples=sum(by_bucket.values()),
            latents=count("SELECT COUNT(*) FROM latents"),
            texts=count("SELECT COUNT(*) FROM texts"),
            shards=count("SELECT COUNT(*) FROM shards"),
            bytes=shard_bytes + (self.root / INDEX_NAME).stat().st_size,
            by_bucket=by_bucket,
        )


def _user_version(db: sqlite3.Connection, root: Path) -> int:
    """The index's format number; CacheError when it is newer than this code."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > CACHE_FORMAT:
        raise CacheError(
            f"the cache at {root} has format {version}, newer than this darkroom's {CACHE_FORMAT}"
        )
    return version


def _migrate(db: sqlite3.Connection, root: Path, *, create: bool) -> None:
    """Bring the index to CACHE_FORMAT, one numbered migration per transaction (the version is
    re-read inside each, so two processes creating the same cache do not both migrate)."""
    version = _user_version(db, root)
    if version == 0 and not create:
        raise CacheError(f"no cache at {root} ({INDEX_NAME} is empty)")
    while version < CACHE_FORMAT:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(db, root)
            if version < CACHE_FORMAT:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


@dataclass
class _Pending:
    """Tensors waiting for a shard, and rows waiting for the commit."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    latents: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (bucket, source)
    texts: set[str] = field(default_factory=set)
    bytes: int = 0
    shards: list[ShardFile] = field(default_factory=list)
    latent_rows: list[tuple[object, ...]] = field(default_factory=list)
    text_rows: list[tuple[object, ...]] = field(default_factory=list)
    samples: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)


class CacheWriter:
    """Appends entries and samples; nothing is visible until :meth:`commit`.

    Use as a context manager: a clean exit commits, an exception discards everything (shards
    already written for this batch are deleted; if the process dies instead they stay as
    orphans that gc removes).  Holds ``.write.lock`` from creation until closed.
    """

    def __init__(self, cache: Cache, *, max_shard_bytes: int) -> None:
        if cache.writing:
            raise CacheError("this cache object already has an open writer")
        cache.write_lock.acquire(shared=False, wait=True)
        cache.writing = True
        self.cache = cache
        self.max_shard_bytes = max_shard_bytes
        self._sequence = cache.next_shard_sequence()
        self._pending = _Pending()
        self._closed = False

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.close()

    def _known_latent(self, key: str) -> bool:
        return key in self._pending.latents or self.cache.has_latent(key)

    def _known_text(self, key: str) -> bool:
        return key in self._pending.texts or self.cache.has_text(key)

    def add_latent(self, key: str, latent: torch.Tensor, *, bucket: str, source_key: str) -> None:
        """Queue a (C, h, w) 16-bit latent; a key already stored or queued is skipped."""
        self._check_open()
        if self._known_latent(key):
            return
        tensor = check_storage_tensor(latent, LATENT_DIMS, "a latent")
        self._pending.latents[key] = (bucket, source_key)
        self._queue(LATENT_PREFIX + key, tensor)

    def add_text(self, key: str, embedding: torch.Tensor) -> None:
        """Queue an unpadded (tokens, width) 16-bit embedding; known keys are skipped."""
        self._check_open()
        if self._known_text(key):
            return
        tensor = check_storage_tensor(embedding, TEXT_DIMS, "a text embedding")
        self._pending.texts.add(key)
        self._queue(TEXT_PREFIX + key, tensor)

    def set_sample(
        self, ref: str, *, source_key: str, latent_key: str, text_key: str, bucket: str
    ) -> None:
        """Queue ``ref`` -> (latent, text); a changed ref: new row, old one tombstoned."""
        self._check_open()
        if not self._known_latent(latent_key):
            raise CacheError(f"sample {ref}: latent {latent_key} is neither stored nor added")
        pending = self._pending.latents.get(latent_key)
        made_for = pending[0] if pending else self.cache.latent_bucket(latent_key)
        if made_for != bucket:
            raise CacheError(f"sample {ref}: bucket {bucket} but its latent is for {made_for}")
        if not self._known_text(text_key):
            raise CacheError(f"sample {ref}: text {text_key} is neither stored nor added")
        self._pending.samples[ref] = (source_key, latent_key, text_key, bucket)

    def _queue(self, name: str, tensor: torch.Tensor) -> None:
        self._pending.tensors[name] = tensor
        self._pending.bytes += tensor.numel() * tensor.element_size()
        if self._pending.bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        """Write the queued tensors to one shard and remember their rows for the commit."""
        pending = self._pending
        if not pending.tensors:
            return
        shard = write_shard(
            self.cache.shards, self._sequence, pending.tensors, mode=self.cache.file_mode()
        )
        self._sequence += 1
        pending.shards.append(shard)
        for name, tensor in pending.tensors.items():
            is_latent = name.startswith(LATENT_PREFIX)
            key = name.removeprefix(LATENT_PREFIX if is_latent else TEXT_PREFIX)
            common = (key, shard.name, name, json.dumps(list(tensor.shape)))
            common += (STORAGE_DTYPES[tensor.dtype], tensor.numel() * tensor.element_size())
            if is_latent:
                pending.latent_rows.append((*common, *pending.latents[key]))
            else:
                pending.text_rows.append((*common, tensor.shape[0]))
        pending.tensors = {}
        pending.bytes = 0

    def commit(self) -> None:
        """Flush queued tensors, then make everything visible in one transaction."""
        self._check_open()
        self._flush()
        pending = self._pending
        if not (pending.shards or pending.samples):
            return
        with self.cache.transaction() as db:
            generation = self.cache.bump_generation(db)
            db.executemany(
                INSERT_SHARD,
                [(s.name, s.bytes, s.payload, s.sha256, generation) for s in pending.shards],
            )
            db.executemany(
                "INSERT OR IGNORE INTO latents (key, shard, tensor, shape, dtype, nbytes, bucket,"
                " source_key, added_gen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, generation) for row in pending.latent_rows],
            )
            db.executemany(
                "INSERT OR IGNORE INTO texts (key, shard, tensor, shape, dtype, nbytes, tokens,"
                " added_gen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, generation) for row in pending.text_rows],
            )
            changed = _apply_samples(db, pending.samples, generation)
            if not (changed or pending.shards):
                db.execute("ROLLBACK")  # identical samples only: nothing to bump
        self._pending = _Pending()

    def close(self) -> None:
        """Discard anything uncommitted (deleting its shards) and release the write lock."""
        if self._closed:
            return
        for shard in self._pending.shards:
            (self.cache.shards / shard.name).unlink(missing_ok=True)
        self._pending = _Pending()
        self._closed = True
        self.cache.writing = False
        self.cache.write_lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError("this cache writer is closed")


def _apply_samples(
    db: sqlite3.Connection, samples: dict[str, tuple[str, str, str, str]], generation: int
) -> int:
    """Insert new sample rows, tombstoning a live row whose keys changed; returns rows added."""
    added = 0
    for ref, wanted in samples.items():
        current = db.execute(
            "SELECT id, source_key, latent_key, text_key, bucket FROM samples"
            " WHERE ref = ? AND removed_gen IS NULL",
            (ref,),
        ).fetchone()
        if current is not None and tuple(current[1:]) == wanted:
            continue
        if current is not None:
            db.execute("UPDATE samples SET removed_gen = ? WHERE id = ?", (generation, current[0]))
        db.execute(
            "INSERT INTO samples (ref, source_key, latent_key, text_key, bucket, added_gen)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (ref, *wanted, generation),
        )
        added += 1
    return added
