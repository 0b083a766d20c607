"""The loss curve as a PNG beside the checkpoints, redrawn at each checkpoint.

Read from ``train_log.jsonl`` (one record per logging interval), so it covers every run
that wrote to the output folder, across restarts.  Drawn on a bare matplotlib ``Figure``
(no pyplot, no global backend state, no display needed).

When the held-out evaluations of the checkpoints are given (``darkroom samples`` measures
them, see :mod:`trainer.evaluate`), their three timestep thirds are drawn too, as lines with
a marker at each evaluated checkpoint.  They share the training loss's axis rather than a
second one: all four are the same quantity (MSE on the noise), and a second scale would
invite comparing heights that mean different things.  The thirds can differ from each other
by an order of magnitude (the noisiest third is the easiest to predict), so the axis turns
logarithmic when the figures drawn span more than :data:`LOG_SCALE_RATIO`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from trainer.progress_file import LOG_FILE, replace_atomically, write_json_atomic

log = logging.getLogger("darkroom.charts")

CHART_FILE = "loss.png"
# The held-out figures last drawn, so the trainer's redraw at each checkpoint keeps them.
VALIDATION_FILE = "validation.json"
SMOOTHING_WINDOW = 20  # logging intervals in the moving average
FIGURE_INCHES = (8.0, 4.5)
DPI = 100
LOG_SCALE_RATIO = 10.0  # largest / smallest figure drawn beyond which the y axis is logarithmic
# One fixed colour per timestep third (matplotlib's tab10 red, purple, brown), so charts of
# different runs read alike and none collides with the training lines (tab10 blue, orange).
VALIDATION_COLOURS = {"early": "#d62728", "middle": "#9467bd", "late": "#8c564b"}
VALIDATION_LABELS = {
    "early": "held-out, early third (composition)",
    "middle": "held-out, middle third",
    "late": "held-out, late third (fine detail)",
}
VALIDATION_MARKER = "o"
VALIDATION_LINE_WIDTH = 1.6
TRAIN_LINE_WIDTH = 0.8
TRAIN_LINE_ALPHA = 0.4
AVERAGE_LINE_WIDTH = 1.6
GRID_ALPHA = 0.3


@dataclass(frozen=True)
class ValidationPoint:
    """A checkpoint's held-out loss per timestep third (:class:`trainer.evaluate.BinnedLoss`)."""

    step: int
    early: float
    middle: float
    late: float


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


def _draw_training(axes: Axes, steps: list[int], losses: list[float]) -> None:
    """The loss of each logging interval, faint, and its moving average."""
    axes.plot(
        steps, losses, linewidth=TRAIN_LINE_WIDTH, alpha=TRAIN_LINE_ALPHA,
        label="training loss per interval",
    )  # fmt: skip
    axes.plot(
        steps, moving_average(losses, SMOOTHING_WINDOW), linewidth=AVERAGE_LINE_WIDTH,
        label="training loss, moving average",
    )  # fmt: skip


def _draw_validation(axes: Axes, validation: Sequence[ValidationPoint]) -> None:
    """One line per timestep third, a marker at each evaluated checkpoint."""
    points = sorted(validation, key=lambda point: point.step)
    steps = [point.step for point in points]
    for name, colour in VALIDATION_COLOURS.items():
        axes.plot(
            steps, [getattr(point, name) for point in points], color=colour,
            marker=VALIDATION_MARKER, linewidth=VALIDATION_LINE_WIDTH,
            label=VALIDATION_LABELS[name],
        )  # fmt: skip


def _wide_range(values: list[float]) -> bool:
    """Whether positive figures span more than LOG_SCALE_RATIO (a log axis then reads better)."""
    positive = [value for value in values if value > 0 and math.isfinite(value)]
    if not positive or len(positive) < len(values):
        return False  # nothing drawn, or a figure a log axis cannot show
    return max(positive) > LOG_SCALE_RATIO * min(positive)


def loss_figure(
    steps: list[int], losses: list[float], validation: Sequence[ValidationPoint] = ()
) -> Figure:
    """The chart as a matplotlib Figure: training loss and, when given, the held-out thirds."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    axes = figure.subplots()
    if steps:
        _draw_training(axes, steps, losses)
    if validation:
        _draw_validation(axes, validation)
    drawn = [*losses, *(getattr(p, name) for p in validation for name in VALIDATION_COLOURS)]
    if _wide_range(drawn):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("MSE on the noise")
    title = "training and held-out loss" if validation else "training loss"
    axes.set_title(f"darkroom: {title}")
    axes.grid(alpha=GRID_ALPHA)
    axes.legend()
    figure.tight_layout()
    return figure


def save_validation(output_dir: Path, validation: Sequence[ValidationPoint]) -> None:
    """Keep the held-out figures beside the chart, for every later redraw."""
    write_json_atomic(output_dir / VALIDATION_FILE, [dataclasses.asdict(p) for p in validation])


def read_validation(output_dir: Path) -> list[ValidationPoint]:
    """The held-out figures last saved; none when there are none or the file is unreadable."""
    try:
        records = json.loads((output_dir / VALIDATION_FILE).read_text(encoding="utf-8"))
        return [ValidationPoint(**record) for record in records]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as error:
        log.warning("%s: %s unreadable (%s); drawn without it", output_dir, VALIDATION_FILE, error)
        return []


def plot_loss(output_dir: Path, validation: Sequence[ValidationPoint] | None = None) -> Path | None:
    """Draw ``loss.png`` in ``output_dir`` from its training log and the held-out
    ``validation`` figures (None: those last saved by :func:`save_validation`); None when
    there is nothing to draw yet."""
    if validation is None:
        validation = read_validation(output_dir)
    steps, losses = read_losses(output_dir)
    if not steps and not validation:
        return None
    figure = loss_figure(steps, losses, validation)
    # Readers see the old chart or the new one, whole.
    return replace_atomically(
        output_dir / CHART_FILE, lambda tmp: figure.savefig(tmp, format="png")
    )
