"""Held-out loss by timestep third on the tiny PixArt-Sigma, and the chart that draws it.

The held-out cache holds synthetic samples written through the real cache writer
(``build_cache`` of the training tests); the transformer is the tiny model's, trained by
the real :class:`~trainer.loop.Trainer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import build_cache, tiny_config
from tests.tiny_models import T5_WIDTH
from trainer.cache import Cache
from trainer.charts import (
    CHART_FILE,
    LOG_SCALE_RATIO,
    VALIDATION_COLOURS,
    VALIDATION_FILE,
    VALIDATION_LABELS,
    ValidationPoint,
    loss_figure,
    plot_loss,
    read_validation,
    save_validation,
)
from trainer.evaluate import (
    TIMESTEP_BINS,
    BinnedLoss,
    binned_held_out_loss,
    held_out_digest,
    timestep_bins,
)
from trainer.limits import RunLimits
from trainer.loop import Trainer
from trainer.model import load_transformer
from trainer.objective import NUM_TIMESTEPS
from trainer.progress_file import LOG_FILE

HELD_OUT_PER_BUCKET = 1  # two held-out samples, one per bucket of build_cache
PER_BIN = 4
SEED = 11
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons (conftest)


@pytest.fixture
def held_out(tmp_path: Path) -> Iterator[Cache]:
    with Cache.open(build_cache(tmp_path / "held-out", HELD_OUT_PER_BUCKET)) as cache:
        yield cache


def evaluate(transformer: torch.nn.Module, cache: Cache, per_bin: int = 1) -> BinnedLoss:
    return binned_held_out_loss(transformer, cache, seed=SEED, device=CPU, per_bin=per_bin)


# --- the bins ------------------------------------------------------------------------------


def test_bins_are_thirds_of_the_schedule_noisiest_first() -> None:
    assert [(b.name, b.low, b.high) for b in TIMESTEP_BINS] == [
        ("early", 667, NUM_TIMESTEPS), ("middle", 333, 667), ("late", 0, 333),
    ]  # fmt: skip
    for total in (NUM_TIMESTEPS, 10, 7):
        bins = timestep_bins(total)
        owners = [[b.name for b in bins if t in b] for t in range(total)]
        assert all(len(names) == 1 for names in owners), total  # a partition of the range


def test_each_third_is_evaluated_with_timesteps_inside_it(
    tiny_pixart: Path, held_out: Cache
) -> None:
    transformer = load_transformer(str(tiny_pixart), dtype=torch.float32, device=CPU,
                                   checkpointing=False)  # fmt: skip
    seen: list[list[int]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["timestep"].tolist())

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    loss = evaluate(transformer, held_out, per_bin=PER_BIN)
    first = list(seen)
    evaluate(transformer, held_out, per_bin=PER_BIN)
    handle.remove()
    samples = len(held_out.live_samples())
    assert loss.samples == samples
    assert len(first) == samples * len(TIMESTEP_BINS)  # one forward per sample and third
    for index, timesteps in enumerate(first):
        timestep_bin = TIMESTEP_BINS[index % len(TIMESTEP_BINS)]
        assert len(timesteps) == PER_BIN
        assert all(t in timestep_bin for t in timesteps), (timestep_bin, timesteps)
        assert len(set(timesteps)) > 1  # drawn within the third, not one fixed timestep
    assert seen[len(first) :] == first  # the same draws at the next evaluation
    assert transformer.training  # put back in the mode it was in
    assert loss.overall == pytest.approx((loss.early + loss.middle + loss.late) / 3)


def test_same_weights_same_figures_and_training_changes_them(
    tiny_pixart: Path, held_out: Cache, tmp_path: Path
) -> None:
    train_cache = build_cache(tmp_path / "train")
    config = tiny_config(tiny_pixart, train_cache, tmp_path / "out", learning_rate=1e-3)
    trainer = Trainer(config)
    before = evaluate(trainer.transformer, held_out)
    torch.manual_seed(12345)  # the global RNG plays no part in the draws
    torch.randn(100)
    assert evaluate(trainer.transformer, held_out) == before
    trainer.run(RunLimits(until_step=1))
    after = evaluate(trainer.transformer, held_out)
    trainer.close()
    assert after.samples == before.samples
    assert all(getattr(after, n) != getattr(before, n) for n in ("early", "middle", "late"))


def test_an_empty_held_out_set_or_no_draws_is_refused(tiny_pixart: Path, tmp_path: Path) -> None:
    transformer = load_transformer(str(tiny_pixart), dtype=torch.float32, device=CPU,
                                   checkpointing=False)  # fmt: skip
    with Cache.open(tmp_path / "empty", create=True) as empty:
        with pytest.raises(ValueError, match="no samples"):
            evaluate(transformer, empty)
        with pytest.raises(ValueError, match="per_bin must be at least 1"):
            evaluate(transformer, empty, per_bin=0)


# --- naming the held-out set ---------------------------------------------------------------


def test_digest_names_the_held_out_set(held_out: Cache) -> None:
    digest = held_out_digest(held_out)
    with Cache.open(held_out.root) as again:
        assert held_out_digest(again) == digest  # stable across opens
    ref, row = next(iter(held_out.live_samples().items()))
    with held_out.writer() as writer:  # re-captioned: other tensors, a different sample
        writer.add_text("new caption", torch.ones(2, T5_WIDTH, dtype=torch.bfloat16))
        writer.set_sample(ref, source_key=row.source_key, latent_key=row.latent_key,
                          text_key="new caption", bucket=row.bucket)  # fmt: skip
    recaptioned = held_out_digest(held_out)
    assert recaptioned != digest
    held_out.retire([ref])
    assert held_out_digest(held_out) not in (digest, recaptioned)


# --- the chart -----------------------------------------------------------------------------

VALIDATION = [
    ValidationPoint(step=4, early=0.020, middle=0.09, late=0.35),
    ValidationPoint(step=0, early=0.025, middle=0.11, late=0.42),  # the base model
    ValidationPoint(step=8, early=0.019, middle=0.08, late=0.30),
]


def write_log(output_dir: Path, losses: list[float]) -> None:
    """A training log as RunLog writes it (the fields the chart reads)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i + 1, "loss": loss, "lr": 1e-4}) for i, loss in enumerate(losses)]
    (output_dir / LOG_FILE).write_text("\n".join(lines) + "\n")


