"""``darkroom status``: the training part (last run, live progress, checkpoints), also
without torch installed."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from daemon.hooks import Hooks
from daemon.settings import HookSettings, Settings
from daemon.status import render_status, training_lines
from daemon.store import CheckpointRecord, Store
from tests.test_hooks import MORNING, NIGHT, TRAINER, until
from trainer.progress_file import read_progress, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 60


def settings_in(tmp_path: Path) -> Settings:
    paths = {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")}
    return Settings.model_validate({"paths": paths})


def training_part(settings: Settings) -> str:
    text = render_status(settings)
    return text[text.index("training:") : text.index("\nsamples:")]


def test_status_follows_a_training_run(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    checkpoint_dir = settings.paths.checkpoint_dir
    checkpoint_dir.mkdir(parents=True)
    (tmp_path / "trainer.py").write_text(TRAINER, encoding="utf-8")
    command = [sys.executable, str(tmp_path / "trainer.py"), str(checkpoint_dir), "sleep"]
    store = Store(settings.paths.database)
    assert "last run: none yet" in training_part(settings)
    assert "checkpoints: none recorded yet" in training_part(settings)

    hooks_settings = HookSettings(min_new_samples=0, train_command=command)
    hooks = Hooks(hooks_settings, store, checkpoint_dir=checkpoint_dir)
    until(hooks, NIGHT, lambda: read_progress(checkpoint_dir) is not None)
    hooks.check(NIGHT)
    shown = training_part(settings)
    assert "train, started" in shown and "still running" in shown
    assert (
        "now: step 10 of 1000, loss 0.2000 → 0.1500 ↓, 3.50 images/s, "
        "next checkpoint at step 510 in ~10 min"
    ) in shown
    assert "step       10" in shown and "(milestone, latest)" in shown

    until(hooks, MORNING, lambda: not hooks.running)
    shown = training_part(settings)
    assert ": stopped at the window's end (exit code 0), steps 0 → 20" in shown
    assert "last progress (finished): step 20 of 1000, loss" in shown
    assert "next checkpoint" not in shown  # nothing is coming
    shutil.rmtree(checkpoint_dir / "checkpoints" / "step-00000010")  # pruned by the trainer
    lines = training_part(settings).splitlines()
    assert lines[-2].strip().startswith("step       20") and lines[-2].endswith("(latest)")
    assert lines[-1].endswith("(milestone, deleted since)")
    store.close()


def test_progress_line_tolerates_gaps() -> None:
    progress = {
        "state": "running",
        "pid": os.getpid(),
        "step": 5,
        "target_step": None,
        "loss_trend": [math.nan, 0.3, 0.31],
        "images_per_s": None,
        "next_checkpoint": 500,
        "eta_next_checkpoint_s": None,
    }
    lines = training_lines([], progress, [], Path("/nonexistent"))
    assert lines[2] == "  now: step 5, loss 0.3000 → 0.3100 ↑, next checkpoint at step 500"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    progress["pid"] = int(gone.stdout)  # killed without a last word: progress.json is stale
    lines = training_lines([], progress, [], Path("/nonexistent"))
    assert lines[2].startswith(f"  last progress (said running, but process {gone.stdout.strip()}")
    assert "next checkpoint" not in lines[2]


def test_status_needs_no_torch(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    checkpoint_dir = settings.paths.checkpoint_dir
    checkpoint_dir.mkdir(parents=True)
    with Store(settings.paths.database) as store:
        run_id = store.start_training_run("train", ["darkroom", "train"])
        store.end_training_run(run_id, "crashed", 3, 0, 40)
        store.upsert_checkpoints(
            [CheckpointRecord(40, str(checkpoint_dir), False, 1, "2026-11-22T02:00:00+00:00")]
        )
    write_json_atomic(
        checkpoint_dir / "progress.json", {"state": "failed", "step": 40, "loss_trend": [0.5]}
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from daemon.settings import Settings
        from daemon.status import render_status
        paths = {{"state_dir": {str(tmp_path / "state")!r}, "cache_dir": "/nonexistent"}}
        print(render_status(Settings.model_validate({{"paths": paths}})))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ": crashed (exit code 3), steps 0 → 40" in result.stdout
    assert "last progress (failed): step 40, loss 0.5000 → 0.5000 =" in result.stdout
    assert "step       40" in result.stdout
