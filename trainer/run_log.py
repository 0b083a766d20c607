"""What a training run tells the world while it runs.

Every ``log_every`` steps: one log line (loss, learning rate, gradient norm, images/s,
memory), one JSON line appended to ``<output_dir>/train_log.jsonl``, and
``<output_dir>/progress.json`` replaced atomically.  ``darkroom status`` reads the latter
(step, loss trend, images/s, ETA to the next checkpoint) without touching the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from trainer.charts import plot_loss
from trainer.config import TrainConfig
from trainer.energy import EnergyMeter
from trainer.progress_file import LOG_FILE, PROGRESS_FILE, write_json_atomic

if TYPE_CHECKING:
    from trainer.loop import StepResult

log = logging.getLogger("darkroom.train")

TREND_POINTS = 20  # interval losses kept for the trend in progress.json
MIN_INTERVAL_S = 1e-9  # guards a division when a clock does not move
BOARD_DIR = "tensorboard"
BOARD_SCALARS = ("loss", "lr", "grad_norm", "images_per_s", "memory_gb", "watts", "total_kwh")
KIB = 1024
BYTES_PER_GB = 1024**3


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _open_board(output_dir: Path) -> Any:
    """A TensorBoard writer under ``output_dir/tensorboard``; a clear error without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as exc:
        raise ValueError(
            "tensorboard is on but the package is missing: "
            "pip install 'immich-darkroom[tensorboard]'"
        ) from exc
    return SummaryWriter(log_dir=str(output_dir / BOARD_DIR))


def _energy_text(entry: dict[str, Any]) -> str:
    """``", 215 W, 0.19 Wh/image, 0.06 ct/image"`` when an energy figure is known."""
    if "watts" not in entry:
        return ""
    text = f", {entry['watts']:.0f} W, {entry['wh_per_image']:.2f} Wh/image"
    if "cost_per_image" in entry:
        text += f", {entry['cost_per_image']:.5f}/image"
    return text


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: the device's allocator on a GPU, the process's RSS on a CPU."""
    backend = getattr(torch, device.type, None)
    peak = getattr(backend, "max_memory_allocated", None)
    if device.type != "cpu" and callable(peak):
        return float(peak(device)) / BYTES_PER_GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / BYTES_PER_GB


class RunLog:
    """Collects step results and reports each logging interval (see the module docstring)."""

    def __init__(
        self, config: TrainConfig, first_step: int, target: int | None, *, enabled: bool = True
    ) -> None:
        self.config, self.first_step, self.target = config, first_step, target
        self.enabled = enabled  # only one process of a distributed run writes
        self.dir = config.output_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trend: deque[float] = deque(maxlen=TREND_POINTS)
        self._losses: list[float] = []
        self._images = 0
        self._started = self._interval_start = time.monotonic()
        self._run_started = _now()
        self._steps = 0
        self._last: dict[str, Any] = {}
        self.last_checkpoint: int | None = None
        self.energy = EnergyMeter(config.device_watts, config.energy_price_per_kwh)
        self._board = _open_board(self.dir) if config.tensorboard and enabled else None

    def record(self, step: int, result: StepResult, lr: float, device: torch.device) -> None:
        """Count one step; report when an interval is complete."""
        if not result.skipped:
            self._losses.append(result.loss)
        self._images += result.images
        self._steps += 1
        if self.enabled and step % self.config.log_every == 0:
            self._report(step, result, lr, device)

    def _report(self, step: int, result: StepResult, lr: float, device: torch.device) -> None:
        seconds = max(time.monotonic() - self._interval_start, MIN_INTERVAL_S)
        loss = sum(self._losses) / len(self._losses) if self._losses else math.nan
        self.trend.append(loss)
        entry = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
            "images_per_s": self._images / seconds, "seconds_per_step": seconds / self._steps,
            "memory_gb": memory_gb(device), "device": device.type, "time": _now(),
            **self.energy.interval(device, seconds, self._steps, self._images),
        }  # fmt: skip
        log.info(
            "step %d: loss %.4f, lr %.2e, grad norm %.3f, %.2f images/s, %.1f GB%s",
            step, loss, lr, result.grad_norm, entry["images_per_s"], entry["memory_gb"],
            _energy_text(entry),
        )  # fmt: skip
        with (self.dir / LOG_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self._board is not None:
            for name in BOARD_SCALARS:
                if isinstance(entry.get(name), float | int):
                    self._board.add_scalar(f"train/{name}", entry[name], step)
        self._last = entry
        self._losses, self._images, self._steps = [], 0, 0
        self._interval_start = time.monotonic()
        self._write_progress(step, "running")

    def checkpointed(self, step: int, path: Path) -> None:
        """A checkpoint was written at ``step``: redraw the loss curve beside it."""
        self.last_checkpoint = step
        self._write_progress(step, "running", checkpoint=str(path))
        if self.enabled:
            plot_loss(self.dir)

    def finish(self, step: int, reason: str) -> None:
        """The run ended at ``step`` (at a limit, or asked to stop)."""
        self._write_progress(step, "finished", reason=reason)

    def _write_progress(self, step: int, state: str, **extra: Any) -> None:
        if not self.enabled:
            return
        every = self.config.checkpoint_every
        next_checkpoint = (step // every + 1) * every
        seconds_per_step = self._last.get("seconds_per_step")
        eta = None if seconds_per_step is None else (next_checkpoint - step) * seconds_per_step
        payload = {
            "state": state, "step": step, "first_step": self.first_step,
            "target_step": self.target, "started_at": self._run_started, "updated_at": _now(),
            "pid": os.getpid(), "loss_trend": list(self.trend),
            "images_per_s": self._last.get("images_per_s"), "next_checkpoint": next_checkpoint,
            "eta_next_checkpoint_s": eta, "last_checkpoint": self.last_checkpoint,
            "total_kwh": self._last.get("total_kwh"), "total_cost": self._last.get("total_cost"),
            **extra,
        }  # fmt: skip
        write_json_atomic(self.dir / PROGRESS_FILE, payload)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._write_progress(self.last_checkpoint or self.first_step, "failed", error=str(exc))
        if self._board is not None:
            self._board.close()
