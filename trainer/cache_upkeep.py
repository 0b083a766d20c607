"""Cache upkeep: garbage collection and verification of a training cache.

The bodies of :meth:`trainer.cache.Cache.gc` and :meth:`trainer.cache.Cache.verify`, kept
apart from :mod:`trainer.cache` because they are maintenance passes over a whole cache (run
by the daemon's cache commands), not part of the append/read path a trainer uses.  ``Cache``
keeps ``gc()`` and ``verify()`` as thin methods that import this module when called; this
module imports :mod:`trainer.cache` at the top, so there is no import cycle.

gc drops entries no live sample uses, compacts sparse shards into new ones and deletes dead
shards and orphan files (files only while no trainer holds the read lock); verify checks
every shard, entry and live sample against the index and reports problems and notes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from trainer.cache import EMPTY_TEXT_META, ENTRY_TABLES, INDEX_NAME, INSERT_SHARD, Cache
from trainer.shards import HEADER_DTYPES, CacheError, ShardFile, fsync_dir, hash_file, write_shard

COMPACT_BELOW = 0.5  # gc rewrites a shard whose live tensor bytes fall below this fraction


@dataclass
class GcReport:
    """What :meth:`Cache.gc` did.  ``readers_active``: a trainer held the read lock, so only
    the index was cleaned and no file was rewritten or deleted (run gc again later)."""

    latents_dropped: int = 0
    texts_dropped: int = 0
    shards_rewritten: int = 0
    files_removed: int = 0
    orphans_removed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    readers_active: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Outcome of :meth:`Cache.verify`: ``problems`` empty means the cache is sound; ``notes``
    are harmless findings such as orphan files left by an interrupted append."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    entries: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def disk_bytes(cache: Cache) -> int:
    """Bytes the cache folder uses: every file under shards/ plus the index."""
    files = [path for path in cache.shards.iterdir() if path.is_file()]
    return sum(path.stat().st_size for path in files) + (cache.root / INDEX_NAME).stat().st_size


def collect_garbage(cache: Cache, *, max_shard_bytes: int) -> GcReport:
    """The body of :meth:`Cache.gc` (see there)."""
    if cache.writing or not cache.write_lock.acquire(shared=False, wait=False):
        raise CacheError("another process is writing to this cache; run gc when it is done")
    try:
        report = GcReport(bytes_before=disk_bytes(cache))
        report.readers_active = not cache.read_lock.acquire(shared=False, wait=False)
        try:
            dead_shards = _drop_dead_entries(cache, report)
            if report.readers_active:
                report.notes.append(
                    "a trainer holds the read lock: the index was cleaned but no file was"
                    " rewritten or deleted; run gc again when training has stopped"
                )
            else:
                _compact(cache, report, max_shard_bytes)
                _remove_unindexed_files(cache, report, dead_shards)
        finally:
            cache.read_lock.release()
        report.bytes_after = disk_bytes(cache)
    finally:
        cache.write_lock.release()
    return report


def _drop_dead_entries(cache: Cache, report: GcReport) -> set[str]:
    """One transaction: drop entries no live sample uses and shards left empty; their names."""
    empty_text = cache.get_meta(EMPTY_TEXT_META) or ""
    with cache.transaction() as db:
        report.latents_dropped = db.execute(
            "DELETE FROM latents WHERE key NOT IN"
            " (SELECT latent_key FROM samples WHERE removed_gen IS NULL)"
        ).rowcount
        report.texts_dropped = db.execute(
            "DELETE FROM texts WHERE key != ? AND key NOT IN"
            " (SELECT text_key FROM samples WHERE removed_gen IS NULL)",
            (empty_text,),
        ).rowcount
        unused = "name NOT IN (SELECT shard FROM latents UNION SELECT shard FROM texts)"
        dead = {row[0] for row in db.execute(f"SELECT name FROM shards WHERE {unused}")}
        db.execute(f"DELETE FROM shards WHERE {unused}")
        if report.latents_dropped or report.texts_dropped or dead:
            cache.bump_generation(db)
    return dead


def _sparse_shards(cache: Cache) -> list[str]:
    """Shards whose live tensor bytes fell below COMPACT_BELOW of what they were written with."""
    rows = cache.db.execute(
        "SELECT s.name, s.payload, COALESCE(SUM(e.nbytes), 0) FROM shards s LEFT JOIN"
        " (SELECT shard, nbytes FROM latents UNION ALL SELECT shard, nbytes FROM texts) e"
        " ON e.shard = s.name GROUP BY s.name ORDER BY s.name"
    )
    return [name for name, payload, live in rows if live < COMPACT_BELOW * payload]


Entry = tuple[str, str, str, str, int]  # table, key, shard, tensor name, bytes


def _pack(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of entries, each closed once it reaches max_shard_bytes."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if size >= max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry[4]
    return [group for group in groups if group]


def _compact(cache: Cache, report: GcReport, max_shard_bytes: int) -> None:
    """Copy the live tensors of sparse shards into new shards, switch the index over in one
    transaction, then delete the old files."""
    sparse = _sparse_shards(cache)
    if not sparse:
        return
    wanted = json.dumps(sparse)
    entries: list[Entry] = [
        (table, *row)
        for table in ENTRY_TABLES
        for row in cache.db.execute(
            f"SELECT key, shard, tensor, nbytes FROM {table}"
            " WHERE shard IN (SELECT value FROM json_each(?)) ORDER BY shard, tensor",
            (wanted,),
        )
    ]
    written: list[ShardFile] = []
    moves: dict[str, list[tuple[str, str]]] = {table: [] for table in ENTRY_TABLES}
    sequence = cache.next_shard_sequence()
    try:
        for group in _pack(entries, max_shard_bytes):
            tensors = {
                tensor: cache.reader.tensor(shard, tensor) for _, _, shard, tensor, _ in group
            }
            written.append(write_shard(cache.shards, sequence, tensors, mode=cache.file_mode()))
            sequence += 1
            for table, key, *_ in group:
                moves[table].append((written[-1].name, key))
        with cache.transaction() as db:
            generation = cache.bump_generation(db)
            db.executemany(
                INSERT_SHARD,
                [(s.name, s.bytes, s.payload, s.sha256, generation) for s in written],
            )
            for table, rows in moves.items():
                db.executemany(f"UPDATE {table} SET shard = ? WHERE key = ?", rows)
            db.executemany("DELETE FROM shards WHERE name = ?", [(name,) for name in sparse])
    except BaseException:
        for shard_file in written:
            (cache.shards / shard_file.name).unlink(missing_ok=True)
        raise
    cache.reader.forget(sparse)
    for name in sparse:
        (cache.shards / name).unlink(missing_ok=True)
    fsync_dir(cache.shards)
    report.shards_rewritten = len(sparse)
    report.files_removed += len(sparse)


def _remove_unindexed_files(cache: Cache, report: GcReport, dead: set[str]) -> None:
    """Delete files no index row names: dead shards and orphans (partials, unrecorded shards)."""
    indexed = {row[0] for row in cache.db.execute("SELECT name FROM shards")}
    for path in sorted(cache.shards.iterdir()):
        if path.name in indexed or not path.is_file():
            continue
        cache.reader.forget([path.name])
        path.unlink()
        report.files_removed += 1
        if path.name not in dead:
            report.orphans_removed += 1
    fsync_dir(cache.shards)


TensorHeader = dict[str, tuple[list[int], str]]


def verify_cache(cache: Cache, *, deep: bool) -> VerifyReport:
    """The body of :meth:`Cache.verify` (see there)."""
    report = VerifyReport()
    check = cache.db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        report.problems.append(f"{INDEX_NAME} fails SQLite's quick_check: {check}")
    shards = {
        row[0]: (row[1], row[2])
        for row in cache.db.execute("SELECT name, bytes, sha256 FROM shards")
    }
    report.shards = len(shards)
    headers = {
        name: _check_shard(cache.shards / name, size, digest, deep, report.problems)
        for name, (size, digest) in sorted(shards.items())
    }
    _check_entries(cache, headers, report)
    _check_samples(cache, report)
    for path in sorted(cache.shards.iterdir()):
        if path.name not in shards:
            report.notes.append(
                f"orphan file shards/{path.name} ({path.stat().st_size} bytes): no index row"
                " names it (an interrupted append or gc left it); gc removes it"
            )
    return report


def _check_shard(
    path: Path, size: int, digest: str, deep: bool, problems: list[str]
) -> TensorHeader | None:
    """Check one shard's presence, size, header (and with ``deep`` its sha256); its tensors."""
    name = path.name
    if not path.is_file():
        problems.append(f"shard {name} is missing")
        return None
    actual = path.stat().st_size
    if actual != size:
        problems.append(f"shard {name} is {actual} bytes, the index says {size} (truncated?)")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        header: TensorHeader = {}
        names = handle.keys()
        for tensor in names:
            view = handle.get_slice(tensor)
            header[tensor] = (list(view.get_shape()), HEADER_DTYPES.get(view.get_dtype(), "?"))
    except SafetensorError as error:
        problems.append(f"shard {name}: unreadable header ({error})")
        return None
    if deep and actual == size and hash_file(path)[0] != digest:
        problems.append(f"shard {name}: sha256 differs from the index (corrupted bytes)")
    return header


