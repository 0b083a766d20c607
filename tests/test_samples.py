"""Issue 8 end to end: a tiny training run with three checkpoints, then ``darkroom timelapse``,
``darkroom samples`` and ``darkroom generate`` as a user runs them (real processes), against
the Immich stand-in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from daemon.results import FRAME, SAMPLE, Results
from daemon.samples_job import JobOptions, run_timelapse
from daemon.settings import Settings, load_settings
from daemon.store import Store
from tests.immich_server import ImmichServer
from tests.test_heldout import HELD_OUT
from tests.test_heldout import encode as encode_photos
from tests.test_train import build_cache, tiny_config
from trainer.charts import read_validation
from trainer.limits import RunLimits
from trainer.loop import Trainer
from trainer.sampling import PipelineOptions, Sampler, SampleSettings, read_png_text

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")  # the bitwise test (conftest)

CHECKPOINT_EVERY = 2
STEPS = 3 * CHECKPOINT_EVERY  # three checkpoints: 2, 4, 6
MILESTONE = 4
PROMPTS = ("a lighthouse on a rocky coastline at dusk", "a tabby cat on a sunlit window")
ALBUM = "darkroom · time-lapse"
RENDER_STEPS = "2"
CLI_TIMEOUT_S = 300


@dataclass
class Run:
    """A trained tiny run and the environment that points darkroom at it."""

    env: dict[str, str]
    settings: Settings
    immich: ImmichServer


def settings_env(tmp: Path, tiny_pixart: Path, immich: ImmichServer) -> dict[str, str]:
    env = {
        "DARKROOM_PATHS__STATE_DIR": str(tmp / "state"),
        "DARKROOM_PATHS__CACHE_DIR": str(tmp / "cache"),
        "DARKROOM_PATHS__CHECKPOINT_DIR": str(tmp / "run"),
        "DARKROOM_PATHS__HELD_OUT_DIR": str(tmp / "held-out"),
        "DARKROOM_IMMICH__URL": immich.url,
        "DARKROOM_IMMICH__API_KEY": immich.api_key,
        "DARKROOM_CACHE__MODEL": str(tiny_pixart),
        "DARKROOM_SAMPLES__STEPS": RENDER_STEPS,
        "DARKROOM_SAMPLES__DEVICE": "cpu",
        "DARKROOM_SAMPLES__PRECISION": "fp32",
        "DARKROOM_SAMPLES__PROMPTS": "["
        + ", ".join(f'{{"prompt": "{p}", "seed": {i}}}' for i, p in enumerate(PROMPTS))
        + "]",
    }
    return env


@pytest.fixture
def run(tmp_path: Path, tiny_pixart: Path, immich: ImmichServer) -> Iterator[Run]:
    """Three checkpoints of the tiny model, a held-out photo, settings pointing at them."""
    build_cache(tmp_path / "cache")
    encode_photos(tmp_path / "held-out", HELD_OUT, tiny_pixart)
    config = tiny_config(
        tiny_pixart, tmp_path / "cache", tmp_path / "run",
        checkpoint_every=CHECKPOINT_EVERY, milestone_every=MILESTONE, grad_accumulation=1,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.run(RunLimits(until_step=STEPS))
    trainer.close()
    env = settings_env(tmp_path, tiny_pixart, immich)
    (tmp_path / "state").mkdir()
    yield Run(env, load_settings(None, env), immich)


def darkroom(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it."""
    env = {**os.environ, **run.env, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "daemon.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False
    )


def printed_paths(done: subprocess.CompletedProcess[str]) -> list[Path]:
    """The files a command printed (its log lines share stdout, as under systemd)."""
    return [Path(line) for line in done.stdout.splitlines() if line.startswith("/")]


def album_assets(immich: ImmichServer) -> list[str]:
    albums = [a for a in immich.library.albums.values() if a.name == ALBUM]
    assert len(albums) == 1
    return list(albums[0].asset_ids)


def nearest(frame: Image.Image, renders: list[Image.Image]) -> int:
    """The index of the render a time-lapse frame shows (frames are stamped and quantised)."""
    distances = [
        sum(ImageStat.Stat(ImageChops.difference(frame, render)).mean) for render in renders
    ]
    return distances.index(min(distances))


def test_timelapse_after_three_checkpoints(run: Run) -> None:
    done = darkroom(run, "timelapse")
    assert done.returncode == 0, done.stderr
    outputs = printed_paths(done)
    gifs = [p for p in outputs if p.suffix == ".gif"]
    webps = [p for p in outputs if p.suffix == ".webp"]
    sheets = [p for p in outputs if p.name.startswith("contact-sheet")]
    pairs = [p for p in outputs if "before-after" in p.name]
    assert len(gifs) == len(webps) == len(pairs) == len(PROMPTS) and len(sheets) == 1
    with Store(run.settings.paths.database) as store:
        renders = Results(store).renders(SAMPLE)
    first = sorted((r for r in renders if r.prompt == PROMPTS[0]), key=lambda r: r.step)
    assert [r.step for r in first] == [0, 2, 4, 6]  # the base model and every checkpoint
    images = [Image.open(r.path).convert("RGB") for r in first]
    gif = next(p for p in gifs if p.name.startswith("00-"))
    with Image.open(gif) as animation:
        assert animation.n_frames == len(first)  # one frame per checkpoint
        frames = []
        for index in range(animation.n_frames):
            animation.seek(index)
            frames.append(animation.convert("RGB"))
    assert [nearest(frame, images) for frame in frames] == [0, 1, 2, 3]  # in step order
    with Image.open(sheets[0]) as sheet:
        assert sheet.width > sheet.height / 2  # 4 rows (checkpoints) x 2 columns (prompts)
    # Immich holds every file exactly once, in the album, described.
    uploads = run.immich.request_count("uploadAsset")
    expected = len(renders) + len(gifs) + len(pairs) + len(sheets)
    assert uploads == expected
    assets = album_assets(run.immich)
    assert len(assets) == expected
    described = [run.immich.library.assets[a].description for a in assets]
    assert any("step 6" in d and "2 steps" in d for d in described), described
    again = darkroom(run, "timelapse")
    assert again.returncode == 0, again.stderr
    assert run.immich.request_count("uploadAsset") == uploads  # never twice
    assert len(album_assets(run.immich)) == expected