def colour_pixels(png: Path, hex_colour: str) -> int:
    """How many pixels of the PNG have exactly this colour."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    return int((pixels == rgb).all(axis=-1).sum())


def test_chart_draws_the_held_out_thirds_beside_the_training_loss(tmp_path: Path) -> None:
    write_log(tmp_path, [0.2 - 0.01 * i for i in range(9)])
    plain = plot_loss(tmp_path)
    assert plain is not None
    without = {name: colour_pixels(plain, colour) for name, colour in VALIDATION_COLOURS.items()}
    chart = plot_loss(tmp_path, VALIDATION)
    assert chart == tmp_path / CHART_FILE and chart.read_bytes().startswith(b"\x89PNG")
    for name, colour in VALIDATION_COLOURS.items():
        assert without[name] == 0 and colour_pixels(chart, colour) > 0, name

    axes = loss_figure([1, 2], [0.2, 0.19], VALIDATION).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    for name, label in VALIDATION_LABELS.items():
        line = lines[label]
        assert list(line.get_xdata()) == [0, 4, 8]  # by step, a marker at each checkpoint
        assert list(line.get_ydata()) == [
            getattr(p, name) for p in sorted(VALIDATION, key=lambda p: p.step)
        ]
        assert line.get_marker() == "o"


def test_chart_with_held_out_figures_only_or_nothing(tmp_path: Path) -> None:
    assert plot_loss(tmp_path) is None  # no log, no evaluations: nothing to draw
    assert not (tmp_path / CHART_FILE).exists()
    chart = plot_loss(tmp_path, VALIDATION)
    assert chart is not None and colour_pixels(chart, VALIDATION_COLOURS["late"]) > 0


def test_the_trainers_redraw_keeps_the_saved_held_out_figures(tmp_path: Path) -> None:
    write_log(tmp_path, [0.2 - 0.01 * i for i in range(9)])
    save_validation(tmp_path, VALIDATION)
    assert read_validation(tmp_path) == VALIDATION
    chart = plot_loss(tmp_path)  # as RunLog redraws at a checkpoint: no figures passed
    assert chart is not None and colour_pixels(chart, VALIDATION_COLOURS["early"]) > 0
    (tmp_path / VALIDATION_FILE).write_text("{not json")
    assert read_validation(tmp_path) == []  # a torn file: drawn without, not a crash


def test_axis_turns_logarithmic_only_for_a_wide_range() -> None:
    assert max(p.late for p in VALIDATION) > LOG_SCALE_RATIO * min(p.early for p in VALIDATION)
    assert loss_figure([1], [0.2], VALIDATION).axes[0].get_yscale() == "log"
    close = [ValidationPoint(4, 0.1, 0.12, 0.15)]
    assert loss_figure([1], [0.2], close).axes[0].get_yscale() == "linear"
    assert loss_figure([1, 2], [0.2, 0.1]).axes[0].get_yscale() == "linear"
