"""The darkroom CLI, run as a real process the way a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "cli-secret-key-987654321"
# Makes any attempt to import torch (or the ML stack) fail loudly.
NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
    "    sys.modules[name] = None\n"
)


def darkroom_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    env.pop("JOURNAL_STREAM", None)
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "DARKROOM_PATHS__STATE_DIR": str(tmp_path / "state"),
            "DARKROOM_PATHS__CACHE_DIR": str(tmp_path / "cache"),
        }
    )
    env.update(extra)
    return env


def darkroom(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    code = NO_TORCH + "from daemon.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=darkroom_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_and_version_without_torch(tmp_path: Path) -> None:
    result = darkroom(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "status", "doctor"):
        assert command in result.stdout
    result = darkroom(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("darkroom ")


def test_import_daemon_without_torch() -> None:
    code = NO_TORCH + "import daemon, daemon.cli, daemon.store, daemon.settings, daemon.doctor\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_status_before_and_after_first_run(tmp_path: Path) -> None:
    result = darkroom(tmp_path, "status")
    assert result.returncode == 0
    assert "no state yet" in result.stdout
    assert darkroom(tmp_path, "doctor").returncode == 1  # Immich not configured yet
    result = darkroom(tmp_path, "status")
    assert "assets: 0 known" in result.stdout
    assert "review queue: 0 open" in result.stdout


def test_doctor_reports_each_check(tmp_path: Path) -> None:
    result = darkroom(
        tmp_path,
        "doctor",
        DARKROOM_IMMICH__URL="http://127.0.0.1:9",
        DARKROOM_IMMICH__API_KEY=KEY,
    )
    assert "[  ok] state dir" in result.stdout
    assert "[  ok] database" in result.stdout
    assert "[  ok] config" in result.stdout
    # These runs block torch, as on a machine with only the daemon's core installed.
    assert "[warn] device" in result.stdout and "[warn] cache" in result.stdout
    assert "the train extra is not installed" in result.stdout
    assert KEY not in result.stdout + result.stderr


def test_doctor_fails_on_unwritable_state_dir(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file-not-dir"
        blocker.write_text("x")
        state = blocker / "state"
    else:
        state = Path("/proc/darkroom-state")
    result = darkroom(tmp_path, "doctor", DARKROOM_PATHS__STATE_DIR=str(state))
    assert result.returncode == 1
    assert "[FAIL] state dir" in result.stdout


def test_bad_config_exits_2_naming_field(tmp_path: Path) -> None:
    result = darkroom(tmp_path, "status", DARKROOM_IMMICH__TIMEOUT_S="soon")
    assert result.returncode == 2
    assert "immich.timeout_s" in result.stderr
    assert "[from environment]" in result.stderr


def test_run_without_immich_settings_says_what_is_missing(tmp_path: Path) -> None:
    result = darkroom(tmp_path, "run", DARKROOM_IMMICH__API_KEY=KEY)
    assert result.returncode == 2
    assert "Immich is not configured: set immich.url" in result.stderr
    assert KEY not in result.stdout + result.stderr
