"""Model cards: figures from a real cache and a real training run's log, never invented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import REPO, build_cache, tiny_config
from tests.tiny_models import T5_WIDTH
from trainer.buckets import BUCKETS
from trainer.cache import Cache
from trainer.charts import ValidationPoint
from trainer.checkpoints import latest_checkpoint, verify_checkpoint
from trainer.clip_score import NOT_CONFIGURED
from trainer.limits import RunLimits
from trainer.loop import Trainer
from trainer.model_card import (
    MODEL_CARD_NAME,
    NOT_MEASURED,
    NOT_RECORDED,
    SECONDS_PER_HOUR,
    Compute,
    DatasetStats,
    ModelCard,
    compute_from_log,
    dataset_stats,
    default_limitations,
    render_card,
    write_model_card,
)
from trainer.progress_file import LOG_FILE

STEPS = 4  # the checkpoint of the real run (tiny_config checkpoints every 4 steps)
IMAGES_PER_STEP = 4  # cpu-test batch 2 x grad_accumulation 2
WATTS = 100.0
PRICE_PER_KWH = 0.3
RATINGS = {"4": 9, "5": 3}
SCORES = {"sharpness": 0.8, "exposure": 0.654}
VALIDATION = [
    ValidationPoint(step=0, early=0.0251, middle=0.1102, late=0.4203),
    ValidationPoint(step=STEPS, early=0.0204, middle=0.0905, late=0.3506),
    ValidationPoint(step=2 * STEPS, early=0.0193, middle=0.0807, late=0.3008),  # a later one
]


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons (conftest)


def card_for(dataset: DatasetStats, compute: Compute, **changes: object) -> ModelCard:
    fields: dict[str, object] = {
        "base_model": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "step": STEPS,
        "created_at": "2025-01-02T03:04:05+00:00", "preset": "cpu-test", "learning_rate": 1e-3,
        "dataset": dataset, "compute": compute, "validation": VALIDATION, "clip": None,
        "clip_note": NOT_CONFIGURED, "limitations": default_limitations(dataset),
        "held_out_photos": 2,
    }  # fmt: skip
    fields.update(changes)
    return ModelCard(**fields)  # type: ignore[arg-type]


def log_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / LOG_FILE).read_text().splitlines()]


def test_card_of_a_real_run(tiny_pixart: Path, tmp_path: Path) -> None:
    cache_dir = build_cache(tmp_path / "cache")  # 2 buckets x 6 photos, captions 3..8 tokens
    out = tmp_path / "out"
    config = tiny_config(tiny_pixart, cache_dir, out, learning_rate=1e-3, device_watts=WATTS,
                         energy_price_per_kwh=PRICE_PER_KWH)  # fmt: skip
    trainer = Trainer(config)
    trainer.run(RunLimits(until_step=STEPS))
    trainer.close()
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None

    manifest = verify_checkpoint(checkpoint, hashes=False)
    with Cache.open(cache_dir) as cache:  # the photos as they were at the checkpoint
        stats = dataset_stats(cache, RATINGS, SCORES, generation=manifest["cache_generation"])
    assert stats == DatasetStats(12, {"1024x1024": 6, "1216x832": 6}, 3, 5.5, 8, RATINGS, SCORES)
    compute = compute_from_log(out, STEPS, device="cpu")
    last = log_records(out)[-1]
    assert (compute.steps, compute.measured_steps) == (STEPS, STEPS)
    assert compute.images_seen == STEPS * IMAGES_PER_STEP
    assert compute.energy_kwh == pytest.approx(last["total_kwh"])
    assert compute.cost == pytest.approx(last["total_cost"])
    seconds = sum(record["seconds_per_step"] for record in log_records(out))  # log_every 1
    assert compute.device_hours == pytest.approx(seconds / SECONDS_PER_HOUR)

    path = write_model_card(checkpoint, card_for(stats, compute))
    assert path == checkpoint / MODEL_CARD_NAME
    verify_checkpoint(checkpoint, hashes=True)  # an unlisted file does not break it
    text = path.read_text()
    for expected in [
        "base_model: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "Memory preset: `cpu-test`",
        "Photos: 12", "min 3, median 5.5, max 8", "| 1024x1024 | 6 |", "| 1216x832 | 6 |",
        "Ratings: 5★: 3, 4★: 9", "exposure 0.65, sharpness 0.80",
        f"Images seen: {STEPS * IMAGES_PER_STEP}", "Device: cpu",
        f"Energy: {compute.energy_kwh:.3f} kWh", f"Electricity cost: {compute.cost:.2f}",
        "on 2 photos", "| 0 (base model) | 0.0251 | 0.1102 | 0.4203 |",
        f"| **{STEPS}** | 0.0204 | 0.0905 | 0.3506 |",  # this checkpoint, in bold
        f"{NOT_MEASURED}: {NOT_CONFIGURED}", "Only 12 photos",
    ]:  # fmt: skip
        assert expected in text, expected
    assert "0.3008" not in text  # a checkpoint after this one is not on its card
    assert "1344x768" in text  # limitations: buckets with no photos


def write_log(output_dir: Path, records: list[dict], *, tail: str = "") -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in records)
    (output_dir / LOG_FILE).write_text(text + tail)


def interval(step: int, seconds: float, images_per_step: int, wh: float | None) -> dict:
    """A log record as RunLog writes it: rates over the interval ending at ``step``."""
    record = {"step": step, "loss": 0.1, "seconds_per_step": seconds,
              "images_per_s": images_per_step / seconds}  # fmt: skip
    if wh is not None:
        record |= {"wh_per_step": wh, "cost_per_step": wh / 10}
    return record


def test_compute_counts_the_history_that_led_to_the_checkpoint(tmp_path: Path) -> None:
    crashed = [interval(2, 1.0, 2, 0.5), interval(4, 1.0, 2, 0.5), interval(6, 1.0, 2, 0.5)]
    resumed = [interval(6, 2.0, 4, 1.0), interval(8, 2.0, 4, 1.0)]  # from checkpoint 4
    write_log(tmp_path, crashed + resumed, tail='{"step": 10, "lo')  # cut short by a crash

    compute = compute_from_log(tmp_path, 8)
    assert compute.images_seen == 2 * 2 + 2 * 2 + 2 * 4 + 2 * 4  # step 6 counted once, run B's
    assert compute.device_hours == pytest.approx((1 + 1 + 2 + 2) * 2 / SECONDS_PER_HOUR)
    assert compute.energy_kwh == pytest.approx((0.5 + 0.5 + 1 + 1) * 2 / 1000)
    assert compute.cost == pytest.approx((0.5 + 0.5 + 1 + 1) * 2 / 10)

    straddling = compute_from_log(tmp_path, 5)  # the record at 6 covers steps 5 and 6
    assert (straddling.measured_steps, straddling.images_seen) == (5, 2 * 2 + 2 * 2 + 4)

    beyond = compute_from_log(tmp_path, 12)  # the log stops at 8
    assert (beyond.steps, beyond.measured_steps) == (12, 8)
    assert "the 8 steps the log records" in render_card(card_for(stats_of(0), beyond))


def stats_of(photos: int) -> DatasetStats:
    return DatasetStats(photos, {}, None, None, None)


def test_missing_figures_are_none_and_the_card_says_so(tmp_path: Path) -> None:
    nothing = compute_from_log(tmp_path, STEPS)  # no log at all
    assert nothing == Compute(STEPS, 0, None, None, None, None, None)
    text = render_card(card_for(stats_of(0), nothing, validation=[], clip_note=None))
    for expected in [
        f"Images seen: {NOT_RECORDED}", f"Device: {NOT_RECORDED}",
        f"Device hours: {NOT_MEASURED}", f"Energy: {NOT_MEASURED}",
        f"Electricity cost: {NOT_MEASURED}", f"Ratings: {NOT_RECORDED}",
        f"Mean quality scores: {NOT_RECORDED}",
    ]:  # fmt: skip
        assert expected in text, expected
    held_out = text.split("## Held-out loss", 1)[1].split("##", 1)[0]
    assert held_out.rstrip().endswith(NOT_MEASURED)  # no evaluation yet: no table

    unmetered = [interval(2, 1.0, 2, None), interval(4, 1.0, 2, 0.5)]  # one without energy
    write_log(tmp_path, unmetered)
    partial = compute_from_log(tmp_path, STEPS)
    assert partial.images_seen == 8 and partial.device_hours is not None
    assert partial.energy_kwh is None and partial.cost is None  # not a partial sum


def test_dataset_counts_live_samples_and_warns_about_its_gaps(tmp_path: Path) -> None:
    with Cache.open(build_cache(tmp_path / "cache")) as cache:
        cache.retire(["1024x1024-0", "1216x832-5"])  # tokens 3 and 8
        stats = dataset_stats(cache, {}, {})
    assert (stats.photos, stats.buckets) == (10, {"1024x1024": 5, "1216x832": 5})
    assert (stats.caption_tokens_min, stats.caption_tokens_median) == (3, 5.5)
    assert stats.caption_tokens_max == 8  # the other bucket's 8-token caption is still live
    notes = " ".join(default_limitations(stats))
    assert "Only 10 photos" in notes
    missing = [b.name for b in BUCKETS if b.name not in stats.buckets]
    assert all(name in notes for name in missing) and "1024x1024" not in notes


def add_sample(cache: Cache, ref: str, bucket: str, shape: tuple[int, ...], tokens: int) -> None:
    with cache.writer() as writer:
        writer.add_latent(ref, torch.zeros(shape, dtype=torch.float16), bucket=bucket,
                          source_key=ref)  # fmt: skip
        writer.add_text(ref, torch.zeros(tokens, T5_WIDTH, dtype=torch.bfloat16))
        writer.set_sample(ref, source_key=ref, latent_key=ref, text_key=ref, bucket=bucket)


def test_dataset_as_it_was_at_a_checkpoints_generation(tmp_path: Path) -> None:
    with Cache.open(build_cache(tmp_path / "cache")) as cache:
        trained_on = cache.generation
        before = dataset_stats(cache, {}, {})
        cache.retire(["1024x1024-0"])
        add_sample(cache, "new", "1344x768", (4, 12, 21), 40)
        now = dataset_stats(cache, {}, {})
        assert (now.photos, now.buckets["1344x768"], now.caption_tokens_max) == (12, 1, 40)
        assert dataset_stats(cache, {}, {}, generation=trained_on) == before
        cache.gc()  # the retired sample's tensors are gone: its caption length is unknown
        after_gc = dataset_stats(cache, {}, {}, generation=trained_on)
    assert (after_gc.photos, after_gc.buckets) == (before.photos, before.buckets)
    assert after_gc.caption_tokens_median is None
    assert "Caption length in T5 tokens (end token included): not recorded" in render_card(
        card_for(after_gc, compute_from_log(tmp_path, STEPS))
    )


def test_cards_and_clip_reasons_need_no_torch() -> None:
    """The daemon (no training extra) can read these modules: nothing heavy at import."""
    code = (
        "import sys, trainer.model_card, trainer.clip_score; "
        "print(sorted({'torch', 'transformers', 'matplotlib'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"