def _check_entries(
    cache: Cache, headers: dict[str, TensorHeader | None], report: VerifyReport
) -> None:
    """Every entry's shard is indexed and readable and holds its tensor as recorded."""
    for table in ENTRY_TABLES:
        damaged: dict[str, int] = {}
        rows = cache.db.execute(f"SELECT key, shard, tensor, shape, dtype FROM {table}")
        for key, shard, tensor, shape, dtype in rows:
            report.entries += 1
            if shard not in headers:
                report.problems.append(f"{table} entry {key} names unindexed shard {shard}")
                continue
            header = headers[shard]
            if header is None:
                damaged[shard] = damaged.get(shard, 0) + 1
            elif tensor not in header:
                report.problems.append(f"{table} entry {key}: tensor {tensor} not in shard {shard}")
            elif header[tensor] != (json.loads(shape), dtype):
                found = header[tensor]
                report.problems.append(
                    f"{table} entry {key}: index says {shape} {dtype}, shard {shard} holds"
                    f" {found[0]} {found[1]}"
                )
        for shard, count in sorted(damaged.items()):
            report.problems.append(f"{count} {table} entries are lost with shard {shard}")


def _check_samples(cache: Cache, report: VerifyReport) -> None:
    """Every live sample points at stored entries; the empty-caption text is stored."""
    rows = cache.db.execute(
        "SELECT s.ref, s.latent_key, s.text_key, l.key IS NULL, t.key IS NULL FROM samples s"
        " LEFT JOIN latents l ON l.key = s.latent_key LEFT JOIN texts t ON t.key = s.text_key"
        " WHERE s.removed_gen IS NULL"
    )
    for ref, latent, text, no_latent, no_text in rows:
        report.samples += 1
        if no_latent:
            report.problems.append(f"sample {ref}: latent {latent} is not in the cache")
        if no_text:
            report.problems.append(f"sample {ref}: text {text} is not in the cache")
    empty_text = cache.get_meta(EMPTY_TEXT_META)
    if empty_text is not None and not cache.has_text(empty_text):
        report.problems.append(f"the empty-caption embedding {empty_text} is not in the cache")
