"""``darkroom status``: what the state database says, for a person to read.

Training is shown from three sources: the last encode/train run the daemon recorded, the
trainer's own ``progress.json`` while it runs, and the checkpoints the daemon found.  Nothing
here imports torch (``trainer.progress_file`` is torch-free), so status works on a machine
without the training extra.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.hooks import CHECKPOINTS_DIR, Outcome
from daemon.results import SAMPLE, Evaluation, Results
from daemon.settings import Settings
from daemon.store import CheckpointRecord, Store, TrainingRun
from trainer.progress_file import read_progress

MAX_PROBLEMS = 20
MAX_CHECKPOINTS = 5
SECONDS_PER_MINUTE = 60
LATEST_NAME = "latest"  # the trainer's pointer to its newest complete checkpoint
SHOWN_TIME = "%Y-%m-%d %H:%M"
OUTCOMES = {
    Outcome.FINISHED: "finished",
    Outcome.STOPPED: "stopped at the window's end",
    Outcome.KILLED: "killed: it did not stop in time after the window's end",
    Outcome.CRASHED: "crashed",
    Outcome.UNWORKABLE: "gave up: its settings cannot work here",
    Outcome.SHUTDOWN: "stopped with the daemon",
    Outcome.ABANDONED: "cut off when the daemon died",
}


def render_status(settings: Settings) -> str:
    """Counts of assets, of each stage's statuses, of open reviews, and training."""
    path = settings.paths.database
    if not path.exists():
        return f"no state yet: {path} does not exist (darkroom has not run here)"
    with Store(path) as store:
        assets = store.asset_counts()
        stages = store.stage_counts()
        reviews = store.open_reviews()
        problems = store.problems(MAX_PROBLEMS)
        runs = store.training_runs(1)
        checkpoints = store.newest_checkpoints(MAX_CHECKPOINTS)
        results = Results(store)
        samples = sample_lines(
            len(results.renders(SAMPLE)), results.upload_count(), results.latest_evaluations()
        )
    lines = [
        f"state: {path}",
        f"assets: {assets['known']} known, {assets['trashed']} in trash, "
        f"{assets['deleted']} deleted in Immich",
    ]
    if not stages:
        lines.append("stages: nothing processed yet")
    for stage, counts in stages.items():
        parts = ", ".join(f"{count} {status}" for status, count in counts.items())
        lines.append(f"{stage}: {parts}")
    lines.append(f"review queue: {reviews} open")
    if problems:
        lines.append("why assets were skipped, quarantined or failed:")
    for stage, status, reason, count in problems:
        lines.append(f"  {count:>5} {stage} {status}: {reason or 'no reason recorded'}")
    checkpoint_dir = settings.paths.checkpoint_dir
    lines += training_lines(runs, read_progress(checkpoint_dir), checkpoints, checkpoint_dir)
    return "\n".join(lines + samples)


def sample_lines(renders: int, uploads: int, evaluations: list[Evaluation]) -> list[str]:
    """What ``darkroom samples`` made: renders, uploads, the newest held-out figures."""
    lines = ["samples:", f"  {renders} validation renders, {uploads} files uploaded to Immich"]
    if evaluations:
        newest, first = evaluations[-1], evaluations[0]
        lines.append(
            f"  held-out loss at step {newest.step} ({newest.samples} photos): "
            f"early {newest.early:.4f}, middle {newest.middle:.4f}, late {newest.late:.4f} "
            f"(step {first.step}: {first.early:.4f}, {first.middle:.4f}, {first.late:.4f})"
        )
    else:
        lines.append("  held-out loss: not evaluated yet")
    return lines


def training_lines(
    runs: list[TrainingRun],
    progress: dict[str, Any] | None,
    checkpoints: list[CheckpointRecord],
    checkpoint_dir: Path,
) -> list[str]:
    """The training part of the status: last run, live progress, newest checkpoints."""
    lines = ["training:", f"  last run: {_run(runs[0])}" if runs else "  last run: none yet"]
    if progress is not None:
        lines.append(f"  {_progress(progress)}")
    if not checkpoints:
        lines.append("  checkpoints: none recorded yet")
        return lines
    lines.append("  checkpoints (newest first):")
    latest = _latest_name(checkpoint_dir)
    for checkpoint in checkpoints:
        notes = [
            "milestone" if checkpoint.milestone else "",
            "latest" if Path(checkpoint.path).name == latest else "",
            "" if Path(checkpoint.path).exists() else "deleted since",
        ]
        shown = ", ".join(note for note in notes if note)
        created = _when(checkpoint.created_at)
        lines.append(
            f"    step {checkpoint.step:>8}  {created}" + (f"  ({shown})" if shown else "")
        )
    return lines


def _run(run: TrainingRun) -> str:
    """One run: what, when, how it ended, which training steps it went through."""
    text = f"{run.step_name}, started {_when(run.started_at)}"
    if run.ended_at is None:
        text += ", still running"
    else:
        outcome = OUTCOMES.get(run.outcome, run.outcome) if run.outcome else "ended"
        code = "" if run.exit_code is None else f" (exit code {run.exit_code})"
        text += f", ended {_when(run.ended_at)}: {outcome}{code}"
    if run.last_step is not None:
        text += f", steps {run.first_step} → {run.last_step}"
    return text


def _progress(progress: dict[str, Any]) -> str:
    """The trainer's progress.json in one line: step, loss trend, speed, next checkpoint."""
    state, pid = progress.get("state"), progress.get("pid")
    running = state == "running" and _alive(pid)
    head = "now" if running else f"last progress ({state})"
    if state == "running" and not running:
        head = f"last progress (said running, but process {pid} is gone)"
    target = progress.get("target_step")
    parts = [f"step {progress.get('step')}" + (f" of {target}" if target is not None else "")]
    trend = [x for x in progress.get("loss_trend") or [] if isinstance(x, float | int)]
    trend = [x for x in trend if math.isfinite(x)]
    if trend:
        first, last = trend[0], trend[-1]
        arrow = "↓" if last < first else "↑" if last > first else "="
        parts.append(f"loss {first:.4f} → {last:.4f} {arrow}")
    speed = progress.get("images_per_s")
    if isinstance(speed, float | int):
        parts.append(f"{speed:.2f} images/s")
    next_step, eta = progress.get("next_checkpoint"), progress.get("eta_next_checkpoint_s")
    if running and next_step is not None:
        minutes = f" in ~{eta / SECONDS_PER_MINUTE:.0f} min" if isinstance(eta, float | int) else ""
        parts.append(f"next checkpoint at step {next_step}{minutes}")
    return f"{head}: " + ", ".join(parts)


def _alive(pid: object) -> bool:
    """Whether process ``pid`` exists (it may belong to another user, e.g. a systemd unit)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _latest_name(checkpoint_dir: Path) -> str | None:
    try:
        return (checkpoint_dir / CHECKPOINTS_DIR / LATEST_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _when(stamp: str | None) -> str:
    """A stored UTC timestamp in local time, to the minute."""
    if stamp is None:
        return "at an unknown time"
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime(SHOWN_TIME)
    except ValueError:
        return stamp
