"""The encode/train hooks: windows, thresholds, one run at a time, failures contained;
the trainer stopped at the window's end, restarted after a crash, recorded in the store.

Every command is a real subprocess: small Python scripts stand in for the encoder and the
trainer (progress.json, checkpoint folders, SIGTERM handling, exit codes)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

import pytest

from daemon.hooks import LAST_RUN_KEY, RESUME_KEY, Hooks, in_window, scan_checkpoints
from daemon.settings import HookSettings
from daemon.store import Store, TrainingRun
from tests.test_store import insert_asset
from trainer.progress_file import read_progress

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


def test_samples_follow_a_finished_training(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    settings = HookSettings(
        window="",
        min_new_samples=1,
        train_command=step(tmp_path, "train"),
        samples_command=step(tmp_path, "samples"),
    )
    hooks = Hooks(settings, store)
    curated(store, 1)
    settle(hooks, NOON)
    assert (tmp_path / "samples").read_text() == "ran\n"
    assert [run.step_name for run in store.training_runs(5)] == ["samples", "train"]


def test_samples_do_not_follow_a_crashed_training(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    settings = HookSettings(
        window="",
        min_new_samples=1,
        max_restarts=0,
        train_command=step(tmp_path, "train", code=1),
        samples_command=step(tmp_path, "samples"),
    )
    hooks = Hooks(settings, store)
    curated(store, 1)
    settle(hooks, NOON)
    assert (tmp_path / "train").read_text() == "ran\n"
    assert not (tmp_path / "samples").exists()


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


# -- the train step: window end, crashes, exit 78, the store ---------------------------------

MORNING = datetime(2026, 11, 22, 6, 0)  # the default window (01:00-06:00) has just ended
NEXT_NIGHT = datetime(2026, 11, 23, 1, 30)
WAIT_S = 15.0
POLL_S = 0.02

# A stand-in for ``darkroom train``: resumes after ``checkpoints/latest``, writes a checkpoint
# (a milestone) and progress.json, then behaves as argv[2] says for its Nth start (a comma-
# separated list, the last entry repeating): "sleep" (until SIGTERM: checkpoint, exit 0),
# "ignore-term" (SIGTERM ignored), "exitN" (exit N), "unworkable" (progress "failed", exit 78).
TRAINER = """
import json, os, signal, sys, time
from datetime import UTC, datetime
from pathlib import Path

out = Path(sys.argv[1])
with (out / "starts").open("a") as handle:
    handle.write(f"{os.getpid()}\\n")
starts = len((out / "starts").read_text().split())
plan = sys.argv[2].split(",")
behaviour = plan[min(starts, len(plan)) - 1]
root = out / "checkpoints"
root.mkdir(parents=True, exist_ok=True)
latest = root / "latest"
first = int(latest.read_text().strip()[5:]) if latest.exists() else 0
started = datetime.now(UTC).isoformat(timespec="seconds")


def progress(state, step, **extra):
    payload = {
        "state": state, "step": step, "first_step": first, "target_step": first + 1000,
        "started_at": started, "updated_at": datetime.now(UTC).isoformat(), "pid": os.getpid(),
        "loss_trend": [0.2, 0.18, 0.15], "images_per_s": 3.5, "next_checkpoint": step + 500,
        "eta_next_checkpoint_s": 600.0, "last_checkpoint": step, **extra,
    }
    (out / ".progress.tmp").write_text(json.dumps(payload))
    os.replace(out / ".progress.tmp", out / "progress.json")


def checkpoint(step, milestone):
    name = f"step-{step:08d}"
    (root / name).mkdir()
    manifest = {"format": 1, "step": step, "cache_generation": 2, "milestone": milestone,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "files": {}}
    (root / name / "manifest.json").write_text(json.dumps(manifest))
    latest.write_text(name + "\\n")


def on_term(signum, frame):
    checkpoint(first + 20, False)
    progress("finished", first + 20, reason="asked to stop")
    sys.exit(0)


signal.signal(signal.SIGTERM, signal.SIG_IGN if behaviour == "ignore-term" else on_term)
checkpoint(first + 10, True)
progress("running", first + 10)
if behaviour == "unworkable":
    progress("failed", first + 10, error="out of memory 3 times at batch size 1")
    sys.exit(78)
if behaviour.startswith("exit"):
    sys.exit(int(behaviour[4:]))
