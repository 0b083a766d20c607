"""The single owner of darkroom's SQLite state database.

Every read and write of the state goes through :class:`Store`.  The database runs in WAL
mode so ``darkroom status`` can read while the daemon writes; writes are serialised by one
lock and happen inside explicit ``BEGIN IMMEDIATE`` transactions, so a process killed at any
point leaves either the whole transaction or none of it.  The schema evolves through the
numbered migrations in :data:`MIGRATIONS`; ``PRAGMA user_version`` records how many ran.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import sqlite_utils

BUSY_TIMEOUT_MS = 10_000


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

# Append only: a released migration is never edited, a new one is added at the end.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_MIGRATION_1, _MIGRATION_2)
SCHEMA_VERSION = len(MIGRATIONS)


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
        # FULL: a write recorded as done must survive a power cut, or it could be redone.
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")

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
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

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
        return counts

    def asset_counts(self) -> dict[str, int]:
        """Assets known, by state in Immich."""
        row = self.read(
            "SELECT COUNT(*), "
            "COALESCE(SUM(is_trashed AND NOT is_deleted), 0), "
            "COALESCE(SUM(is_deleted), 0) FROM assets"
        )[0]
        return {"known": row[0], "trashed": row[1], "deleted": row[2]}

    def open_reviews(self) -> int:
        """How many decisions wait for a person."""
        return int(self.read("SELECT COUNT(*) FROM review_queue WHERE status = 'open'")[0][0])

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
