"""``darkroom doctor`` against the stand-in Immich: version, key, permissions."""

from __future__ import annotations

from pathlib import Path

from daemon.doctor import Outcome
from daemon.settings import load_settings
from tests.conftest import ImmichFactory
from tests.immich_server import DEFAULT_API_KEY
from tests.ollama_server import OllamaServer
from tests.test_cli import darkroom


def doctor(
    tmp_path: Path, url: str, key: str = DEFAULT_API_KEY, ollama: str = "http://127.0.0.1:9"
) -> tuple[int, str]:
    result = darkroom(
        tmp_path,
        "doctor",
        DARKROOM_IMMICH__URL=url,
        DARKROOM_IMMICH__API_KEY=key,
        DARKROOM_IMMICH__MAX_RETRIES="0",
        DARKROOM_OLLAMA__HOSTS=ollama,
    )
    assert key not in result.stdout + result.stderr
    return result.returncode, result.stdout


def test_doctor_all_permissions(
    tmp_path: Path, make_immich: ImmichFactory, ollama: OllamaServer
) -> None:
    server = make_immich()
    code, out = doctor(tmp_path, server.url + "/api", ollama=ollama.url)
    assert code == 0, out
    assert "[  ok] immich" in out
    assert "Immich 2.7.5" in out
    assert "owner@example.com" in out
    assert "all permissions present" in out


def test_doctor_lists_missing_permissions(tmp_path: Path, make_immich: ImmichFactory) -> None:
    server = make_immich(permissions=["asset.read", "asset.view", "user.read", "asset.upload"])
    code, out = doctor(tmp_path, server.url)
    assert code == 1
    line = next(line for line in out.splitlines() if " immich " in line)
    assert line.startswith("[FAIL]")
    for missing in ("asset.update", "asset.download", "tag.create", "albumAsset.create"):
        assert missing in line
    assert "asset.read," not in line and "asset.view" not in line


def test_doctor_optional_permission_is_a_warning(
    tmp_path: Path, make_immich: ImmichFactory, ollama: OllamaServer
) -> None:
    from daemon.immich import NEEDED_PERMISSIONS

    server = make_immich(permissions=list(NEEDED_PERMISSIONS))
    code, out = doctor(tmp_path, server.url, ollama=ollama.url)
    assert code == 0
    assert "[warn] immich" in out and "asset.upload" in out


def test_doctor_old_immich_and_bad_key(tmp_path: Path, make_immich: ImmichFactory) -> None:
    old = make_immich(version=(2, 4, 1))
    code, out = doctor(tmp_path, old.url)
    assert code == 1 and "needs Immich 2.5.0 or newer" in out
    code, out = doctor(tmp_path, old.url, key="not-the-key")
    assert code == 1 and "API key rejected" in out


def test_doctor_immich_unreachable(tmp_path: Path) -> None:
    code, out = doctor(tmp_path, "http://127.0.0.1:9")
    assert code == 1 and "cannot connect to Immich" in out


def test_doctor_checks_the_vision_model(
    tmp_path: Path, make_immich: ImmichFactory, ollama: OllamaServer
) -> None:
    server = make_immich()
    common = {
        "DARKROOM_IMMICH__URL": server.url,
        "DARKROOM_IMMICH__API_KEY": server.api_key,
        "DARKROOM_OLLAMA__HOSTS": ollama.url,
    }
    result = darkroom(tmp_path, "doctor", **common)
    assert result.returncode == 0, result.stdout
    assert "[  ok] vision" in result.stdout and "qwen2.5vl:7b" in result.stdout
    result = darkroom(tmp_path, "doctor", DARKROOM_OLLAMA__MODEL="llava:7b", **common)
    assert result.returncode == 1
    assert "[FAIL] vision" in result.stdout and "ollama pull llava:7b" in result.stdout
    result = darkroom(tmp_path, "doctor", DARKROOM_OLLAMA__MODEL="llama3.2:3b", **common)
    assert "cannot see images" in result.stdout


def test_cache_check_passes_a_sound_cache_and_fails_a_damaged_one(tmp_path: Path) -> None:
    from daemon.doctor_training import check_cache
    from tests.test_train import build_cache

    paths = {"STATE_DIR": tmp_path / "state", "CACHE_DIR": tmp_path / "cache"}
    settings = load_settings(None, {f"DARKROOM_PATHS__{k}": str(v) for k, v in paths.items()})
    assert check_cache(settings).outcome is Outcome.WARN  # nothing encoded yet
    build_cache(tmp_path / "cache")
    sound = check_cache(settings)
    assert sound.outcome is Outcome.OK and "12 samples" in sound.detail
    shard = next((tmp_path / "cache" / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    assert check_cache(settings).outcome is Outcome.FAIL


def test_device_check_names_the_device_or_why_not(tmp_path: Path) -> None:
    from daemon.doctor_training import check_training_device

    env = {"DARKROOM_PATHS__STATE_DIR": str(tmp_path)}
    auto = check_training_device(load_settings(None, env))
    assert auto.outcome is Outcome.WARN and "CPU" in auto.detail  # this machine has no GPU
    cuda = check_training_device(load_settings(None, env | {"DARKROOM_TRAIN__DEVICE": "cuda"}))
    assert cuda.outcome is Outcome.FAIL and "cuda" in cuda.detail.lower()
