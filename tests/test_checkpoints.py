"""Checkpoints: bitwise round trips, atomic writes, skipping corrupt ones, retention, disk full.

Real parts throughout: the tiny PixArt transformer loaded from the session's model folder,
torch's own AdamW and LambdaLR for optimizer and schedule state, real files on disk, and
child processes for a full disk (RLIMIT_FSIZE) and for kill -9 in the middle of saves.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

from trainer.checkpoints import (
    CHECKPOINTS_DIR,
    CheckpointError,
    TrainingState,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    read_config,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
LR = 1e-3
WARMUP = 3
TRAIN_STEPS = 4
SAMPLER = {"seed": 7, "batch_size": 2, "drop_last": False, "epoch": 3, "generation": 5}
CONFIG = {"preset": "cpu-test", "learning_rate": LR, "betas": [0.9, 0.999], "seed": 0}
KEEP_ALL = {"keep_last": 100, "milestone_every": 0}

Trained = namedtuple("Trained", "transformer optimizer schedule")
Corruption = Callable[[Path], None]


@pytest.fixture
def transformer(tiny_pixart: Path) -> PixArtTransformer2DModel:
    """A fresh copy of the tiny model's 2-layer transformer."""
    return PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer")


def grads_for(transformer: torch.nn.Module, seed: int) -> None:
    """Give every parameter a seeded random gradient (a stand-in for a backward pass)."""
    generator = torch.Generator().manual_seed(seed)
    for param in transformer.parameters():
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def train(transformer: torch.nn.Module, steps: int, dtype: torch.dtype) -> Trained:
    """A few AdamW steps with linear warmup, so every state tensor is non-trivial."""
    transformer.to(dtype)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    for step in range(steps):
        grads_for(transformer, step)
        optimizer.step()
        schedule.step()
    return Trained(transformer, optimizer, schedule)


def state_at(step: int, trained: Trained | None = None, **extra: object) -> TrainingState:
    """A training state for ``step`` (optimizer and schedule of ``trained`` when given)."""
    return TrainingState(
        step=step,
        optimizer=trained.optimizer.state_dict() if trained else {},
        schedule=trained.schedule.state_dict() if trained else {},
        sampler={**SAMPLER, "position": step},
        ema=None,
        rng=capture_rng(),
        cache_generation=5,
        extra=dict(extra),
    )