def test_samples_evaluate_every_checkpoint_and_plot_it(run: Run) -> None:
    # A key without asset.upload: samples.upload = "auto" renders all the same, uploads nothing.
    run.immich.permissions.remove("all")
    run.immich.permissions += ["asset.read", "album.read", "album.create", "albumAsset.create"]
    done = darkroom(run, "samples")
    assert done.returncode == 0, done.stderr
    assert "0 uploaded" in done.stdout and run.immich.request_count("uploadAsset") == 0
    assert "lacks asset.upload" in done.stdout + done.stderr
    with Store(run.settings.paths.database) as store:
        results = Results(store)
        evaluations = results.latest_evaluations()
        assert len(results.renders(SAMPLE)) == 4 * len(PROMPTS)  # base + 3 checkpoints
    assert [e.step for e in evaluations] == [0, 2, 4, 6]
    assert all(e.samples == len(HELD_OUT) for e in evaluations)
    for evaluation in evaluations:
        assert evaluation.late > 0 and evaluation.middle > 0 and evaluation.early > 0
    output = run.settings.paths.checkpoint_dir
    assert (output / "loss.png").is_file()
    assert [p.step for p in read_validation(output)] == [0, 2, 4, 6]  # what the chart drew
    card = output / "checkpoints" / "step-00000004" / "MODEL_CARD.md"
    assert card.is_file(), done.stderr
    text = card.read_text()
    assert "step 4" in text.lower() and str(run.settings.cache.model) in text
    assert "CLIP scores skipped" in done.stderr
    status = darkroom(run, "status")
    assert f"{4 * len(PROMPTS)} validation renders, 0 files uploaded" in status.stdout
    assert "held-out loss at step 6 (1 photos): early" in status.stdout


def test_rendering_mid_training_leaves_the_training_bit_for_bit(
    tmp_path: Path, tiny_pixart: Path
) -> None:
    build_cache(tmp_path / "cache")
    straight = tiny_config(tiny_pixart, tmp_path / "cache", tmp_path / "straight")
    trainer = Trainer(straight)
    trainer.run(RunLimits(until_step=4))
    expected = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}
    trainer.close()

    paused = tiny_config(tiny_pixart, tmp_path / "cache", tmp_path / "paused")
    trainer = Trainer(paused)
    trainer.run(RunLimits(until_step=2))
    checkpoint = trainer.save()
    with Sampler(PipelineOptions(model=str(tiny_pixart), device="cpu", dtype="fp32")) as sampler:
        sampler.use_checkpoint(checkpoint, 2)
        sampler.render(PROMPTS[0], SampleSettings(steps=2), count=2)
    trainer.run(RunLimits(until_step=4))
    for name, tensor in trainer.transformer.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    trainer.close()


def test_generate_renders_a_checkpoint_deterministically(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    args = ("generate", PROMPTS[1], "--checkpoint", "4", "--steps", "2", "--seed", "7")
    first = darkroom(run, *args, "-n", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr
    paths = [tmp_path / "cat-1.png", tmp_path / "cat-2.png"]
    assert printed_paths(first) == paths
    text = read_png_text(paths[1])
    assert (text["prompt"], text["seed"], text["steps"]) == (PROMPTS[1], "8", "2")
    assert (text["guidance"], text["checkpoint"]) == ("4.5", "step 4")
    again = darkroom(run, *args, "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    with Image.open(paths[0]) as one, Image.open(tmp_path / "again.png") as other:
        assert ImageChops.difference(one.convert("RGB"), other.convert("RGB")).getbbox() is None
    with Image.open(paths[1]) as other_seed, Image.open(paths[0]) as one:
        assert ImageChops.difference(one, other_seed).getbbox() is not None
    odd = darkroom(run, "generate", "x", "--width", "1000", "--out", str(tmp_path / "x.png"))
    assert odd.returncode == 2 and "nine buckets" in odd.stderr
    none = darkroom(run, "generate", "x", "--steps", "0", "--out", str(tmp_path / "x.png"))
    assert none.returncode == 2 and "steps must be at least 1" in none.stderr
    missing = darkroom(run, "generate", "x", "--checkpoint", "5", "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "2, 4, 6" in missing.stderr, missing.stderr


def test_a_damaged_checkpoint_is_skipped_with_the_reason(run: Run) -> None:
    weights = next(
        (run.settings.paths.checkpoint_dir / "checkpoints" / "step-00000004").rglob("*.safetensors")
    )
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(16)  # same size, different bytes: only the hash can tell
    weights.write_bytes(bytes(data))
    report = run_timelapse(run.settings, JobOptions(upload=False), PROMPTS[0], seed=3)
    assert "step 4" in report.skipped and "sha256" in report.skipped["step 4"]
    with Store(run.settings.paths.database) as store:
        steps = [r.step for r in Results(store).renders(FRAME)]
    assert steps == [0, 2, 6]  # the others rendered
