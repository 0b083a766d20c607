"""The training loop on the tiny PixArt-Sigma: learning, exact resume after kill -9, OOM policy.

The cache holds small synthetic latents (16 x 16, two buckets) and caption embeddings of the
tiny T5's width, written through the real cache writer; the transformer is the tiny model's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_models import T5_WIDTH
from trainer.cache import EMPTY_TEXT_META, Cache
from trainer.checkpoints import latest_checkpoint
from trainer.config import TrainConfig, config_for
from trainer.dataset import Batch
from trainer.limits import RunLimits
from trainer.loop import MAX_OOM_STEPS, Trainer, TrainingStopped
from trainer.progress_file import read_progress

LATENT_SHAPES = {"1024x1024": (4, 16, 16), "1216x832": (4, 12, 18)}
SAMPLES_PER_BUCKET = 6
STEPS = 4  # N of the exact-resume test
REPO = Path(__file__).resolve().parents[1]


def build_cache(root: Path, samples_per_bucket: int = SAMPLES_PER_BUCKET) -> Path:
    """A cache of synthetic samples: each bucket's latents share a pattern to learn."""
    generator = torch.Generator().manual_seed(0)
    with Cache.open(root, create=True) as cache, cache.writer() as writer:
        writer.add_text("empty", torch.zeros(1, T5_WIDTH, dtype=torch.bfloat16))
        for bucket, shape in LATENT_SHAPES.items():
            pattern = torch.randn(shape, generator=generator)
            for index in range(samples_per_bucket):
                ref = f"{bucket}-{index}"
                latent = pattern + 0.1 * torch.randn(shape, generator=generator)
                tokens = 3 + index
                text = torch.randn(tokens, T5_WIDTH, generator=generator)
                writer.add_latent(ref, latent.half(), bucket=bucket, source_key=ref)
                writer.add_text(ref, text.bfloat16())
                writer.set_sample(ref, source_key=ref, latent_key=ref, text_key=ref, bucket=bucket)
        cache.set_meta(EMPTY_TEXT_META, "empty")
    return root


def tiny_config(
    tiny_pixart: Path, cache_dir: Path, output_dir: Path, **changes: object
) -> TrainConfig:
    settings: dict[str, object] = {
        "model": str(tiny_pixart), "cache_dir": cache_dir, "output_dir": output_dir,
        "device": "cpu", "seed": 7, "checkpoint_every": STEPS, "log_every": 1,
        "grad_accumulation": 2,
    }  # fmt: skip
    settings.update(changes)
    return config_for(str(settings.pop("preset", "cpu-test")), **settings)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return build_cache(tmp_path / "cache")


pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons (conftest)


def train(config: TrainConfig, limits: RunLimits) -> Trainer:
    trainer = Trainer(config)
    trainer.resume()
    trainer.run(limits)
    return trainer


def test_loss_falls_on_the_training_set(tiny_pixart: Path, cache_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_pixart, cache_dir, tmp_path / "out", learning_rate=1e-3)
    trainer = train(config, RunLimits(until_step=30))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "train_log.jsonl").open()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    progress = read_progress(tmp_path / "out")
    assert progress is not None and progress["state"] == "finished" and progress["step"] == 30
    assert trainer.step == 30
    chart = tmp_path / "out" / "loss.png"  # redrawn at each checkpoint
    assert chart.read_bytes().startswith(b"\x89PNG")
    trainer.close()