def assert_bitwise(left: object, right: object, where: str = "") -> None:
    """Equal structure, and tensors equal bit for bit (dtype, shape and bytes)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), where
        assert (left.dtype, left.shape) == (right.dtype, right.shape), where
        left_bytes = left.detach().reshape(-1).contiguous().view(torch.uint8)
        assert torch.equal(left_bytes, right.detach().reshape(-1).contiguous().view(torch.uint8))
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_bitwise(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, list | tuple):
        assert type(left) is type(right) and len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_bitwise(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


def save(out: Path, step: int, transformer: torch.nn.Module, **policy: int) -> Path:
    """Save a checkpoint with an empty optimizer (for tests about files, not contents)."""
    return save_checkpoint(out, step, transformer, state_at(step), CONFIG, **(policy or KEEP_ALL))


def leftovers(out: Path) -> list[str]:
    """Names in checkpoints/ that are unfinished or being discarded."""
    return sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp"))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_and_training_continues_identically(
    tiny_pixart: Path, transformer: PixArtTransformer2DModel, tmp_path: Path, dtype: torch.dtype
) -> None:
    trained = train(transformer, TRAIN_STEPS, dtype)
    ema = {name: p.detach().float().clone() for name, p in transformer.named_parameters()}
    state = state_at(TRAIN_STEPS, trained, losses=[0.5, 0.25])
    state.ema = ema
    path = save_checkpoint(tmp_path, TRAIN_STEPS, transformer, state, CONFIG, **KEEP_ALL)
    assert path == tmp_path / CHECKPOINTS_DIR / "step-00000004"
    assert latest_checkpoint(tmp_path) == path

    fresh = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer").to(dtype)
    loaded = load_checkpoint(path, fresh)
    assert_bitwise(fresh.state_dict(), transformer.state_dict())
    assert_bitwise(loaded.optimizer, trained.optimizer.state_dict())
    assert_bitwise(loaded.ema, ema)
    assert loaded.schedule == trained.schedule.state_dict()
    assert (loaded.step, loaded.sampler, loaded.cache_generation) == (4, state.sampler, 5)
    assert loaded.extra == {"losses": [0.5, 0.25]}
    assert read_config(path) == CONFIG

    # Rebuilt from the checkpoint, the next step matches the uninterrupted run bit for bit.
    resumed = train(fresh, 0, dtype)
    resumed.optimizer.load_state_dict(loaded.optimizer)
    resumed.schedule.load_state_dict(loaded.schedule)
    for run in (trained, resumed):
        grads_for(run.transformer, TRAIN_STEPS)
        run.optimizer.step()
        run.schedule.step()
    assert_bitwise(fresh.state_dict(), transformer.state_dict())
    assert_bitwise(resumed.optimizer.state_dict(), trained.optimizer.state_dict())


def test_rng_states_round_trip_through_a_checkpoint(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save(tmp_path, 1, transformer)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(path, transformer).rng)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert again[:2] == expected[:2]
    assert torch.equal(again[2], expected[2])


def test_saved_transformer_loads_with_from_pretrained_and_in_the_sigma_pipeline(
    tiny_pixart: Path, transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    trained = train(transformer, 1, torch.float32)
    path = save_checkpoint(tmp_path, 1, transformer, state_at(1, trained), CONFIG, **KEEP_ALL)
    reloaded = PixArtTransformer2DModel.from_pretrained(path / "transformer")
    assert_bitwise(reloaded.state_dict(), transformer.state_dict())
    pipe = PixArtSigmaPipeline.from_pretrained(tiny_pixart, transformer=reloaded)
    assert pipe.transformer is reloaded
    image = pipe(
        "a tabby cat on a sunlit window",
        height=64,
        width=64,
        num_inference_steps=2,
        use_resolution_binning=False,
        clean_caption=False,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_manifest_lists_every_file_with_size_and_sha256(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    path = save_checkpoint(tmp_path, 5000, transformer, state_at(5000), CONFIG, keep_last=1,
                           milestone_every=5000)  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    assert manifest["files"][WEIGHTS]["size"] == (path / WEIGHTS).stat().st_size
    assert (manifest["step"], manifest["cache_generation"], manifest["milestone"]) == (
        5000,
        5,
        True,
    )
    assert manifest["created_at"].endswith("+00:00")
    modes = {(path / name).stat().st_mode for name in manifest["files"]}
    assert modes == {(path / "config.json").stat().st_mode}  # not safetensors' 0600
    assert (tmp_path / CHECKPOINTS_DIR / "latest").read_text() == "step-00005000\n"


# --- atomicity and corruption ----------------------------------------------------------------


def test_latest_moves_only_after_the_checkpoint_is_complete(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    first = save(tmp_path, 1, transformer)
    root = tmp_path / CHECKPOINTS_DIR
    seen: list[tuple[str, list[str]]] = []
    original = transformer.save_pretrained

    def observed(*args: object, **kwargs: object) -> None:
        seen.append(((root / "latest").read_text(), sorted(p.name for p in root.iterdir())))
        original(*args, **kwargs)

    transformer.save_pretrained = observed  # type: ignore[method-assign]
    second = save(tmp_path, 2, transformer)
    assert seen == [("step-00000001\n", [".tmp-step-00000002", "latest", "step-00000001"])]
    assert latest_checkpoint(tmp_path) == second

    def interrupted(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    transformer.save_pretrained = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, transformer)
    assert latest_checkpoint(tmp_path) == second
    assert [info.step for info in list_checkpoints(tmp_path)] == [1, 2]
    assert leftovers(tmp_path) == []
    assert first.is_dir()


def corrupt_flip(path: Path) -> None:
    """Flip one byte in the middle of the weights (same size: only the hash notices)."""
    with (path / WEIGHTS).open("r+b") as handle:
        handle.seek((path / WEIGHTS).stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def corrupt_truncate(path: Path) -> None:
    """Cut the training state short."""
    state = path / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])


def corrupt_manifest(path: Path) -> None:
    """Leave half a manifest, as a torn write would."""
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])


def corrupt_no_manifest(path: Path) -> None:
    """No manifest: a folder copied in by hand, or one from before manifests existed."""
    (path / "manifest.json").unlink()


@pytest.mark.parametrize(
    "corrupt", [corrupt_flip, corrupt_truncate, corrupt_manifest, corrupt_no_manifest]
)
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(
    tiny_pixart: Path, transformer: PixArtTransformer2DModel, tmp_path: Path, corrupt: Corruption
) -> None:
    paths = [save(tmp_path, step, transformer) for step in (1, 2)]
    transformer.to(torch.bfloat16)  # the newest one differs, so loading the older one shows
    paths.append(save(tmp_path, 3, transformer))
    corrupt(paths[2])
    assert latest_checkpoint(tmp_path) == paths[1]
    fresh = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer")
    with pytest.raises(CheckpointError):
        load_checkpoint(paths[2], fresh)
    assert all(p.dtype == torch.float32 for p in fresh.parameters())  # left untouched
    found = load_latest(tmp_path, fresh)
    assert found is not None and found[0] == paths[1] and found[1].step == 2
    verdicts = {info.step: info.valid for info in list_checkpoints(tmp_path, hashes=True)}
    assert verdicts == {1: True, 2: True, 3: False}


def test_a_truncated_newest_and_middle_fall_back_further(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    paths = [save(tmp_path, step, transformer) for step in (1, 2, 3)]
    corrupt_truncate(paths[2])
    corrupt_flip(paths[1])
    assert latest_checkpoint(tmp_path) == paths[0]
    infos = list_checkpoints(tmp_path)  # sizes only: the flipped byte is not noticed
    assert [(i.step, i.valid) for i in infos] == [(1, True), (2, True), (3, False)]
    assert "training_state.pt has 100 bytes" in (infos[2].problem or "")


def test_partial_tmp_dirs_are_ignored_and_cleaned_by_the_next_save(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    first = save(tmp_path, 1, transformer)
    root = tmp_path / CHECKPOINTS_DIR
    partial = root / ".tmp-step-00000002"
    shutil.copytree(first, partial)
    (partial / "manifest.json").unlink()
    (root / ".tmp-latest").write_text("step-00000002\n")
    assert latest_checkpoint(tmp_path) == first
    assert [info.step for info in list_checkpoints(tmp_path)] == [1]
    save(tmp_path, 3, transformer)
    assert leftovers(tmp_path) == []
    assert [info.step for info in list_checkpoints(tmp_path)] == [1, 3]


def test_without_a_latest_pointer_the_newest_valid_checkpoint_is_used(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert load_latest(tmp_path, transformer) is None
    paths = [save(tmp_path, step, transformer) for step in (1, 2)]
    (tmp_path / CHECKPOINTS_DIR / "latest").unlink()
    assert latest_checkpoint(tmp_path) == paths[1]
    (tmp_path / CHECKPOINTS_DIR / "latest").write_text("step-00000007\n")  # names nothing
    assert latest_checkpoint(tmp_path) == paths[1]


def test_latest_wins_over_a_newer_folder_it_does_not_name(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    paths = [save(tmp_path, step, transformer) for step in (1, 2)]
    (tmp_path / CHECKPOINTS_DIR / "latest").write_text("step-00000001\n")  # crash before update
    assert latest_checkpoint(tmp_path) == paths[0]


def test_saving_a_step_again_replaces_it(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    save(tmp_path, 1, transformer)
    transformer.to(torch.bfloat16)
    path = save(tmp_path, 1, transformer)
    verify_checkpoint(path)
    assert leftovers(tmp_path) == []
    assert load_checkpoint(path, transformer).step == 1


def test_a_model_of_another_dtype_is_refused_untouched(
    tiny_pixart: Path, transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    path = save(tmp_path, 1, transformer.to(torch.bfloat16))
    fresh = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer")
    before = {name: t.clone() for name, t in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"saved as torch\.bfloat16"):
        load_checkpoint(path, fresh)
    assert_bitwise(fresh.state_dict(), before)


# --- argument checks -------------------------------------------------------------------------


def test_state_that_would_not_load_back_safely_is_refused_before_writing(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=r"state\['extra'\]\['lr'\] is a numpy.float64"):
        state = state_at(1, lr=np.float64(1e-5))
        save_checkpoint(tmp_path, 1, transformer, state, CONFIG, **KEEP_ALL)
    with pytest.raises(ValueError, match=r"state\.step is 1"):
        save_checkpoint(tmp_path, 2, transformer, state_at(1), CONFIG, **KEEP_ALL)
    assert not (tmp_path / CHECKPOINTS_DIR).exists()


# --- retention -----------------------------------------------------------------------------


def test_retention_keeps_the_last_k_and_every_milestone(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    for step in range(1, 10):
        save(tmp_path, step, transformer, keep_last=2, milestone_every=4)
    infos = list_checkpoints(tmp_path)
    assert [(i.step, i.milestone) for i in infos] == [(4, True), (8, True), (9, False)]
    assert latest_checkpoint(tmp_path) == tmp_path / CHECKPOINTS_DIR / checkpoint_name(9)
    assert leftovers(tmp_path) == []


def test_corrupt_checkpoints_do_not_count_towards_the_last_k(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    paths = [save(tmp_path, step, transformer) for step in (1, 2, 3)]
    corrupt_truncate(paths[2])  # the newest is broken: resume would use step 2
    (tmp_path / CHECKPOINTS_DIR / "latest").write_text("step-00000002\n")
    save(tmp_path, 4, transformer, keep_last=2, milestone_every=0)
    assert [info.step for info in list_checkpoints(tmp_path)] == [2, 4]


def test_checkpoints_newer_than_a_resumed_run_are_superseded(
    transformer: PixArtTransformer2DModel, tmp_path: Path
) -> None:
    for step in (1, 2, 3, 4):
        save(tmp_path, step, transformer, keep_last=10, milestone_every=4)
    (tmp_path / CHECKPOINTS_DIR / "latest").write_text("step-00000001\n")  # resumed from 1
    save(tmp_path, 2, transformer, keep_last=10, milestone_every=4)
    assert [info.step for info in list_checkpoints(tmp_path)] == [1, 2, 4]  # 4: milestone


# --- disk full and kill -9, in one child process -----------------------------------------------

# Importing diffusers takes seconds, so one child runs both crash scenarios:
# 1. kill -9: per round it forks a saver that writes checkpoint after checkpoint (reporting
#    each step save_checkpoint returned through a pipe), waits for 0-2 reports, SIGKILLs it
#    after a further random delay and reports what it then finds on disk.  Nothing has run
#    torch's thread pools before the forks, so forking is safe.
# 2. disk full: under a file size limit (SIGXFSZ ignored, so writes past it fail with EFBIG)
#    it saves a small checkpoint, then two that cannot fit: one whose training state exceeds
#    the limit (torch.save fails), then, with the limit lowered below the weights file, one
#    whose transformer cannot be written (safetensors fails).
CRASH_CHILD = """
import json, os, random, resource, signal, sys, time
from pathlib import Path
import torch
from diffusers import PixArtTransformer2DModel
from trainer.checkpoints import (CheckpointError, TrainingState, latest_checkpoint,
                                 load_checkpoint, save_checkpoint)
