"""Fixtures for curation tests: the Ollama stand-in with a looking critic, and a Context.

``make_ctx`` builds settings through ``load_settings`` (as the CLI does) pointing at the
stand-ins, and opens the context the daemon uses; ``process`` runs one discovery and
drains curation and write-back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import curate, writeback
from daemon.discover import discover
from daemon.pipeline import Context, drain, open_context
from daemon.settings import load_settings
from tests.immich_server import ImmichServer
from tests.ollama_server import OllamaServer
from tests.vlm_critic import Critic

CRITIC_STARS = 4  # seven everywhere: overall 7.0 → ceil(3.5) = 4 stars


@pytest.fixture
def critic() -> Critic:
    return Critic()


@pytest.fixture
def ollama(critic: Critic) -> Iterator[OllamaServer]:
    with OllamaServer(critic, num_parallel=2) as server:
        yield server


def settings_env(tmp_path: Path, immich: ImmichServer, ollama: OllamaServer, **env: str) -> dict:
    return {
        "DARKROOM_PATHS__STATE_DIR": str(tmp_path / "state"),
        "DARKROOM_PATHS__CACHE_DIR": str(tmp_path / "cache"),
        "DARKROOM_IMMICH__URL": immich.url,
        "DARKROOM_IMMICH__API_KEY": immich.api_key,
        "DARKROOM_IMMICH__MAX_RETRIES": "0",
        "DARKROOM_OLLAMA__HOSTS": ollama.url,
        "DARKROOM_OLLAMA__PARALLEL": "2",
        "DARKROOM_OLLAMA__TIMEOUT_S": "10",
        # The stand-in's asset ids are random: a held-out photo would be a random one.  Tests
        # of the held-out set turn it on.
        "DARKROOM_CACHE__HELD_OUT_EVERY": "0",
        **env,
    }


@pytest.fixture
def make_ctx(tmp_path: Path, immich: ImmichServer, ollama: OllamaServer) -> Iterator[Any]:
    opened: list[Context] = []

    def make(**env: str) -> Context:
        settings = load_settings(None, settings_env(tmp_path, immich, ollama, **env))
        ctx = open_context(settings)
        opened.append(ctx)
        return ctx

    yield make
    for ctx in opened:
        ctx.close()


def process(ctx: Context) -> None:
    discover(ctx.store, ctx.immich, ctx.settings.discovery)
    drain(ctx, curate.STAGE)
    if not ctx.settings.curation.dry_run:
        drain(ctx, writeback.STAGE)