time.sleep(60)
"""


@dataclass
class ManualClock:
    """The monotonic clock the hooks read, moved by hand (stop timeout, restart backoff)."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def trainer(tmp_path: Path, plan: str) -> list[str]:
    """The stand-in trainer's command, writing into ``tmp_path / "out"``."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER, encoding="utf-8")
    (tmp_path / "out").mkdir(exist_ok=True)
    return [sys.executable, str(script), str(tmp_path / "out"), plan]


def starts(tmp_path: Path) -> int:
    path = tmp_path / "out" / "starts"
    return len(path.read_text().split()) if path.exists() else 0


def make_hooks(
    tmp_path: Path, plan: str, clock: ManualClock | None = None, **settings: Any
) -> Hooks:
    """Hooks running the stand-in trainer, with one new photo: one run is due, not more."""
    options: dict[str, Any] = {"min_new_samples": 1, "train_command": trainer(tmp_path, plan)}
    store = Store(tmp_path / "db.sqlite3")
    curated(store, 1)
    return Hooks(
        HookSettings(**{**options, **settings}),
        store,
        checkpoint_dir=tmp_path / "out",
        clock=clock or ManualClock(),
    )


def until(hooks: Hooks, now: datetime, done: Callable[[], bool]) -> None:
    """Check the hooks at ``now`` (real subprocesses take real time) until ``done()``."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        hooks.check(now)
        if done():
            return
        time.sleep(POLL_S)
    raise AssertionError("the hooks did not get there in time")


def progress_state(tmp_path: Path) -> str | None:
    progress = read_progress(tmp_path / "out")
    return None if progress is None else progress["state"]


def last_run(hooks: Hooks) -> TrainingRun:
    return hooks.store.training_runs(1)[0]


def test_window_end_stops_the_trainer_with_sigterm_and_records_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "darkroom.hooks")
    hooks = make_hooks(tmp_path, "sleep", samples_command=step(tmp_path, "samples"))
    until(hooks, NIGHT, lambda: progress_state(tmp_path) == "running")
    hooks.check(NIGHT)  # while it runs: its checkpoints reach the store
    assert [(c.step, c.milestone) for c in hooks.store.newest_checkpoints(5)] == [(10, True)]
    assert last_run(hooks).ended_at is None
    started = time.monotonic()
    hooks.check(MORNING)
    assert time.monotonic() - started < 1  # asked, not waited for
    assert "the window 01:00-06:00 has ended: stopping train (SIGTERM" in caplog.text
    until(hooks, MORNING, lambda: not hooks.running)
    samples, run = hooks.store.training_runs(2)
    assert (samples.step_name, samples.outcome) == ("samples", "finished")
    assert (run.step_name, run.outcome, run.exit_code) == ("train", "stopped", 0)
    assert (run.first_step, run.last_step) == (0, 20)
    checkpoints = hooks.store.newest_checkpoints(5)
    assert [(c.step, c.milestone, c.cache_generation) for c in checkpoints] == [
        (20, False, 2),
        (10, True, 2),
    ]
    assert checkpoints[0].path == str(tmp_path / "out" / "checkpoints" / "step-00000020")
    # The checkpoints written before the stop get their samples, outside the window too.
    assert (tmp_path / "samples").read_text() == "ran\n"
    assert not hooks.due(MORNING)
    # Cut short, it continues next window although no new photo was curated.
    until(hooks, NEXT_NIGHT, lambda: starts(tmp_path) == 2)
    hooks.stop()
    assert last_run(hooks).outcome == "shutdown"


def test_a_trainer_that_does_not_stop_is_killed_after_the_timeout(tmp_path: Path) -> None:
    clock = ManualClock()
    hooks = make_hooks(tmp_path, "ignore-term", clock, train_stop_timeout_s=300)
    until(hooks, NIGHT, lambda: progress_state(tmp_path) == "running")
    hooks.check(MORNING)
    clock.now += 299
    time.sleep(0.2)  # SIGTERM had time to work, were it not ignored
    hooks.check(MORNING)
    assert hooks.running
    clock.now += 2
    until(hooks, MORNING, lambda: not hooks.running)
    run = last_run(hooks)
    assert (run.outcome, run.exit_code, run.last_step) == ("killed", -signal.SIGKILL, 10)


def test_train_stop_command_stops_a_trainer_running_elsewhere(tmp_path: Path) -> None:
    """Like ``systemctl start --wait``: the direct child ignores SIGTERM; the stop command
    (``systemctl stop``) reaches the trainer itself."""
    child = trainer(tmp_path, "sleep")
    waiter = (
        "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"sys.exit(subprocess.call({child!r}))"
    )
    progress = tmp_path / "out" / "progress.json"
    stopper = (
        f"import json, os, signal; os.kill(json.load(open({str(progress)!r}))['pid'], "
        "signal.SIGTERM)"
    )
    hooks = make_hooks(
        tmp_path,
        "sleep",
        train_command=[sys.executable, "-c", waiter],
        train_stop_command=[sys.executable, "-c", stopper],
    )
    until(hooks, NIGHT, lambda: progress_state(tmp_path) == "running")
    until(hooks, MORNING, lambda: not hooks.running)
    run = last_run(hooks)
    assert (run.outcome, run.exit_code, run.last_step) == ("stopped", 0, 20)