settings = json.loads(sys.argv[1])
transformer = PixArtTransformer2DModel.from_pretrained(Path(settings["model"]))

def state(step, blob_bytes=1):
    blob = torch.ones(blob_bytes, dtype=torch.uint8)
    return TrainingState(step=step, optimizer={}, schedule={}, sampler={}, ema=None, rng={},
                         cache_generation=1, extra={"blob": blob})

def save_forever(out, step, pipe):
    while True:
        save_checkpoint(out, step, transformer, state(step), {}, keep_last=2, milestone_every=0)
        os.write(pipe, f"{step}\\n".encode())  # one small write: never split
        step += 1

def kill_round(out, step, wait_for, delay):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            save_forever(out, step, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        done = [int(pipe.readline()) for _ in range(wait_for)]
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done += [int(word) for word in pipe.read().split()]
    latest = latest_checkpoint(out)
    return {"done": done, "latest": latest and latest.name,
            "loaded": latest and load_checkpoint(latest, transformer).step,
            "pointer": (out / "checkpoints" / "latest").read_text().strip()}

def attempt(out, step, blob_bytes):
    try:
        save_checkpoint(out, step, transformer, state(step, blob_bytes), {}, keep_last=3,
                        milestone_every=0)
    except CheckpointError as error:
        return str(error)
    return "saved"

kill_out, chooser, rounds, step = Path(settings["kill_out"]), random.Random(settings["seed"]), [], 1
for _ in range(settings["rounds"]):
    wait_for = chooser.randrange(settings["max_wait_for"] + 1)
    rounds.append(kill_round(kill_out, step, wait_for, chooser.uniform(*settings["delay"])))
    step = max(rounds[-1]["done"], default=step) + 2  # beyond anything the saver left

disk_out, roomy, tight = Path(settings["disk_out"]), settings["roomy"], settings["tight"]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (roomy, roomy))
disk = {"first": attempt(disk_out, 1, 1), "state": attempt(disk_out, 2, 2 * roomy)}
resource.setrlimit(resource.RLIMIT_FSIZE, (tight, tight))
disk["weights"] = attempt(disk_out, 3, 1)
print(json.dumps({"rounds": rounds, "disk": disk}))
"""
KILL_ROUNDS = 6
KILL_WAIT_FOR = 2  # completed saves to wait for (at random, up to this) before the delay
KILL_AFTER_S = (0.0, 0.15)  # a tiny save takes ~0.1 s (fsyncs): kills land in every phase
CrashRun = namedtuple("CrashRun", "report kill_out disk_out")


@pytest.fixture(scope="module")
def crash_run(tiny_pixart: Path, tmp_path_factory: pytest.TempPathFactory) -> CrashRun:
    """Run the crash child once for this module's two crash tests."""
    weights = (tiny_pixart / WEIGHTS).stat().st_size
    kill_out = tmp_path_factory.mktemp("killed")
    disk_out = tmp_path_factory.mktemp("disk-full")
    settings = {
        "model": str(tiny_pixart / "transformer"),
        "kill_out": str(kill_out),
        "rounds": KILL_ROUNDS,
        "seed": 7,
        "max_wait_for": KILL_WAIT_FOR,
        "delay": KILL_AFTER_S,
        "disk_out": str(disk_out),
        "roomy": 2 * weights,
        "tight": weights // 2,
    }
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, json.dumps(settings)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    return CrashRun(json.loads(child.stdout.strip().splitlines()[-1]), kill_out, disk_out)


