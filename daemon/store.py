"""The single owner of darkroom's SQLite state database.

Every read and write of the state goes through :class:`Store`.  The database runs in WAL
mode so ``darkroom status`` can read while the daemon writes; writes are serialised by one
lock and happen inside explicit ``BEGIN IMMEDIATE`` transactions, so a process killed at any
point leaves either the whole transaction or none of it.  The schema evolves through the
numbered migrations in :data:`MIGRATIONS`; ``PRAGMA user_version`` records how many ran.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import sqlite_utils
from sqlite_utils.db import NotFoundError

BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 64 * 1024


class StoreError(Exception):
    """The state database cannot be used as it is."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer darkroom than this one."""


def utc_now() -> str:
    """A timestamp as stored: ISO 8601 in UTC with microseconds, sortable as text."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


# Each migration is a list of statements run inside one transaction (not executescript,
# which would commit on its own and break that).
_MIGRATION_1 = (
    # Assets as seen in Immich, per-stage progress, and small named values.
    """CREATE TABLE assets (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        type TEXT NOT NULL,
        checksum TEXT NOT NULL,
        immich_updated_at TEXT NOT NULL,
        visibility TEXT NOT NULL,
        is_trashed INTEGER NOT NULL DEFAULT 0,
        is_deleted INTEGER NOT NULL DEFAULT 0,
        original_file_name TEXT,
        thumbnail_ready INTEGER NOT NULL DEFAULT 0,
        first_seen_at TEXT NOT NULL,
        last_seen_at TEXT NOT NULL
    )""",
    """CREATE TABLE stage_status (
        asset_id TEXT NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        stage TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('pending', 'done', 'failed', 'quarantined', 'skipped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (asset_id, stage)
    )""",
    "CREATE INDEX stage_status_by_status ON stage_status (stage, status)",
    "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_MIGRATION_2 = (
    # The ledger of values written to Immich, and the human review queue.
    """CREATE TABLE writes (
        id INTEGER PRIMARY KEY,
        asset_id TEXT NOT NULL,
        field TEXT NOT NULL,
        value TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('intended', 'done', 'abandoned')),
        intended_at TEXT NOT NULL,
        done_at TEXT
    )""",
    "CREATE INDEX writes_by_asset_field ON writes (asset_id, field, id)",
    """CREATE TABLE review_queue (
        asset_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        proposal TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('open', 'applied', 'dismissed', 'undone')),
        created_at TEXT NOT NULL,
        resolved_at TEXT,
        PRIMARY KEY (asset_id, kind)
    )""",
    "CREATE INDEX review_queue_by_status ON review_queue (status)",
)
_MIGRATION_3 = (
    # What the vision model said about each asset, and the fields a person has claimed.
    """CREATE TABLE curations (
        asset_id TEXT PRIMARY KEY REFERENCES assets(id) ON DELETE CASCADE,
        description TEXT,
        scores TEXT,
        overall REAL,
        stars INTEGER,
        orientation TEXT,
        model TEXT NOT NULL,
        digest TEXT NOT NULL,
        prompt_version INTEGER NOT NULL,
        provenance TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE human_fields (
        asset_id TEXT NOT NULL,
        field TEXT NOT NULL,
        noticed_at TEXT NOT NULL,
        PRIMARY KEY (asset_id, field)
    )""",
)

_MIGRATION_4 = (
    # A new image waits for the first stage as a flag on its own row, not a stage_status row:
    # a first sync of a big library then writes one row per asset instead of three b-trees.
    "ALTER TABLE assets ADD COLUMN fresh INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX assets_fresh ON assets (first_seen_at) WHERE fresh",
)
_MIGRATION_5 = (
    # What examining a curated photo for training decided (``daemon/training_set.py``).
    """CREATE TABLE training (
        asset_id TEXT PRIMARY KEY REFERENCES assets(id) ON DELETE CASCADE,
        checked_updated_at TEXT NOT NULL,
        checksum TEXT NOT NULL,
        caption TEXT,
        rating INTEGER,
        rated_by TEXT,
        duplicate_id TEXT,
        pixels TEXT NOT NULL,
        rotation INTEGER NOT NULL,
        eligible INTEGER NOT NULL,
        reason TEXT,
        checked_at TEXT NOT NULL
    )""",
    "CREATE INDEX training_eligible ON training (eligible, duplicate_id)",
)
_MIGRATION_6 = (
    # The encode/train processes the daemon started (``daemon/hooks.py``) and the trainer's
    # checkpoints it found on disk, for ``darkroom status``.  ``ended_at`` NULL: running.
    """CREATE TABLE training_runs (
        id INTEGER PRIMARY KEY,
        step_name TEXT NOT NULL,
        command TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_code INTEGER,
        outcome TEXT,
        first_step INTEGER,
        last_step INTEGER
    )""",
    "CREATE INDEX training_runs_by_start ON training_runs (started_at)",
    """CREATE TABLE checkpoints (
        step INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        milestone INTEGER NOT NULL,
        cache_generation INTEGER,
        created_at TEXT,
        seen_at TEXT NOT NULL
    )""",
)

_MIGRATION_7 = (
    # What the samples job made of each checkpoint (``daemon/results.py``): renders of the
    # validation prompts (step 0: the base model), files uploaded to Immich (never twice), and
    # the held-out loss by timestep bin.
    """CREATE TABLE renders (
        kind TEXT NOT NULL,
        step INTEGER NOT NULL,
        prompt_key TEXT NOT NULL,
        prompt TEXT NOT NULL,
        seed INTEGER NOT NULL,
        path TEXT NOT NULL,
        clip_score REAL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (kind, step, prompt_key)
    )""",
    """CREATE TABLE uploads (
        key TEXT PRIMARY KEY,
        sha1 TEXT NOT NULL,
        asset_id TEXT NOT NULL,
        album_id TEXT,
        uploaded_at TEXT NOT NULL
    )""",
    """CREATE TABLE evaluations (
        step INTEGER NOT NULL,
        set_digest TEXT NOT NULL,
        samples INTEGER NOT NULL,
        early REAL NOT NULL,
        middle REAL NOT NULL,
        late REAL NOT NULL,
        overall REAL NOT NULL,
        evaluated_at TEXT NOT NULL,
        PRIMARY KEY (step, set_digest)
    )""",
)

# Append only: a released migration is never edited, a new one is added at the end.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _MIGRATION_1,
    _MIGRATION_2,
    _MIGRATION_3,
    _MIGRATION_4,
    _MIGRATION_5,
    _MIGRATION_6,
    _MIGRATION_7,
)
SCHEMA_VERSION = len(MIGRATIONS)


FIRST_STAGE = "curate"
CURATED_TYPES = frozenset({"IMAGE"})


class SeenAsset(NamedTuple):
    """An asset as discovery saw it in Immich.

    A NamedTuple, in the column order of ``_UPSERT_ASSETS``: a library sync makes one per
    asset, and it serialises to a JSON array as it is.
    """

    id: str
    owner_id: str
    type: str
    checksum: str
    updated_at: str
    visibility: str
    is_trashed: bool
    original_file_name: str
    thumbnail_ready: bool


@dataclass(frozen=True)
class UpsertCounts:
    """What an upsert of seen assets changed."""

    new: int = 0
    replaced: int = 0
    updated: int = 0
    skipped: int = 0

    def __add__(self, other: UpsertCounts) -> UpsertCounts:
        return UpsertCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __str__(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in asdict(self).items())


# Batched statements: ``rows`` is a JSON array of arrays, unpacked by json_each in SQLite.
_KNOWN_CHECKSUMS = "SELECT id, checksum FROM assets WHERE id IN (SELECT value FROM json_each(?))"
_CURATED_SQL = ", ".join(f"'{kind}'" for kind in sorted(CURATED_TYPES))
_UPSERT_ASSETS = (
    "INSERT INTO assets (id, owner_id, type, checksum, immich_updated_at, visibility, "
    "is_trashed, original_file_name, thumbnail_ready, first_seen_at, last_seen_at, fresh) "
    "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, "
    f"value->>7, value->>8, :now, :now, value->>2 IN ({_CURATED_SQL}) "
    "FROM json_each(:rows) WHERE true "
    "ON CONFLICT (id) DO UPDATE SET "
    "type = excluded.type, checksum = excluded.checksum, "
    "immich_updated_at = excluded.immich_updated_at, visibility = excluded.visibility, "
    "is_trashed = excluded.is_trashed, is_deleted = 0, "
    "original_file_name = excluded.original_file_name, "
    "thumbnail_ready = excluded.thumbnail_ready, last_seen_at = excluded.last_seen_at, "
    "fresh = assets.fresh AND excluded.fresh"
)
_FORGET_STAGES = "DELETE FROM stage_status WHERE asset_id IN (SELECT value FROM json_each(?))"
_MAKE_FRESH = "UPDATE assets SET fresh = 1 WHERE id IN (SELECT value FROM json_each(?))"
_SET_STAGES = (
    "INSERT INTO stage_status (asset_id, stage, status, attempts, last_error, updated_at) "
    "SELECT value->>0, :stage, value->>1, 0, value->>2, :now FROM json_each(:rows) WHERE true "
    "ON CONFLICT (asset_id, stage) DO UPDATE SET status = excluded.status, "
    "last_error = excluded.last_error, updated_at = excluded.updated_at"
)
# (asset, stage, status, attempts to add, error, time, attempts to add)
_SET_STAGE = (
    "INSERT INTO stage_status (asset_id, stage, status, attempts, last_error, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (asset_id, stage) DO UPDATE SET "
    "status = excluded.status, last_error = excluded.last_error, "
    "attempts = stage_status.attempts + ?, updated_at = excluded.updated_at"
)


# Waiting work: pending in a stage, still in Immich, not in the trash, thumbnail ready.
_AVAILABLE = "NOT a.is_trashed AND NOT a.is_deleted AND a.thumbnail_ready"
_PENDING = (
    "FROM stage_status s JOIN assets a ON a.id = s.asset_id "
    f"WHERE s.stage = ? AND s.status = 'pending' AND {_AVAILABLE}"
)
# New images never handled yet: pending in the first stage without a stage_status row.
_FRESH = f"FROM assets a WHERE a.fresh AND {_AVAILABLE}"


# -- training runs and checkpoints (migration 6) -------------------------------------------


@dataclass(frozen=True)
class TrainingRun:
    """One encode or train process the daemon started; ``ended_at`` None while it runs."""

    id: int
    step_name: str
    command: list[str]
    started_at: str
    ended_at: str | None
    exit_code: int | None
    outcome: str | None
    first_step: int | None
    last_step: int | None


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint folder's manifest as the daemon found it; ``seen_at`` is set on upsert."""

    step: int
    path: str
    milestone: bool
    cache_generation: int | None
    created_at: str | None
    seen_at: str | None = None


_RUN_COLUMNS = (
    "id, step_name, command, started_at, ended_at, exit_code, outcome, first_step, last_step"
)
_CHECKPOINT_COLUMNS = "step, path, milestone, cache_generation, created_at, seen_at"


class Store:
    """Open (creating and migrating as needed) the state database at ``path``."""

    def __init__(self, path: Path, *, migrate_to: int = SCHEMA_VERSION) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit at the driver level: transactions are opened explicitly below.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        try:
            self._configure()
            self._migrate(migrate_to)
        except BaseException:
            self._conn.close()
            raise
        self.db = sqlite_utils.Database(self._conn)

    def _configure(self) -> None:
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL journal mode (got {mode})")
        # NORMAL is durable against a killed process (WAL); a power cut may lose the last
        # commits, which is safe here: unfinished writes are settled against what Immich
        # holds, never redone blindly.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        # SQLite's default 2 MB page cache thrashes once a library passes ~20,000 photos
        # (random UUID keys touch pages all over the indexes); this keeps them in memory.
        self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    @property
    def schema_version(self) -> int:
        """How many migrations this database has had."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, target: int) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{self.path} has schema version {current}, but this darkroom only knows up "
                f"to {SCHEMA_VERSION}: it was written by a newer darkroom. Upgrade darkroom "
                "(downgrading the database is not supported)."
            )
        for version in range(current + 1, target + 1):
            with self.transaction() as conn:
                if self.schema_version >= version:  # another process migrated meanwhile
                    continue
                for statement in MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it does."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def read(self, sql: str, params: tuple[object, ...] | dict[str, object] = ()) -> list[tuple]:
        """Run a read-only query and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- small named values (watermarks, timestamps of the last runs) ---------------------

    def get_value(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        rows = self.read("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_value(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing what was there."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- assets -----------------------------------------------------------------------

    def upsert_assets(self, assets: list[SeenAsset]) -> UpsertCounts:
        """Record assets seen in Immich, in one transaction.

        A new image (or one whose checksum changed: the file was replaced) becomes pending
        in the first stage; other types are recorded as skipped with the reason.  Anything
        else only refreshes the row, so darkroom's own writes never cause new work.
        Rows travel as one JSON array per statement: SQLite unpacks it in C with the GIL
        released, so a page of a thousand assets costs three statements, not thousands.
        """
        if not assets:
            return UpsertCounts()
        now = utc_now()
        ids = json.dumps([a.id for a in assets])
        with self.transaction() as conn:
            known = dict(conn.execute(_KNOWN_CHECKSUMS, (ids,)))
            conn.execute(_UPSERT_ASSETS, {"now": now, "rows": json.dumps(assets)})
            changed = [a for a in assets if known.get(a.id) != a.checksum]
            fresh = [a for a in changed if a.type in CURATED_TYPES]
            skipped = [a for a in changed if a.type not in CURATED_TYPES]
            replaced = json.dumps([a.id for a in changed if a.id in known])
            # A replaced file starts over in every stage; new images wait as ``fresh``.
            conn.execute(_FORGET_STAGES, (replaced,))
            conn.execute(_MAKE_FRESH, (json.dumps([a.id for a in fresh if a.id in known]),))
            stages = [
                [a.id, "skipped", f"{a.type.lower()} assets are not curated"] for a in skipped
            ]
            if stages:
                rows = {"stage": FIRST_STAGE, "now": now, "rows": json.dumps(stages)}
                conn.execute(_SET_STAGES, rows)
        replaced_images = sum(1 for a in fresh if a.id in known)
        return UpsertCounts(
            new=len(fresh) - replaced_images,
            replaced=replaced_images,
            updated=len(assets) - len(changed),
            skipped=len(skipped),
        )

    def mark_unseen_deleted(self, seen_since: str) -> int:
        """After a full sweep: assets not seen since ``seen_since`` are gone from Immich."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE assets SET is_deleted = 1 WHERE last_seen_at < ? AND NOT is_deleted",
                (seen_since,),
            )
            return cursor.rowcount

    # -- per-asset stage progress -------------------------------------------------------

    def set_stage(
        self,
        conn: sqlite3.Connection,
        asset_id: str,
        stage: str,
        status: str,
        *,
        error: str | None = None,
        attempted: bool = False,
    ) -> None:
        """Record ``asset_id``'s status in ``stage`` (inside the caller's transaction)."""
        tries = int(attempted)
        conn.execute(_SET_STAGE, (asset_id, stage, status, tries, error, utc_now(), tries))
        if stage == FIRST_STAGE:  # its stage_status row now says where it is
            conn.execute("UPDATE assets SET fresh = 0 WHERE id = ? AND fresh", (asset_id,))

    def mark(self, asset_id: str, stage: str, status: str, **kwargs: Any) -> None:
        """``set_stage`` in a transaction of its own."""
        with self.transaction() as conn:
            self.set_stage(conn, asset_id, stage, status, **kwargs)

    def pending(self, stage: str, limit: int) -> list[str]:
        """Assets waiting in ``stage``, skipping trashed and deleted ones.

        Work sent back (retries, requeues) comes first, oldest first; then new images in
        the order they were first seen.
        """
        rows = self.read(
            f"SELECT s.asset_id {_PENDING} ORDER BY s.updated_at LIMIT ?", (stage, limit)
        )
        if stage == FIRST_STAGE and len(rows) < limit:
            sql = f"SELECT a.id {_FRESH} ORDER BY a.first_seen_at LIMIT ?"
            rows += self.read(sql, (limit - len(rows),))
        return [row[0] for row in rows]

    def pending_count(self, stage: str) -> int:
        """How many assets wait in ``stage`` (the queue depth)."""
        count = int(self.read(f"SELECT COUNT(*) {_PENDING}", (stage,))[0][0])
        if stage == FIRST_STAGE:
            count += int(self.read(f"SELECT COUNT(*) {_FRESH}")[0][0])
        return count

    def stage_of(self, asset_id: str, stage: str) -> tuple[str, int, str | None] | None:
        """(status, attempts, last error) of one asset in one stage."""
        rows = self.read(
            "SELECT status, attempts, last_error FROM stage_status "
            "WHERE asset_id = ? AND stage = ?",
            (asset_id, stage),
        )
        if not rows and stage == FIRST_STAGE:
            rows = self.read(
                "SELECT 'pending', 0, NULL FROM assets WHERE id = ? AND fresh", (asset_id,)
            )
        return rows[0] if rows else None

    # -- curation results -----------------------------------------------------------------

    def save_curation(
        self, asset_id: str, row: dict[str, object], *, done_stage: str, next_stage: str
    ) -> None:
        """Keep a curation result and move the asset from one stage to the next, atomically."""
        record = {"asset_id": asset_id, **row, "created_at": utc_now()}
        columns = ", ".join(record)
        marks = ", ".join("?" for _ in record)
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO curations ({columns}) VALUES ({marks})",
                tuple(record.values()),
            )
            self.set_stage(conn, asset_id, done_stage, "done", attempted=True)
            self.set_stage(conn, asset_id, next_stage, "pending")

    def curation(self, asset_id: str) -> dict[str, Any] | None:
        """The stored curation of an asset, JSON columns decoded."""
        with self._lock:
            try:
                row = self.db["curations"].get(asset_id)
            except NotFoundError:
                return None
        for column in ("scores", "orientation", "provenance"):
            if row[column] is not None:
                row[column] = json.loads(row[column])
        return row

    def requeue_older_curations(self, below_version: int, stage: str) -> int:
        """Make curations from prompt versions before ``below_version`` pending again."""
        with self.transaction() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT asset_id FROM curations WHERE prompt_version < ?", (below_version,)
                )
            ]
            for asset_id in ids:
                self.set_stage(conn, asset_id, stage, "pending")
        return len(ids)

    def requeue(self, stage: str, status: str) -> int:
        """Make every asset in ``status`` in ``stage`` pending again (e.g. quarantined)."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE stage_status SET status = 'pending', attempts = 0, updated_at = ? "
                "WHERE stage = ? AND status = ?",
                (utc_now(), stage, status),
            )
            return cursor.rowcount

    def curated_since(self, moment: str) -> int:
        """How many curations were made after ``moment`` (a stored timestamp)."""
        sql = "SELECT COUNT(*) FROM curations WHERE created_at > ?"
        return int(self.read(sql, (moment,))[0][0])

    # -- the ledger of writes to Immich ---------------------------------------------------

    def intend_write(self, asset_id: str, field: str, value: object) -> int:
        """Record, before doing it, that ``value`` is about to be written; return its id."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO writes (asset_id, field, value, state, intended_at) "
                "VALUES (?, ?, ?, 'intended', ?)",
                (asset_id, field, json.dumps(value, sort_keys=True), utc_now()),
            )
            return int(cursor.lastrowid or 0)

    def finish_write(self, write_id: int, state: str) -> None:
        """Record that an intended write happened (``done``) or never will (``abandoned``)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE writes SET state = ?, done_at = ? WHERE id = ? AND state = 'intended'",
                (state, utc_now(), write_id),
            )

    def unfinished_writes(self, asset_id: str) -> list[tuple[int, str, object]]:
        """Writes begun but not confirmed (a crash came between): (id, field, value)."""
        rows = self.read(
            "SELECT id, field, value FROM writes WHERE asset_id = ? AND state = 'intended' "
            "ORDER BY id",
            (asset_id,),
        )
        return [(row[0], row[1], json.loads(row[2])) for row in rows]

    def last_written(self, asset_id: str, field: str) -> tuple[bool, object]:
        """(True, value) for the last value darkroom wrote to ``field``; (False, None) if none."""
        rows = self.read(
            "SELECT value FROM writes WHERE asset_id = ? AND field = ? AND state = 'done' "
            "ORDER BY id DESC LIMIT 1",
            (asset_id, field),
        )
        return (True, json.loads(rows[0][0])) if rows else (False, None)

    def write_count(self, asset_id: str | None = None) -> int:
        """How many writes were confirmed (for one asset, or in all)."""
        if asset_id is None:
            return int(self.read("SELECT COUNT(*) FROM writes WHERE state = 'done'")[0][0])
        sql = "SELECT COUNT(*) FROM writes WHERE state = 'done' AND asset_id = ?"
        return int(self.read(sql, (asset_id,))[0][0])

    # -- fields a person owns -------------------------------------------------------------

    def claim_for_human(self, asset_id: str, field: str) -> None:
        """A person changed ``field``: darkroom never writes it again."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO human_fields (asset_id, field, noticed_at) VALUES (?, ?, ?)",
                (asset_id, field, utc_now()),
            )

    def is_human(self, asset_id: str, field: str) -> bool:
        """Whether a person has claimed ``field`` of ``asset_id``."""
        sql = "SELECT 1 FROM human_fields WHERE asset_id = ? AND field = ?"
        return bool(self.read(sql, (asset_id, field)))

    # -- the review queue -----------------------------------------------------------------

    def open_review(
        self, conn: sqlite3.Connection, asset_id: str, kind: str, proposal: dict
    ) -> None:
        """Ask a person to decide (inside the caller's transaction); reopens a closed one."""
        conn.execute(
            "INSERT INTO review_queue (asset_id, kind, proposal, status, created_at) "
            "VALUES (?, ?, ?, 'open', ?) ON CONFLICT (asset_id, kind) DO UPDATE SET "
            "proposal = excluded.proposal, status = 'open', created_at = excluded.created_at, "
            "resolved_at = NULL",
            (asset_id, kind, json.dumps(proposal, sort_keys=True), utc_now()),
        )

    def reviews(self, status: str = "open") -> list[tuple[str, str, dict, str]]:
        """(asset id, kind, proposal, created at) of reviews in ``status``."""
        rows = self.read(
            "SELECT asset_id, kind, proposal, created_at FROM review_queue WHERE status = ? "
            "ORDER BY created_at",
            (status,),
        )
        return [(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def resolve_review(self, asset_id: str, kind: str, status: str) -> bool:
        """Close (or reopen as ``undone``) a review; False when there was none."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE review_queue SET status = ?, resolved_at = ? "
                "WHERE asset_id = ? AND kind = ?",
                (status, utc_now(), asset_id, kind),
            )
            return cursor.rowcount > 0

    # -- summaries ------------------------------------------------------------------------

    def stage_counts(self) -> dict[str, dict[str, int]]:
        """For each stage, how many assets are in each status."""
        counts: dict[str, dict[str, int]] = {}
        rows = self.read(
            "SELECT stage, status, COUNT(*) FROM stage_status GROUP BY stage, status "
            "ORDER BY stage, status"
        )
        for stage, status, count in rows:
            counts.setdefault(stage, {})[status] = count
        fresh = int(self.read("SELECT COUNT(*) FROM assets WHERE fresh")[0][0])
        if fresh:
            first = counts.setdefault(FIRST_STAGE, {})
            first["pending"] = first.get("pending", 0) + fresh
        return counts

    def asset_counts(self) -> dict[str, int]:
        """Assets known, by state in Immich."""
        row = self.read(
            "SELECT COUNT(*), "
            "COALESCE(SUM(is_trashed AND NOT is_deleted), 0), "
            "COALESCE(SUM(is_deleted), 0) FROM assets"
        )[0]
        return {"known": row[0], "trashed": row[1], "deleted": row[2]}

    def problems(self, limit: int) -> list[tuple[str, str, str, int]]:
        """(stage, status, reason, count) of failed and quarantined assets, commonest first."""
        rows = self.read(
            "SELECT stage, status, COALESCE(last_error, ''), COUNT(*) AS n FROM stage_status "
            "WHERE status IN ('failed', 'quarantined', 'skipped') "
            "GROUP BY stage, status, last_error ORDER BY n DESC LIMIT ?",
            (limit,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def open_reviews(self) -> int:
        """How many decisions wait for a person."""
        return int(self.read("SELECT COUNT(*) FROM review_queue WHERE status = 'open'")[0][0])

    # -- training runs and checkpoints (migration 6; daemon/hooks.py writes, status reads) -

    def start_training_run(self, step_name: str, command: Sequence[str]) -> int:
        """Record that a hook process is being started; return the run's id."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO training_runs (step_name, command, started_at) VALUES (?, ?, ?)",
                (step_name, json.dumps(list(command)), utc_now()),
            )
            return int(cursor.lastrowid or 0)

    def end_training_run(
        self,
        run_id: int,
        outcome: str,
        exit_code: int | None,
        first_step: int | None = None,
        last_step: int | None = None,
    ) -> None:
        """Record how a run ended (and which training steps it went through, when known)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE training_runs SET ended_at = ?, outcome = ?, exit_code = ?, "
                "first_step = ?, last_step = ? WHERE id = ?",
                (utc_now(), outcome, exit_code, first_step, last_step, run_id),
            )

    def end_unfinished_training_runs(self, outcome: str) -> int:
        """Close the runs a daemon that died left open; return how many there were."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE training_runs SET ended_at = ?, outcome = ? WHERE ended_at IS NULL",
                (utc_now(), outcome),
            )
            return cursor.rowcount

    def training_runs(self, limit: int) -> list[TrainingRun]:
        """The newest runs first."""
        rows = self.read(
            f"SELECT {_RUN_COLUMNS} FROM training_runs ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [TrainingRun(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    def upsert_checkpoints(self, checkpoints: Sequence[CheckpointRecord]) -> None:
        """Record checkpoints found on disk, replacing what was known of the same steps."""
        now = utc_now()
        rows = [
            (c.step, c.path, int(c.milestone), c.cache_generation, c.created_at, now)
            for c in checkpoints
        ]
        with self.transaction() as conn:
            conn.executemany(
                f"INSERT INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (step) DO UPDATE SET path = excluded.path, "
                "milestone = excluded.milestone, cache_generation = excluded.cache_generation, "
                "created_at = excluded.created_at, seen_at = excluded.seen_at",
                rows,
            )

    def newest_checkpoints(self, limit: int) -> list[CheckpointRecord]:
        """The checkpoints of the highest steps first."""
        rows = self.read(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY step DESC LIMIT ?", (limit,)
        )
        return [CheckpointRecord(r[0], r[1], bool(r[2]), *r[3:]) for r in rows]

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the WAL is checkpointed by SQLite on last close."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
