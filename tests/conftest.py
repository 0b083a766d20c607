"""Shared pytest fixtures: a started stand-in Immich server and real test photos."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.immich_library import SAMPLE_PHOTOS, make_jpeg
from tests.immich_server import ImmichServer

ImmichFactory = Callable[..., ImmichServer]


def _fail_on_violations(server: ImmichServer) -> None:
    """Fail the test if the stand-in answered outside the spec or crashed (its own bugs)."""
    if server.spec_violations:
        listed = "\n  ".join(server.spec_violations)
        pytest.fail(f"stand-in Immich answered outside its OpenAPI spec:\n  {listed}")
    if server.crashes:
        pytest.fail("stand-in Immich crashed:\n" + "\n".join(server.crashes))


@pytest.fixture
def make_immich() -> Iterator[ImmichFactory]:
    """Start stand-in servers with custom settings (``make_immich(permissions=[...])``).

    Every server is stopped afterwards, and the test fails if any of them recorded a spec
    violation (a response of the stand-in that the real API would not give) or crashed.
    """
    servers: list[ImmichServer] = []

    def start(**settings: Any) -> ImmichServer:
        server = ImmichServer(**settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        _fail_on_violations(server)


@pytest.fixture
def immich(make_immich: ImmichFactory) -> ImmichServer:
    """A started stand-in Immich server with an all-permissions key and an empty library."""
    return make_immich()


@pytest.fixture(scope="session")
def real_jpegs() -> dict[str, bytes]:
    """One real JPEG per scikit-image sample photo, by name (astronaut, chelsea, …)."""
    return {name: make_jpeg(name) for name in SAMPLE_PHOTOS}


# Curation fixtures (the Ollama stand-in with a looking critic, a darkroom Context).
from tests.curation_harness import critic, make_ctx, ollama  # noqa: E402, F401

# darkroom studio over the tiny model, served by uvicorn on 127.0.0.1.
from tests.studio_fixtures import studio_engine, studio_server  # noqa: E402, F401

# A tiny PixArt-Sigma folder (VAE, T5, tokenizer, transformer), built once per session.
from tests.tiny_models import tiny_pixart  # noqa: E402, F401


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bitwise comparisons need one reduction order: a BLAS free to pick its thread count
    by load (MKL's dynamic threads) sums in different orders on a busy machine.  Modules
    that compare bit for bit use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
