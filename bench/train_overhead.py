"""darkroom's training step time against a bare minimal loop on the same tiny model.

Both sides train the tiny PixArt-Sigma (``tests.tiny_models.build_tiny_pixart``: 2 layers,
16 wide, 57 parameter tensors) in fp32 on the CPU, batch 2, with the same optimizer, in one
process:

* **darkroom**: ``Trainer(config)`` with the ``cpu-test`` preset (fp32, darkroom's AdamW,
  grad clip 1.0), grad_accumulation 1, logging and checkpoints out of reach; what is timed
  is ``Trainer.train_step()``: next batch from the sampler, read from the cache shards and
  collated, seeded step generators for timesteps/noise/caption dropout, noising, predict,
  loss, backward, clip, optimizer and LR-schedule step, zero_grad.
* **bare**: the loop a person would write: a second copy of the transformer from the same
  ``from_pretrained`` folder (checked bitwise equal to darkroom's), the optimizer
  ``trainer.optim.build_optimizer`` builds from the same config, ONE batch held in memory
  (fp32), and per step ``randn`` noise, ``randint`` timesteps, noising with a precomputed
  fp32 ``alphas_cumprod``, forward, ``mse_loss`` on the first 4 output channels, backward,
  ``clip_grad_norm_`` over a parameter list made once, step, zero_grad.

The bare batch is the sampler's first batch, read through ``CacheDataset`` and ``collate``
once, before timing: a fixed in-memory batch is what a minimal loop does, so reading the
cache every step is counted as darkroom's overhead rather than paid on both sides.  Every
sample has the same bucket and caption length, so each darkroom batch has the bare batch's
shapes and the two sides do the same arithmetic.

The cache is synthetic (written with the real ``CacheWriter``): 16 samples of 4 x 32 x 32
float16 latents (256 image tokens after patch 2) with 32-token bfloat16 captions; a step
takes ~15 ms on one core, so darkroom's fixed per-step costs show at full size here (a
1024 px step of the real model takes seconds and hides them).

**Timing.** After a warm-up of both sides, ROUNDS rounds of PAIRS pairs: one darkroom step
and one bare step back to back (which goes first flips every pair), each timed with
``perf_counter``.  The figure is the MEDIAN over all pairs of darkroom / bare: the two
steps of a pair are ~30 ms apart, so load from other processes on a shared machine hits
both alike and the ratio cancels it.  Measured on a loaded 2-core machine, that median
stayed within 1.09-1.11 run to run where best-of and median blocks of 20 steps per side
wandered between 1.04 and 1.31.  ``torch.set_num_threads`` is the same for both
(``--threads``, default 1: with other processes on the cores a second thread mostly waits,
and threads spinning at OpenMP barriers lose their time slice, hence
``OMP_WAIT_POLICY=PASSIVE`` as in bench/memory.py).  The last line rounds the ratio UP to
two decimals and exits 1 when that is above the 1.10 target; then (or with ``--profile
N``) darkroom steps run under cProfile, listing darkroom-side functions by cumulative time.

    python bench/train_overhead.py [--threads 1] [--rounds 5] [--pairs 60] [--profile 0]
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that sleep rather than spin at barriers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import cProfile
import io
import logging
import math
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_models import T5_WIDTH, build_tiny_pixart  # noqa: E402
from trainer.cache import EMPTY_TEXT_META, Cache  # noqa: E402
from trainer.config import TrainConfig, config_for  # noqa: E402
from trainer.dataset import BucketBatchSampler, CacheDataset, collate  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.model import NO_MICRO_CONDITIONS, TRANSFORMER_SUBFOLDER  # noqa: E402
from trainer.objective import NOISE_CHANNELS, NUM_TIMESTEPS, NoiseSchedule  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

TARGET_RATIO = 1.10
LATENT_SHAPE = (4, 32, 32)
CAPTION_TOKENS = 32
SAMPLES = 16
BUCKET = "1024x1024"
SEED = 11
WARMUP_STEPS = 5
ROUNDS = 5
PAIRS = 60
PROFILE_STEPS = 50  # when above target and --profile is not given
PROFILE_LINES = 30
# Where darkroom's step differs from the bare one: its own modules, the shard reader, the
# LR schedule, and the module walks of Module.parameters() and diffusers' ModelMixin.dtype.
PROFILE_FILTER = (
    r"loop\.py|dataset\.py|objective\.py|config\.py|model\.py|shards\.py|get_tensor"
    r"|lr_scheduler\.py:\d+\((step|_update_lr)\)"
    r"|get_parameter_dtype|named_modules|_named_members|\(parameters\)"
)
MS = 1000.0
PERCENT = 100
BIG = 10**9  # log_every / checkpoint_every out of reach

Step = Callable[[], object]


def build_cache(root: Path) -> Path:
    """SAMPLES synthetic samples of one bucket and one caption length, via the real writer."""
    generator = torch.Generator().manual_seed(SEED)
    with Cache.open(root, create=True) as cache, cache.writer() as writer:
        writer.add_text("empty", torch.zeros(1, T5_WIDTH, dtype=torch.bfloat16))
        for index in range(SAMPLES):
            ref = f"photo-{index}"
            latent = torch.randn(LATENT_SHAPE, generator=generator)
            text = torch.randn(CAPTION_TOKENS, T5_WIDTH, generator=generator)
            writer.add_latent(ref, latent.half(), bucket=BUCKET, source_key=ref)
            writer.add_text(ref, text.bfloat16())
            writer.set_sample(ref, source_key=ref, latent_key=ref, text_key=ref, bucket=BUCKET)
        cache.set_meta(EMPTY_TEXT_META, "empty")
    return root


def bare_loop(config: TrainConfig) -> tuple[Step, torch.nn.Module]:
    """The minimal loop's step over one in-memory batch, and its transformer."""
    transformer = PixArtTransformer2DModel.from_pretrained(
        config.model, subfolder=TRANSFORMER_SUBFOLDER, dtype=torch.float32
    ).train()
    optimizer = build_optimizer(transformer.parameters(), config)
    parameters = list(transformer.parameters())
    with Cache.open(config.cache_dir) as cache:
        sampler = BucketBatchSampler(cache, batch_size=config.batch_size, seed=config.seed)
        ids = next(iter(sampler))
        dataset = CacheDataset(cache)
        batch = collate([dataset[sample_id] for sample_id in ids])
    latents, text, mask = batch.latents.float(), batch.text.float(), batch.mask
    alphas_cumprod = NoiseSchedule.linear().alphas_cumprod.float()
    size = latents.shape[0]
    clip = config.grad_clip if config.grad_clip is not None else math.inf

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, NUM_TIMESTEPS, (size,))
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1.0 - abar).sqrt() * noise
        prediction = transformer(
            noisy,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            timestep=timesteps,
            added_cond_kwargs=NO_MICRO_CONDITIONS,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction[:, :NOISE_CHANNELS], noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, transformer


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two models hold bitwise-equal parameters and buffers."""
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    return all(torch.equal(a, b) for a, b in pairs)


def paired_times(darkroom: Step, bare: Step, pairs: int) -> list[tuple[float, float]]:
    """(darkroom ms, bare ms) of ``pairs`` back-to-back pairs; who goes first flips."""
    times = []
    for index in range(pairs):
        order = (darkroom, bare) if index % 2 == 0 else (bare, darkroom)
        measured = []
        for step in order:
            started = time.perf_counter()
            step()
            measured.append((time.perf_counter() - started) * MS)
        first, second = measured
        times.append((first, second) if index % 2 == 0 else (second, first))
    return times


def median_ratio(times: list[tuple[float, float]]) -> float:
    """Median over pairs of darkroom / bare."""
    return statistics.median(darkroom / bare for darkroom, bare in times)


def profile(step: Step, steps: int) -> str:
    """cProfile of ``steps`` darkroom steps: darkroom-side functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative")
    stats.print_stats(PROFILE_FILTER, PROFILE_LINES)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of pairs")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="step pairs per round")
    parser.add_argument(
        "--profile", type=int, default=0, help="cProfile this many darkroom steps at the end"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # from_pretrained chatter; nothing else logs per step
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    with tempfile.TemporaryDirectory(prefix="darkroom-overhead-") as scratch:
        root = Path(scratch)
        model = build_tiny_pixart(root / "tiny-pixart")
        build_cache(root / "cache")
        config = config_for(
            "cpu-test", model=str(model), cache_dir=root / "cache", output_dir=root / "out",
            device="cpu", seed=SEED, grad_accumulation=1, log_every=BIG, checkpoint_every=BIG,
        )  # fmt: skip
        trainer = Trainer(config)
        bare, bare_transformer = bare_loop(config)
        if not same_weights(trainer.transformer, bare_transformer):
            raise SystemExit("the two copies of the transformer differ: not a fair comparison")
        print(
            f"tiny PixArt-Sigma, fp32, {config.optimizer} ({type(trainer.optimizer).__module__}"
            f".{type(trainer.optimizer).__name__}), batch {config.batch_size} x latent"
            f" {'x'.join(map(str, LATENT_SHAPE))}, {CAPTION_TOKENS} caption tokens;"
            f" torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
        )
        for _ in range(WARMUP_STEPS):
            trainer.train_step()
            bare()
        everything: list[tuple[float, float]] = []
        for round_index in range(args.rounds):
            times = paired_times(trainer.train_step, bare, args.pairs)
            everything += times
            darkroom_ms = statistics.median(t[0] for t in times)
            bare_ms = statistics.median(t[1] for t in times)
            print(
                f"round {round_index + 1}: darkroom {darkroom_ms:6.2f} ms/step, bare"
                f" {bare_ms:6.2f} ms/step (medians of {len(times)}),"
                f" ratio {median_ratio(times):.3f} (median of pairs)"
            )
        ratio = median_ratio(everything)
        for side, name in enumerate(("darkroom", "bare")):
            steps = sorted(t[side] for t in everything)
            print(
                f"{name:>8}: median {statistics.median(steps):6.2f} ms/step, fastest"
                f" {steps[0]:6.2f}, 90th percentile {steps[len(steps) * 9 // 10]:6.2f}"
            )
        overhead_ms = statistics.median(d - b for d, b in everything)
        print(
            f"darkroom overhead: {overhead_ms:.2f} ms/step (median of pair differences),"
            f" ratio {ratio:.4f} over {len(everything)} pairs"
        )
        shown = math.ceil(ratio * PERCENT) / PERCENT  # rounded up: never shows a pass it isn't
        steps_to_profile = args.profile or (PROFILE_STEPS if shown > TARGET_RATIO else 0)
        if steps_to_profile:
            print(f"\ncProfile of {steps_to_profile} darkroom steps (darkroom-side functions):")
            print(profile(trainer.train_step, steps_to_profile))
        trainer.close()

    print(f"train_overhead: {shown:.2f}x (target: <= {TARGET_RATIO:.2f}x)")
    return 0 if shown <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
