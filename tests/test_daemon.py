"""``darkroom run`` as a real process against the stand-ins: end to end, kill -9, outages."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.store import Store
from tests.curation_harness import settings_env
from tests.immich_library import make_jpeg
from tests.immich_server import ImmichServer
from tests.ollama_server import OllamaServer
from tests.vlm_critic import Critic

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0
EXIT_CONFIG = 78


class Daemon:
    """One ``darkroom run`` process, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if self.process.poll() is not None and not any(
                re.search(pattern, line) for line in self.lines
            ):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    @property
    def health_url(self) -> str:
        return self.wait_for(r"health endpoint on (\S+)").group(1)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.wait_for("darkroom started")  # before that, Python's default handler applies
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("did not stop:\n" + "\n".join(self.lines[-30:])) from None


@pytest.fixture
def daemon_env(tmp_path: Path, immich: ImmichServer, ollama: OllamaServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(REPO)
    env.update(
        settings_env(
            tmp_path,
            immich,
            ollama,
            DARKROOM_OLLAMA__TIMEOUT_S="30",
            DARKROOM_DISCOVERY__INTERVAL_S="0.5",
            DARKROOM_DISCOVERY__SAFETY_MARGIN_S="1",
            DARKROOM_DAEMON__CURATE_INTERVAL_S="0.5",
            DARKROOM_DAEMON__BACKOFF_BASE_S="0.2",
            DARKROOM_DAEMON__BACKOFF_MAX_S="1",
            DARKROOM_DAEMON__STOP_TIMEOUT_S="5",
            DARKROOM_DAEMON__HEALTH_PORT="0",
        )
    )
    return env


@pytest.fixture
def running() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def library(immich: ImmichServer, critic: Critic) -> dict[str, str]:
    """Photos by expected outcome: upright, turned (with the correction), undecided."""
    critic.confused.add("coffee")
    photos = {
        immich.add_asset(make_jpeg("astronaut")): "upright",
        immich.add_asset(make_jpeg("chelsea", rotate=90)): "270",
        immich.add_asset(make_jpeg("rocket", rotate=180)): "180",
        immich.add_asset(make_jpeg("stereo_motorcycle", rotate=270)): "90",
        immich.add_asset(make_jpeg("coffee", rotate=90)): "review",
        immich.add_asset(make_jpeg("astronaut", scale=0.9)): "upright",
        immich.add_asset(make_jpeg("rocket", scale=0.9)): "upright",
        immich.add_asset(make_jpeg("chelsea", scale=0.9, rotate=180)): "180",
    }
    partner = immich.add_user("Partner")
    immich.add_asset(make_jpeg("chelsea"), owner_id=partner)
    return photos


def done_count(state: Path) -> int:
    with Store(state / "darkroom.sqlite3") as store:
        return store.stage_counts().get("writeback", {}).get("done", 0)


def wait_until_written(state: Path, expected: int, daemon: Daemon) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (state / "darkroom.sqlite3").exists() and done_count(state) == expected:
            return
        assert daemon.process.poll() is None, "\n".join(daemon.lines[-30:])
        time.sleep(0.2)
    raise AssertionError("not everything was written back:\n" + "\n".join(daemon.lines[-30:]))


def assert_library_curated(immich: ImmichServer, photos: dict[str, str]) -> None:
    """Each photo ends as a person would expect, and nothing was written twice."""
    puts = Counter(r.path for r in immich.requests if r.method == "PUT" and r.status == 200)
    for asset_id, outcome in photos.items():
        state = immich.asset(asset_id)
        assert state.description and state.rating == 4 and "darkroom/score/7" in state.tags
        assert state.metadata["darkroom"]["stars"] == 4
        assert puts[f"/api/assets/{asset_id}"] == 1, "description and rating written twice"
        assert puts[f"/api/assets/{asset_id}/metadata"] == 1
        if outcome in ("90", "180", "270"):
            assert [e["parameters"]["angle"] for e in state.edits] == [int(outcome)]
            assert puts[f"/api/assets/{asset_id}/edits"] == 1
        else:
            assert state.edits == ()
    undecided = [a for a, outcome in photos.items() if outcome == "review"]
    assert immich.albums()["darkroom · check rotation"] == undecided


def test_run_end_to_end_health_and_clean_stop(
    tmp_path: Path,
    immich: ImmichServer,
    critic: Critic,
    daemon_env: dict[str, str],
    running: list[Daemon],
) -> None:
    photos = library(immich, critic)
    daemon = Daemon(daemon_env)
    running.append(daemon)
    wait_until_written(tmp_path / "state", len(photos), daemon)
    health = httpx.get(daemon.health_url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(daemon.health_url + "/metrics", timeout=5).text
    assert 'darkroom_stage_assets{stage="writeback",status="done"} 8.0' in metrics
    assert "darkroom_immich_request_duration_seconds_count" in metrics
    assert "darkroom_ollama_calls_total" in metrics
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert any("darkroom stopped" in line for line in daemon.lines)
    assert immich.api_key not in "\n".join(daemon.lines)
    assert_library_curated(immich, photos)


def test_kill_9_at_random_moments_loses_and_doubles_nothing(
    tmp_path: Path,
    immich: ImmichServer,
    ollama: OllamaServer,
    critic: Critic,
    daemon_env: dict[str, str],
    running: list[Daemon],
) -> None:
    photos = library(immich, critic)
    ollama.latency = 0.05  # so the kills land in the middle of the work
    rng = random.Random(20261122)
    for _ in range(8):
        daemon = Daemon(daemon_env)
        running.append(daemon)
        time.sleep(rng.uniform(0.3, 2.5))
        daemon.process.kill()
        daemon.process.wait()
    daemon = Daemon(daemon_env)
    running.append(daemon)
    state = tmp_path / "state"
    wait_until_written(state, len(photos), daemon)
    assert daemon.stop() == 0
    assert_library_curated(immich, photos)
    with Store(state / "darkroom.sqlite3") as store:
        assert store.read("PRAGMA integrity_check")[0][0] == "ok"
        for asset_id in photos:
            assert store.unfinished_writes(asset_id) == []
        fields = store.read(
            "SELECT asset_id, field, COUNT(*) FROM writes WHERE state = 'done' "
            "GROUP BY asset_id, field HAVING COUNT(*) > 1"
        )
        assert fields == []


def test_immich_down_backs_off_and_recovers(
    tmp_path: Path,
    immich: ImmichServer,
    daemon_env: dict[str, str],
    running: list[Daemon],
) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    immich.fail("searchAssets", 503, times=None)
    daemon = Daemon(daemon_env)
    running.append(daemon)
    daemon.wait_for(r"Immich answered 503.*retrying in \d+s")
    before = immich.request_count("searchAssets")
    time.sleep(3)
    # Backoff caps at 1 s here: a handful of tries in 3 s, not a busy loop.
    assert immich.request_count("searchAssets") - before <= 6
    health = httpx.get(daemon.health_url + "/healthz", timeout=5)
    assert health.status_code == 503 and "503" in health.json()["reason"]
    immich.clear_faults()
    daemon.wait_for(r"reachable again")
    wait_until_written(tmp_path / "state", 1, daemon)
    assert immich.asset(asset_id).rating == 4
    assert daemon.stop() == 0


def test_revoked_key_stops_with_exit_78(
    immich: ImmichServer, daemon_env: dict[str, str], running: list[Daemon]
) -> None:
    immich.add_asset(make_jpeg("astronaut"))
    immich.revoke_key()
    daemon = Daemon(daemon_env)
    running.append(daemon)
    assert daemon.process.wait(WAIT_S) == EXIT_CONFIG
    daemon.wait_for(r"stopping: .*API key rejected")
    assert immich.request_count("searchAssets") <= 1  # no retrying forever


def test_sigterm_while_busy_stops_within_the_bound(
    tmp_path: Path,
    immich: ImmichServer,
    ollama: OllamaServer,
    daemon_env: dict[str, str],
    running: list[Daemon],
) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    ollama.latency = 20.0  # a model call far longer than the stop bound
    daemon = Daemon(daemon_env)
    running.append(daemon)
    deadline = time.monotonic() + WAIT_S
    while not ollama.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 5 + 3  # stop_timeout_s plus start-up slack
    with Store(tmp_path / "state" / "darkroom.sqlite3") as store:
        assert store.stage_of(asset_id, "curate")[0] == "pending"  # left for next time
        assert store.curation(asset_id) is None


def test_backoff_grows_caps_and_resets() -> None:
    from daemon.service import Backoff

    backoff = Backoff(base_s=1.0, max_s=8.0, rng=random.Random(7))
    delays = [backoff.failed() for _ in range(6)]
    assert backoff.blocked()
    assert all(d <= 8.0 for d in delays)
    assert delays[0] <= 1.0 and delays[4] >= 4.0  # doubled, then held at the cap
    assert backoff.succeeded() is True  # an outage ended
    assert not backoff.blocked() and backoff.succeeded() is False
