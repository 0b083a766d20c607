"""The unit files and the example configuration in systemd/: valid, hardened, consistent.

``systemd-analyze verify`` parses the units as PID 1 would and reports every mistake
(unknown keys, bad values, missing dependencies).  It also insists that ExecStart= names an
existing executable, and /opt/darkroom/bin/darkroom does not exist on a test machine, so
the units are verified as copies whose ExecStart= path (and nothing else) points at a
stand-in script.  systemd-analyze exits 0 even for unknown keys, so its output is read too:
any line naming one of our units fails the test.  Lines about other units come from the
machine (a container not booted with systemd, say), not from our files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.hooks import TERMINATE_WAIT_S
from daemon.settings import DaemonSettings, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "systemd"
DAEMON_UNIT = "darkroom.service"
TRAIN_UNIT = "darkroom-train.service"
ENCODE_UNIT = "darkroom-encode.service"
SAMPLES_UNIT = "darkroom-samples.service"
TIMER_UNIT = "darkroom-train.timer"
UNITS = (DAEMON_UNIT, TRAIN_UNIT, ENCODE_UNIT, SAMPLES_UNIT, TIMER_UNIT)
EXAMPLE_CONFIG = Path("systemd/darkroom.toml")
INSTALLED_EXECUTABLE = "/opt/darkroom/bin/darkroom"
EXIT_CONFIG = "78"
ANALYZE_TIMEOUT_S = 120
# systemd-analyze security rates 0 (locked down) to 10 (exposed); below 2 is "OK".
# Measured with systemd 252: darkroom.service 1.1, darkroom-train.service 1.7 (it keeps
# the GPU devices, W+X memory for PyTorch, and the render/video groups).
DAEMON_MAX_EXPOSURE = 1.5
TRAIN_MAX_EXPOSURE = 2.5
EXPOSURE_LINE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+(?:\.\d+)?)")
TIME_SPAN = re.compile(r"^(?P<value>\d+)(?P<unit>s|min)?$")
SECONDS_PER = {None: 1, "s": 1, "min": 60}
# Example-config lines that show a setting at its default: "#name = value".
COMMENTED_SETTING = re.compile(r"^#(?P<line>(?P<name>[a-z_]+) = .*)$")
SETTING_LINE = re.compile(r"^#?(?P<name>[a-z_]+) = ")
SECTION_LINE = re.compile(r"^\[(?P<name>[a-z_]+)\]$")
# Commented example values that are deliberately not the defaults.
EXAMPLE_NOT_DEFAULT = {
    ("immich", "api_key"),
    ("hooks", "encode_command"),
    ("hooks", "train_command"),
    ("hooks", "samples_command"),
    ("samples", "clip_model"),
    ("studio", "token"),
    ("train", "learning_rate"),
    ("train", "min_snr_gamma"),
    ("train", "ema_decay"),
    ("train", "device_watts"),
    ("train", "energy_price_per_kwh"),
}


def parse_unit(path: Path) -> dict[tuple[str, str], list[str]]:
    """Every ``Key=value`` of a unit file by (section, key), in order (keys may repeat)."""
    entries: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def one(entries: dict[tuple[str, str], list[str]], section: str, key: str) -> str:
    """The single value of a key that must be set exactly once."""
    values = entries.get((section, key), [])
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


def seconds(span: str) -> int:
    """A systemd time span such as "45s" or "5min", in seconds (the forms used here)."""
    match = TIME_SPAN.match(span)
    assert match, f"unexpected time span {span!r}"
    return int(match["value"]) * SECONDS_PER[match["unit"]]


@pytest.fixture(scope="module")
def analyze() -> str:
    """The systemd-analyze executable, or a skip saying why the checks cannot run."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt install systemd)")
    return found


@dataclass
class Verdict:
    """What systemd-analyze verify said: lines about our units, and lines about the machine."""

    returncode: int
    ours: list[str]
    machine: list[str]


def verify(analyze: str, units: list[Path]) -> Verdict:
    """Run ``systemd-analyze verify`` and sort its output by what it is about."""
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # A unit is named at the start of a line, after a space, or at the end of a path.
    about_ours = re.compile("|".join(rf"(?:^|[/\s]){re.escape(u.name)}\b" for u in units))
    ours = [line for line in lines if about_ours.search(line)]
    machine = [line for line in lines if line not in ours]
    return Verdict(result.returncode, ours, machine)


