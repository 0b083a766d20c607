"""Settings: precedence of sources, systemd credentials, clear errors, no secret leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from daemon.settings import Settings, SettingsError, load_settings

KEY = "s3cret-Key-0123456789abcdef"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "darkroom.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_follow_systemd_directories(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": str(tmp_path / "state"), "CACHE_DIRECTORY": str(tmp_path / "c")}
    settings = load_settings(None, env)
    assert settings.paths.state_dir == tmp_path / "state"
    assert settings.paths.cache_dir == tmp_path / "c"
    assert settings.paths.checkpoint_dir == tmp_path / "state" / "checkpoints"
    assert settings.log_level == "INFO"
    assert settings.immich.url is None


def test_defaults_without_systemd_are_var_paths() -> None:
    settings = load_settings(None, {})
    assert settings.paths.state_dir == Path("/var/lib/darkroom")
    assert settings.paths.cache_dir == Path("/var/cache/darkroom")


def test_toml_overrides_defaults_and_env_overrides_toml(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        f"""
        log_level = "debug"
        [immich]
        url = "http://photos.lan:2283"
        api_key = "{KEY}"
        timeout_s = 12
        [paths]
        state_dir = "{tmp_path}/from-toml"
        """,
    )
    env = {"DARKROOM_IMMICH__TIMEOUT_S": "7.5", "DARKROOM_LOG_LEVEL": "warning"}
    settings = load_settings(config, env)
    assert str(settings.immich.url) == "http://photos.lan:2283/"
    assert settings.immich.timeout_s == 7.5  # env beats TOML
    assert settings.log_level == "WARNING"
    assert settings.paths.state_dir == tmp_path / "from-toml"
    # Derived from the state dir the TOML chose, not from the built-in default.
    assert settings.paths.checkpoint_dir == tmp_path / "from-toml" / "checkpoints"
    assert settings.immich.api_key is not None
    assert settings.immich.api_key.get_secret_value() == KEY


def test_api_key_from_systemd_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "immich_api_key").write_text(KEY + "\n", encoding="utf-8")
    config = write_toml(tmp_path, '[immich]\napi_key = "from-toml"\n')
    settings = load_settings(config, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert settings.immich.api_key is not None
    assert settings.immich.api_key.get_secret_value() == KEY  # credential beats TOML
    env = {"CREDENTIALS_DIRECTORY": str(creds), "DARKROOM_IMMICH__API_KEY": "from-env"}
    settings = load_settings(config, env)
    assert settings.immich.api_key is not None
    assert settings.immich.api_key.get_secret_value() == "from-env"


def test_bad_value_names_field_and_source(tmp_path: Path) -> None:
    config = write_toml(tmp_path, '[immich]\ntimeout_s = -3\nurl = "ftp:/nope"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(config, {"DARKROOM_LOG_LEVEL": "chatty"})
    message = str(caught.value)
    assert "immich.timeout_s" in message
    assert f"config file {config}" in message
    assert "immich.url" in message
    assert "log_level" in message and "[from environment]" in message


def test_unknown_setting_is_an_error_naming_it(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "[immich]\ntimeout = 3\n")
    with pytest.raises(SettingsError, match=r"immich\.timeout: Extra inputs"):
        load_settings(config, {})


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", {})
    broken = write_toml(tmp_path, "[immich\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, {})


def test_secret_never_shown(tmp_path: Path) -> None:
    settings = load_settings(None, {"DARKROOM_IMMICH__API_KEY": KEY})
    assert KEY not in repr(settings)
    assert KEY not in str(settings)
    assert KEY not in settings.model_dump_json()
    # A misspelled key field is reported by name, without echoing the value.
    config = write_toml(tmp_path, f'[immich]\napikey = "{KEY}"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(config, {})
    assert "immich.apikey" in str(caught.value)
    assert KEY not in str(caught.value)
    # So is a key of the wrong shape.
    config = write_toml(tmp_path, f'immich = "{KEY}"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(config, {})
    assert KEY not in str(caught.value)


def _setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _setting_names(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    undocumented = [n for n in _setting_names(Settings) if f"| `{n}` |" not in readme]
    assert not undocumented
