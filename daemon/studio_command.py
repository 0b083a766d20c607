"""``darkroom studio``: serve the web app that looks inside the model.

Needs the ``train`` and ``studio`` extras; without them it says which and exits 69.  An
unsafe setting (listening beyond this machine without a token) exits 2 before the model
loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import TYPE_CHECKING

from daemon.cache_commands import EXIT_OK, EXIT_UNAVAILABLE, train_extra_missing
from daemon.settings import Settings

if TYPE_CHECKING:
    from daemon.studio.engine import StudioConfig

EXIT_USAGE = 2
MEBIBYTE = 1024**2
STUDIO_EXTRA_HINT = "the studio needs the studio extra: pip install 'immich-darkroom[train,studio]'"


def cmd_studio(settings: Settings, args: argparse.Namespace) -> int:
    """Serve darkroom studio: render a prompt and look inside the model, in a browser."""
    if train_extra_missing("studio"):
        return EXIT_UNAVAILABLE
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print(f"darkroom studio: {STUDIO_EXTRA_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from daemon.studio.app import serve

    try:
        serve(studio_config(settings, host=args.host, port=args.port))
    except ValueError as exc:
        print(f"darkroom studio: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def studio_config(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> StudioConfig:
    """The studio's config from ``[studio]``, ``[samples]`` and ``[paths]`` (the command
    line's host and port win)."""
    from daemon.samples import pipeline_options, sample_settings
    from daemon.studio.engine import StudioConfig
    from trainer.sample_defaults import DEFAULT_SEED

    studio = settings.studio
    token = studio.token.get_secret_value() if studio.token is not None else None
    return StudioConfig(
        pipeline=pipeline_options(settings),
        checkpoint_dir=settings.paths.checkpoint_dir,
        defaults=sample_settings(settings, DEFAULT_SEED),
        host=studio.host if host is None else host,
        port=studio.port if port is None else port,
        token=token,
        max_runs=studio.max_runs,
        max_bytes=studio.memory_mb * MEBIBYTE,
        max_waiting=studio.max_waiting,
    )


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``studio`` on the main parser."""
    studio = commands.add_parser("studio", help=(cmd_studio.__doc__ or "").splitlines()[0])
    studio.set_defaults(func=cmd_studio)
    studio.add_argument("--host", help="listen address (default: studio.host, 127.0.0.1)")
    studio.add_argument("--port", type=int, help="port (default: studio.port, 8178)")