def test_kill_9_while_saving_always_leaves_a_valid_latest(
    crash_run: CrashRun, transformer: PixArtTransformer2DModel
) -> None:
    rounds = crash_run.report["rounds"]
    assert len(rounds) == KILL_ROUNDS
    previous = 0
    for found in rounds:
        assert found["latest"] == found["pointer"]  # latest named a complete checkpoint
        assert found["loaded"] >= max(found["done"], default=previous)  # nothing saved lost
        previous = found["loaded"]
    assert any(found["done"] for found in rounds), "no kill came after a completed save"
    save(crash_run.kill_out, previous + 2, transformer, keep_last=2, milestone_every=0)
    assert leftovers(crash_run.kill_out) == []
    assert all(info.valid for info in list_checkpoints(crash_run.kill_out, hashes=True))


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(
    crash_run: CrashRun, transformer: PixArtTransformer2DModel
) -> None:
    report, out = crash_run.report["disk"], crash_run.disk_out
    assert report["first"] == "saved"
    for failure in (report["state"], report["weights"]):
        assert failure.startswith("disk full (EFBIG: File too large) while writing checkpoint")
        assert "the previous checkpoint (step-00000001) and 'latest' are unchanged" in failure
    first = out / CHECKPOINTS_DIR / "step-00000001"
    assert latest_checkpoint(out) == first
    assert [info.step for info in list_checkpoints(out, hashes=True)] == [1]
    assert leftovers(out) == []
    assert load_checkpoint(first, transformer).extra["blob"].tolist() == [1]


def test_too_little_free_space_is_refused_before_writing(
    transformer: PixArtTransformer2DModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save(tmp_path, 1, transformer)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))
    with pytest.raises(CheckpointError, match=r"^disk full: checkpoint step-00000002 needs"):
        save(tmp_path, 2, transformer)
    assert latest_checkpoint(tmp_path) == first
    assert leftovers(tmp_path) == []