def test_a_crashed_trainer_restarts_alone_with_doubling_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "darkroom.hooks")
    clock = ManualClock()
    hooks = make_hooks(
        tmp_path,
        "exit3,exit3,exit0",
        clock,
        encode_command=step(tmp_path, "encode"),
        restart_backoff_s=60,
        restart_backoff_max_s=100,
    )
    until(hooks, NIGHT, lambda: starts(tmp_path) == 1 and hooks._current is None)
    assert hooks.running  # a restart is pending
    clock.now += 59
    hooks.check(NIGHT)
    assert starts(tmp_path) == 1
    clock.now += 1
    until(hooks, NIGHT, lambda: starts(tmp_path) == 2 and hooks._current is None)
    clock.now += 99  # 120 s doubled, capped at 100 s
    hooks.check(NIGHT)
    assert starts(tmp_path) == 2
    clock.now += 1
    until(hooks, NIGHT, lambda: not hooks.running)
    assert starts(tmp_path) == 3
    assert (tmp_path / "encode").read_text() == "ran\n"  # encode is not redone
    runs = hooks.store.training_runs(10)
    assert [(r.step_name, r.outcome, r.exit_code) for r in reversed(runs)] == [
        ("encode", "finished", 0),
        ("train", "crashed", 3),
        ("train", "crashed", 3),
        ("train", "finished", 0),
    ]
    assert [r.first_step for r in reversed(runs[:3])] == [0, 10, 20]  # each resumed
    assert "restarting it from its last checkpoint in 60s (restart 1 of 5)" in caplog.text
    assert "in 100s (restart 2 of 5)" in caplog.text


def test_restarts_are_limited_per_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    hooks = make_hooks(tmp_path, "exit3", clock, max_restarts=2)
    for expected in (1, 2, 3):
        until(hooks, NIGHT, lambda n=expected: starts(tmp_path) == n and hooks._current is None)
        clock.now += 3600
    hooks.check(NIGHT)
    assert not hooks.running and starts(tmp_path) == 3
    assert "has been restarted 2 times; the run stops here" in caplog.text
    assert not hooks.due(NIGHT)  # a broken trainer waits for new photos, not the next night


def test_no_restart_once_the_window_has_closed(tmp_path: Path) -> None:
    clock = ManualClock()
    hooks = make_hooks(tmp_path, "exit3,sleep", clock)
    until(hooks, NIGHT, lambda: starts(tmp_path) == 1 and hooks._current is None)
    clock.now += 3600
    hooks.check(MORNING)
    assert not hooks.running and starts(tmp_path) == 1
    assert hooks.due(NEXT_NIGHT)  # owed a continuation, without new photos
    until(hooks, NEXT_NIGHT, lambda: progress_state(tmp_path) == "running")
    hooks.stop()


def test_exit_78_is_not_retried_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    hooks = make_hooks(tmp_path, "unworkable", clock)
    until(hooks, NIGHT, lambda: starts(tmp_path) == 1 and not hooks.running)
    clock.now += 3600
    hooks.check(NIGHT)
    time.sleep(0.2)
    assert starts(tmp_path) == 1
    run = last_run(hooks)
    assert (run.outcome, run.exit_code) == ("unworkable", 78)
    assert "its settings cannot work here: out of memory 3 times at batch size 1" in caplog.text


def test_training_waits_when_encoding_ends_after_the_window(tmp_path: Path) -> None:
    hooks = make_hooks(tmp_path, "sleep", encode_command=step(tmp_path, "encode"))
    hooks.check(NIGHT)
    until(hooks, MORNING, lambda: not hooks.running)
    assert (tmp_path / "encode").exists() and starts(tmp_path) == 0
    assert hooks.store.get_value(RESUME_KEY)


def test_a_command_that_cannot_start_is_recorded(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-trainer")
    hooks = make_hooks(tmp_path, "sleep", train_command=[missing])
    hooks.check(NIGHT)
    assert not hooks.running
    run = last_run(hooks)
    assert (run.outcome, run.exit_code, run.command) == ("crashed", None, [missing])


def test_runs_left_open_by_a_dead_daemon_are_closed_and_continued(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    run_id = store.start_training_run("train", ["darkroom", "train"])
    store.set_value(LAST_RUN_KEY, "9999")  # no new photos since
    hooks = Hooks(HookSettings(min_new_samples=1, train_command=["true"]), store)
    assert last_run(hooks).id == run_id and last_run(hooks).outcome == "abandoned"
    assert hooks.due(NIGHT)


def test_checkpoint_scan_skips_what_it_cannot_read(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = {"step": 500, "cache_generation": 1, "milestone": False, "created_at": "2026-11-22"}
    folders = {
        "step-00000500": json.dumps(good),
        "step-00001000": "{not json",
        "step-00001500": json.dumps({**good, "step": 7}),  # another step's manifest
        ".tmp-step-00002000": json.dumps({**good, "step": 2000}),  # unfinished
        "step-00002500": None,  # no manifest
    }
    for name, manifest in folders.items():
        (root / name).mkdir(parents=True)
        if manifest is not None:
            (root / name / "manifest.json").write_text(manifest)
    (root / "latest").write_text("step-00000500\n")
    assert [c.step for c in scan_checkpoints(tmp_path)] == [500]
    assert scan_checkpoints(tmp_path / "nowhere") == []