def runnable_copies(tmp_path: Path, edit: dict[str, str] | None = None) -> list[Path]:
    """The units copied to tmp_path, ExecStart= pointing at an executable stand-in.

    ``edit`` replaces text in the copies (to plant a mistake on purpose).
    """
    stand_in = tmp_path / "bin" / "darkroom"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    assert re.fullmatch(r"[\w/.-]+", str(stand_in)), "ExecStart= path needs no quoting"
    copies = []
    for name in UNITS:
        original = (SYSTEMD_DIR / name).read_text(encoding="utf-8")
        text = original.replace(f"ExecStart={INSTALLED_EXECUTABLE} ", f"ExecStart={stand_in} ")
        changed = [
            (a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b
        ]
        assert all(a.startswith("ExecStart=") for a, _ in changed), changed
        for old, new in (edit or {}).items():
            text = text.replace(old, new)
        copy = tmp_path / name
        copy.write_text(text, encoding="utf-8")
        copies.append(copy)
    return copies


def test_units_pass_systemd_analyze_verify(analyze: str, tmp_path: Path) -> None:
    verdict = verify(analyze, runnable_copies(tmp_path))
    assert not verdict.ours, "systemd-analyze verify:\n" + "\n".join(verdict.ours)
    if verdict.returncode != 0:
        pytest.skip(
            "systemd-analyze verify failed for reasons outside these units:\n"
            + "\n".join(verdict.machine)
        )
    if verdict.machine:
        warnings.warn("systemd-analyze verify: " + "; ".join(verdict.machine), stacklevel=1)


def test_verify_catches_real_mistakes(analyze: str, tmp_path: Path) -> None:
    """The check above would notice a broken unit: plant two mistakes and look for them."""
    copies = runnable_copies(
        tmp_path, {"Type=notify": "Type=notfy", "NoNewPrivileges=": "NoNewPrivilege="}
    )
    ours = "\n".join(verify(analyze, copies).ours)
    assert "notfy" in ours
    assert "NoNewPrivilege" in ours


def test_units_as_installed_fail_only_for_the_missing_install(analyze: str) -> None:
    """The real files, unchanged: the only complaint allowed is a missing /opt/darkroom."""
    verdict = verify(analyze, [SYSTEMD_DIR / name for name in UNITS])
    missing = f"Command {INSTALLED_EXECUTABLE} is not executable"
    unexpected = [line for line in verdict.ours if missing not in line]
    assert not unexpected, "systemd-analyze verify:\n" + "\n".join(unexpected)


def exposure(analyze: str, unit: Path) -> float:
    """The overall exposure score of ``systemd-analyze security --offline=true``."""
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_S,
        check=False,
    )
    match = EXPOSURE_LINE.search(result.stdout)
    if match is None:
        if "offline" in result.stderr.lower() or "unrecognized option" in result.stderr:
            pytest.skip(f"systemd-analyze security --offline unsupported: {result.stderr}")
        pytest.fail(f"no exposure score (exit {result.returncode}):\n{result.stderr}")
    return float(match["score"])


@pytest.mark.parametrize(
    ("unit", "limit"),
    [
        (DAEMON_UNIT, DAEMON_MAX_EXPOSURE),
        (TRAIN_UNIT, TRAIN_MAX_EXPOSURE),
        (ENCODE_UNIT, TRAIN_MAX_EXPOSURE),
        (SAMPLES_UNIT, TRAIN_MAX_EXPOSURE),
    ],
)
def test_units_are_hardened(analyze: str, unit: str, limit: float) -> None:
    score = exposure(analyze, SYSTEMD_DIR / unit)
    assert score <= limit, f"{unit}: exposure {score} above {limit}"


