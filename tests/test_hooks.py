"""The encode/train hooks: windows, thresholds, one run at a time, failures contained."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from datetime import time as clock
from pathlib import Path

import pytest

from daemon.hooks import Hooks, in_window
from daemon.settings import HookSettings
from daemon.store import Store
from tests.test_store import insert_asset

NIGHT = datetime(2026, 11, 22, 2, 30)
NOON = datetime(2026, 11, 22, 12, 0)


@pytest.mark.parametrize(
    ("window", "now", "inside"),
    [
        ("01:00-06:00", clock(2, 30), True),
        ("01:00-06:00", clock(6, 0), False),
        ("01:00-06:00", clock(0, 59), False),
        ("22:00-05:00", clock(23, 0), True),
        ("22:00-05:00", clock(4, 59), True),
        ("22:00-05:00", clock(12, 0), False),
        ("", clock(12, 0), True),
    ],
)
def test_window(window: str, now: clock, inside: bool) -> None:
    assert in_window(window, now) is inside


def curated(store: Store, count: int) -> None:
    with store.transaction() as conn:
        for index in range(count):
            asset_id = f"a{time.monotonic_ns()}-{index}"
            insert_asset(conn, asset_id)
            conn.execute(
                "INSERT INTO curations (asset_id, model, digest, prompt_version, provenance, "
                "created_at) VALUES (?, 'm', 'd', 1, '{}', strftime('%Y-%m-%dT%H:%M:%f', 'now'))",
                (asset_id,),
            )


def step(tmp_path: Path, name: str, code: int = 0) -> list[str]:
    """A command that notes it ran, then exits with ``code``."""
    marker = tmp_path / name
    script = f"open({str(marker)!r}, 'a').write('ran\\n'); raise SystemExit({code})"
    return [sys.executable, "-c", script]


def settle(hooks: Hooks, now: datetime) -> None:
    for _ in range(200):
        hooks.check(now)
        if not hooks.running:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not finish")


def test_run_needs_window_and_enough_new_samples(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    settings = HookSettings(
        min_new_samples=3,
        encode_command=step(tmp_path, "encode"),
        train_command=step(tmp_path, "train"),
    )
    hooks = Hooks(settings, store)
    curated(store, 2)
    assert not hooks.due(NIGHT)  # too few new samples
    curated(store, 1)
    assert not hooks.due(NOON)  # outside the window
    assert hooks.due(NIGHT)
    settle(hooks, NIGHT)
    assert (tmp_path / "encode").read_text() == "ran\n"
    assert (tmp_path / "train").read_text() == "ran\n"
    assert not hooks.due(NIGHT)  # the samples were used by that run
    curated(store, 3)
    assert hooks.due(NIGHT)


def test_failed_encode_stops_the_run_and_not_the_daemon(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    settings = HookSettings(
        window="",
        min_new_samples=1,
        encode_command=step(tmp_path, "encode", code=137),  # as if killed for memory
        train_command=step(tmp_path, "train"),
    )
    hooks = Hooks(settings, store)
    curated(store, 1)
    settle(hooks, NOON)
    assert (tmp_path / "encode").read_text() == "ran\n"  # once: not retried in a loop
    assert not (tmp_path / "train").exists()


def test_only_one_run_at_a_time_and_stop_terminates(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    hooks = Hooks(HookSettings(window="", min_new_samples=0, train_command=slow), store)
    hooks.check(NOON)
    assert hooks.running and not hooks.due(NOON)
    started = time.monotonic()
    hooks.stop()
    assert not hooks.running
    assert time.monotonic() - started < 5


def test_nothing_configured_means_nothing_runs(tmp_path: Path) -> None:
    hooks = Hooks(HookSettings(window="", min_new_samples=0), Store(tmp_path / "db.sqlite3"))
    hooks.check(NOON)
    assert not hooks.running and not hooks.due(NOON)