KILLED_RUN = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from trainer.config import TrainConfig
    from trainer.limits import RunLimits
    from trainer.loop import Trainer

    torch.set_num_threads(1)  # as the test process: one reduction order
    config = TrainConfig.from_json(json.loads(sys.argv[1]))
    slow_after = int(sys.argv[2])

    def crawl(batch):
        if trainer.step >= slow_after:  # past the checkpoint: wait to be killed
            time.sleep(60)

    trainer = Trainer(config, before_forward=crawl)
    trainer.resume()
    trainer.run(RunLimits(until_step=2 * slow_after))
    """
)


def state_of(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    return trainer.transformer.state_dict(), trainer.optimizer.state_dict()


def assert_bitwise_equal(left: object, right: object) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right)
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys()
        for key in left:
            assert_bitwise_equal(left[key], right[key])
    elif isinstance(left, list | tuple):
        assert len(left) == len(right)  # type: ignore[arg-type]
        for a, b in zip(left, right, strict=True):  # type: ignore[call-overload]
            assert_bitwise_equal(a, b)
    else:
        assert left == right


@pytest.mark.parametrize("preset", ["cpu-test", "12gb"])
def test_kill_9_and_resume_equals_never_stopping(
    tiny_pixart: Path, cache_dir: Path, tmp_path: Path, preset: str
) -> None:
    # 12gb on a CPU: bf16 weights with stochastic rounding, CAME, checkpointing.
    whole = tiny_config(tiny_pixart, cache_dir, tmp_path / "whole", preset=preset)
    reference = train(whole, RunLimits(until_step=2 * STEPS))

    split = tiny_config(tiny_pixart, cache_dir, tmp_path / "split", preset=preset)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, json.dumps(split.to_json()), str(STEPS)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(split.output_dir, hashes=False) is None:
            assert child.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # into step STEPS + 1, sleeping in its first forward
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    resumed = Trainer(split)
    assert resumed.resume() is not None and resumed.step == STEPS
    resumed.run(RunLimits(until_step=2 * STEPS))
    assert_bitwise_equal(state_of(resumed), state_of(reference))
    reference.close()
    resumed.close()


def test_samples_added_between_runs_join_without_changing_the_scheduled_ones(
    tiny_pixart: Path, tmp_path: Path
) -> None:
    cache_dir = build_cache(tmp_path / "cache")
    whole = tiny_config(tiny_pixart, cache_dir, tmp_path / "whole", batch_size=2)
    first = Trainer(whole)
    first.run(RunLimits(until_step=STEPS))
    plan = first.sampler.plan()
    first.close()
    with Cache.open(cache_dir) as cache, cache.writer() as writer:
        latent = torch.ones(LATENT_SHAPES["1024x1024"], dtype=torch.float16)
        writer.add_latent("new", latent, bucket="1024x1024", source_key="new")
        writer.add_text("new", torch.ones(2, T5_WIDTH, dtype=torch.bfloat16))
        writer.set_sample(
            "new", source_key="new", latent_key="new", text_key="new", bucket="1024x1024"
        )
    resumed = Trainer(whole)
    resumed.resume()
    assert resumed.sampler.plan() == plan  # the epoch in progress is unchanged
    resumed.close()


def test_out_of_memory_retries_in_halves_then_stops(
    tiny_pixart: Path, cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(tiny_pixart, cache_dir, tmp_path / "out", batch_size=4)

    def big_batches_do_not_fit(batch: Batch) -> None:
        if len(batch.sample_ids) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer = Trainer(config, before_forward=big_batches_do_not_fit)
    result = trainer.train_step()
    assert not result.skipped and result.images == 4 * config.grad_accumulation
    assert "retrying in halves" in caplog.text

    def nothing_fits(batch: Batch) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer.before_forward = nothing_fits
    for _ in range(MAX_OOM_STEPS - 1):
        assert trainer.train_step().skipped
    with pytest.raises(TrainingStopped, match="out of device memory"):
        trainer.train_step()
    trainer.close()


def test_tensorboard_writes_event_files_or_says_what_is_missing(
    tiny_pixart: Path, cache_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_pixart, cache_dir, tmp_path / "out", tensorboard=True)
    trainer = Trainer(config)
    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ValueError, match=r"immich-darkroom\[tensorboard\]"):
            trainer.run(RunLimits(max_steps=1))
    else:
        trainer.run(RunLimits(max_steps=1))
        assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    finally:
        trainer.close()
