"""The loss curve as a PNG beside the checkpoints, redrawn at each checkpoint.

Read from ``train_log.jsonl`` (one record per logging interval), so it covers every run
that wrote to the output folder, across restarts.  Drawn on a bare matplotlib ``Figure``
(no pyplot, no global backend state, no display needed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.figure import Figure

from trainer.progress_file import LOG_FILE

CHART_FILE = "loss.png"
SMOOTHING_WINDOW = 20  # logging intervals in the moving average
FIGURE_INCHES = (8.0, 4.5)
DPI = 100


def read_losses(output_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of every logging interval recorded, skipping unreadable lines."""
    steps, losses = [], []
    path = output_dir / LOG_FILE
    if not path.exists():
        return steps, losses
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        loss = record.get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            steps.append(int(record["step"]))
            losses.append(float(loss))
    return steps, losses


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to ``window - 1`` before it."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def plot_loss(output_dir: Path) -> Path | None:
    """Draw ``loss.png`` in ``output_dir``; None when there is nothing to draw yet."""
    steps, losses = read_losses(output_dir)
    if not steps:
        return None
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    axes = figure.subplots()
    axes.plot(steps, losses, linewidth=0.8, alpha=0.4, label="loss per interval")
    axes.plot(
        steps, moving_average(losses, SMOOTHING_WINDOW), linewidth=1.6, label="moving average"
    )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("MSE on the noise")
    axes.set_title("darkroom: training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    target = output_dir / CHART_FILE
    tmp = target.with_name(f".{CHART_FILE}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, target)  # readers see the old chart or the new one, whole
    return target
