"""A real darkroom studio for tests: the tiny PixArt-Sigma, one trained checkpoint, and
uvicorn serving the app on a free port of 127.0.0.1.

The engine (the loaded model) is shared by the session; each server gets its own app and
run queue.  Tests use :func:`studio_server` (no token) or :func:`serve` for other configs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import uvicorn

from daemon.studio.app import create_app
from daemon.studio.engine import Engine, StudioConfig
from tests.test_sampling import nudged_transformer, write_checkpoint
from trainer.sampling import PipelineOptions, SampleSettings

STEPS = 3  # few steps: the number changes nothing the tests look at
CHECKPOINT_STEP = 100
STARTUP_SECONDS = 30


@dataclass(frozen=True)
class Studio:
    """A running studio: where to reach it and the engine behind it."""

    url: str
    engine: Engine


@pytest.fixture(scope="session")
def studio_engine(tiny_pixart: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The studio's engine over the tiny model (fp32, CPU) with one nudged checkpoint."""
    checkpoints = tmp_path_factory.mktemp("studio-checkpoints")
    write_checkpoint(checkpoints, CHECKPOINT_STEP, nudged_transformer(tiny_pixart, seed=1))
    config = StudioConfig(
        pipeline=PipelineOptions(model=str(tiny_pixart), device="cpu", dtype="fp32"),
        checkpoint_dir=checkpoints,
        defaults=SampleSettings(steps=STEPS),
    )
    engine = Engine(config)
    yield engine
    engine.close()


@contextmanager
def serve(engine: Engine, **overrides: object) -> Iterator[Studio]:
    """Serve a fresh app over ``engine``, its config changed by ``overrides`` (a token,
    limits), until the block ends."""
    app = create_app(engine, replace(engine.config, **overrides))  # type: ignore[arg-type]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the studio server did not start")
        time.sleep(0.05)
    try:
        yield Studio(f"http://127.0.0.1:{port}", engine)
    finally:
        server.should_exit = True
        thread.join()
        listener.close()


@pytest.fixture(scope="module")
def studio_server(studio_engine: Engine) -> Iterator[Studio]:
    """A studio as configured by default (no token) for the module."""
    with serve(studio_engine) as studio:
        yield studio