def test_daemon_unit_matches_what_darkroom_does() -> None:
    text = (SYSTEMD_DIR / DAEMON_UNIT).read_text(encoding="utf-8")
    assert "LoadCredential=immich_api_key:/etc/darkroom/immich_api_key" in text
    unit = parse_unit(SYSTEMD_DIR / DAEMON_UNIT)
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert seconds(one(unit, "Service", "WatchdogSec")) > 0
    assert one(unit, "Service", "ExecStart") == f"{INSTALLED_EXECUTABLE} run"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert EXIT_CONFIG in one(unit, "Service", "RestartPreventExitStatus").split()
    # darkroom's own stop bound: in-flight work, then a running hook.
    own_bound = DaemonSettings().stop_timeout_s + TERMINATE_WAIT_S
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > own_bound
    assert one(unit, "Service", "PrivateDevices") == "yes"
    assert one(unit, "Service", "MemoryDenyWriteExecute") == "yes"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert "PYTHONUNBUFFERED=1" in unit[("Service", "Environment")]


def test_train_unit_can_reach_the_gpu() -> None:
    text = (SYSTEMD_DIR / TRAIN_UNIT).read_text(encoding="utf-8")
    assert "LoadCredential=immich_api_key:/etc/darkroom/immich_api_key" in text
    unit = parse_unit(SYSTEMD_DIR / TRAIN_UNIT)
    assert one(unit, "Service", "Type") == "exec"
    assert one(unit, "Service", "ExecStart") == f"{INSTALLED_EXECUTABLE} train"
    assert one(unit, "Service", "Restart") == "no"
    assert one(unit, "Service", "PrivateDevices") == "no"
    assert one(unit, "Service", "MemoryDenyWriteExecute") == "no"
    assert "PrivateUsers" not in {key for _, key in unit}
    assert {"char-drm rw", "char-nvidia* rw"} <= set(unit[("Service", "DeviceAllow")])
    assert set(one(unit, "Service", "SupplementaryGroups").split()) == {"render", "video"}


def test_both_services_share_user_and_directories() -> None:
    daemon = parse_unit(SYSTEMD_DIR / DAEMON_UNIT)
    train = parse_unit(SYSTEMD_DIR / TRAIN_UNIT)
    for key in ("User", "StateDirectory", "CacheDirectory", "ConfigurationDirectory"):
        assert one(daemon, "Service", key) == one(train, "Service", key) == "darkroom"


def test_timer_triggers_the_train_unit_nightly() -> None:
    timer = parse_unit(SYSTEMD_DIR / TIMER_UNIT)
    assert one(timer, "Timer", "Unit") == TRAIN_UNIT
    assert one(timer, "Timer", "OnCalendar") == "*-*-* 02:00:00"
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Install", "WantedBy") == "timers.target"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    settings = load_settings(EXAMPLE_CONFIG, {})
    assert str(settings.immich.url) == "http://photos.lan:2283/"
    assert settings.immich.api_key is None


def leaf_settings(model: type[Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every setting's path, e.g. ("immich", "url") or ("log_level",)."""
    leaves: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            leaves |= leaf_settings(annotation, (*prefix, name))
        else:
            leaves.add((*prefix, name))
    return leaves


def test_example_config_shows_every_setting() -> None:
    shown: set[tuple[str, ...]] = set()
    section: tuple[str, ...] = ()
    for line in (SYSTEMD_DIR / "darkroom.toml").read_text(encoding="utf-8").splitlines():
        if header := SECTION_LINE.match(line):
            section = (header["name"],)
        elif setting := SETTING_LINE.match(line):
            shown.add((*section, setting["name"]))
    assert shown == leaf_settings(Settings)


def test_example_config_comments_show_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every "#name = value" line still loads, and changes only the examples."""
    lines = (SYSTEMD_DIR / "darkroom.toml").read_text(encoding="utf-8").splitlines()
    uncommented = [
        match["line"] if (match := COMMENTED_SETTING.match(line)) else line for line in lines
    ]
    config = tmp_path / "darkroom.toml"
    config.write_text("\n".join(uncommented) + "\n", encoding="utf-8")
    everything = load_settings(config, {}).model_dump(mode="json")
    example = load_settings(SYSTEMD_DIR / "darkroom.toml", {}).model_dump(mode="json")
    for section, name in EXAMPLE_NOT_DEFAULT:
        everything[section].pop(name)
        example[section].pop(name)
    assert everything == example
