"""``darkroom train`` and ``python -m trainer`` as processes: limits, SIGTERM, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_train import build_cache
from trainer.checkpoints import latest_checkpoint, list_checkpoints
from trainer.progress_file import LOG_FILE, read_progress

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def darkroom_config(tmp_path: Path, tiny_pixart: Path) -> Path:
    config = tmp_path / "darkroom.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[cache]\nmodel = "{tiny_pixart}"\n'
        '[train]\npreset = "cpu-test"\ndevice = "cpu"\ncheckpoint_every = 2\nlog_every = 1\n'
        "device_watts = 100.0\nenergy_price_per_kwh = 0.3\n"
    )
    return config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip


def test_darkroom_train_runs_to_its_limit_and_resumes(tmp_path: Path, tiny_pixart: Path) -> None:
    build_cache(tmp_path / "cache")
    config = darkroom_config(tmp_path, tiny_pixart)
    first = run("-m", "daemon.cli", "--config", str(config), "train", "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    output = tmp_path / "state" / "checkpoints"
    assert [info.step for info in list_checkpoints(output)] == [2, 3]
    second = run("-m", "daemon.cli", "--config", str(config), "train", "--max-steps", "2")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "trained steps 3 to 5" in second.stdout
    assert latest_checkpoint(output) == output / "checkpoints" / "step-00000005"
    records = [json.loads(line) for line in (output / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["watts"] == 100.0 and r["cost_per_image"] > 0 for r in records)


def test_sigterm_checkpoints_where_the_run_is(tmp_path: Path, tiny_pixart: Path) -> None:
    cache = build_cache(tmp_path / "cache")
    output = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "trainer", "--model", str(tiny_pixart), "--cache-dir",
         str(cache), "--output-dir", str(output), "--preset", "cpu-test", "--device", "cpu"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while (read_progress(output) or {}).get("step", 0) < 1:
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    assert child.wait(TIMEOUT_S) == 0
    progress = read_progress(output)
    assert progress is not None and progress["state"] == "finished"
    assert progress["reason"] == "asked to stop"
    latest = latest_checkpoint(output)
    assert latest is not None and latest.name == f"step-{progress['step']:08d}"
