"""The state store: migrations, refusal of newer schemas, atomic transactions under kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.store import FIRST_STAGE, SCHEMA_VERSION, SchemaTooNewError, SeenAsset, Store

ASSET = {
    "id": "3f1b7c9e-2d4a-4b8e-9c1d-0a2b3c4d5e6f",
    "owner_id": "owner",
    "type": "IMAGE",
    "checksum": "abc=",
    "immich_updated_at": "2026-11-01T00:00:00.000Z",
    "visibility": "timeline",
    "first_seen_at": "2026-11-01T00:00:00Z",
    "last_seen_at": "2026-11-01T00:00:00Z",
}


def insert_asset(conn: sqlite3.Connection, asset_id: str) -> None:
    row = {**ASSET, "id": asset_id}
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT INTO assets ({columns}) VALUES ({marks})", tuple(row.values()))


def test_new_database_is_wal_and_current(tmp_path: Path) -> None:
    with Store(tmp_path / "state" / "db.sqlite3") as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.read("PRAGMA journal_mode")[0][0] == "wal"
        tables = {row[0] for row in store.read("SELECT name FROM sqlite_master")}
    assert {"assets", "stage_status", "writes", "review_queue", "kv"} <= tables


@pytest.mark.parametrize("old_version", range(1, SCHEMA_VERSION))
def test_older_database_is_migrated_keeping_data(tmp_path: Path, old_version: int) -> None:
    path = tmp_path / "db.sqlite3"
    with Store(path, migrate_to=old_version) as old:
        assert old.schema_version == old_version
        with old.transaction() as conn:
            insert_asset(conn, ASSET["id"])
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.asset_counts()["known"] == 1
        with store.transaction() as conn:  # the tables of later migrations now exist
            conn.execute(
                "INSERT INTO review_queue (asset_id, kind, proposal, status, created_at) "
                "VALUES (?, 'rotation', '{}', 'open', 'now')",
                (ASSET["id"],),
            )
        assert store.open_reviews() == 1


def test_newer_database_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="newer darkroom"):
        Store(path)


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        with pytest.raises(RuntimeError), store.transaction() as conn:
            insert_asset(conn, "a")
            raise RuntimeError("boom")
        assert store.asset_counts()["known"] == 0


def test_stage_counts(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        with store.transaction() as conn:
            for index, status in enumerate(["done", "done", "quarantined"]):
                insert_asset(conn, f"a{index}")
                conn.execute(
                    "INSERT INTO stage_status (asset_id, stage, status, updated_at) "
                    "VALUES (?, 'curate', ?, 'now')",
                    (f"a{index}", status),
                )
        assert store.stage_counts() == {"curate": {"done": 2, "quarantined": 1}}


def seen(asset_id: str, checksum: str = "c1", kind: str = "IMAGE") -> SeenAsset:
    return SeenAsset(asset_id, "owner", kind, checksum, "2026-11-01T00:00:00Z", "timeline",
                     False, f"{asset_id}.jpg", True)  # fmt: skip


def test_new_images_wait_in_the_first_stage_until_handled(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        counts = store.upsert_assets([seen("a"), seen("b"), seen("v", kind="VIDEO")])
        assert (counts.new, counts.skipped) == (2, 1)
        assert store.pending(FIRST_STAGE, 10) == ["a", "b"]
        assert store.pending_count(FIRST_STAGE) == 2
        assert store.stage_of("a", FIRST_STAGE) == ("pending", 0, None)
        assert store.stage_counts()[FIRST_STAGE] == {"pending": 2, "skipped": 1}

        store.mark("a", FIRST_STAGE, "failed", error="boom", attempted=True)
        store.mark("b", FIRST_STAGE, "done", attempted=True)
        assert store.pending(FIRST_STAGE, 10) == []
        assert store.stage_of("a", FIRST_STAGE) == ("failed", 1, "boom")
        # Seen again unchanged: no new work; replaced: pending again, stages forgotten.
        assert store.upsert_assets([seen("a"), seen("b")]).updated == 2
        assert store.pending(FIRST_STAGE, 10) == []
        assert store.upsert_assets([seen("b", checksum="c2")]).replaced == 1
        assert store.stage_of("b", FIRST_STAGE) == ("pending", 0, None)
        # Retried work comes before new images.
        store.mark("a", FIRST_STAGE, "pending")
        assert store.pending(FIRST_STAGE, 10) == ["a", "b"]
        assert store.pending(FIRST_STAGE, 1) == ["a"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from daemon.store import Store
    from tests.test_store import insert_asset

    store = Store(Path(sys.argv[1]))
    with store.transaction() as conn:
        insert_asset(conn, "committed")
    with store.transaction() as conn:
        for index in range(50):
            insert_asset(conn, f"partial-{index}")
        print("mid-transaction", flush=True)
        time.sleep(60)
    """
)


def test_kill_9_mid_transaction_leaves_no_partial_row(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "mid-transaction"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with Store(path) as store:
        ids = [row[0] for row in store.read("SELECT id FROM assets")]
        assert ids == ["committed"]
        assert store.read("PRAGMA integrity_check")[0][0] == "ok"
