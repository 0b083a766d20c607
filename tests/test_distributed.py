"""Two training processes on the CPU (Gloo), started by torchrun as ``accelerate launch`` does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_train import build_cache
from trainer.checkpoints import latest_checkpoint
from trainer.distributed import World

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 2
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_processes_train_one_model(tmp_path: Path, tiny_pixart: Path) -> None:
    cache = build_cache(tmp_path / "cache")
    output = tmp_path / "out"
    # torchrun: what ``accelerate launch --multi_gpu`` hands the processes over to.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_port", str(free_port()),
        "-m", "trainer", "--model", str(tiny_pixart), "--cache-dir", str(cache),
        "--output-dir", str(output), "--preset", "cpu-test", "--device", "cpu",
        "--max-steps", str(STEPS),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("trained steps 0 to 2") == WORLD
    checkpoint = latest_checkpoint(output)
    assert checkpoint is not None and checkpoint.name == f"step-{STEPS:08d}"
    base = load_file(next((tiny_pixart / "transformer").glob("*.safetensors")))
    trained = load_file(next((checkpoint / "transformer").glob("*.safetensors")))
    assert any(not torch.equal(base[name], trained[name]) for name in base)


def test_each_rank_trains_on_its_own_share_of_the_plan() -> None:
    plan = [[index] for index in range(6)]
    shares = [list(World(rank=r, size=WORLD).deal(iter(plan))) for r in range(WORLD)]
    assert shares == [[[0], [2], [4]], [[1], [3], [5]]]
    assert list(World().deal(iter(plan))) == plan  # a world of one takes everything
