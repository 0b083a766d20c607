"""The ``darkroom`` command: one CLI in front of the daemon, the cache and the trainer.

Settings are built here, once, and handed to each subcommand.  Subcommands import what
they need lazily so ``darkroom --help`` stays fast and never needs torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from daemon.logs import configure_logging, use_journal_format
from daemon.settings import Settings, SettingsError, load_settings

DISTRIBUTION = "immich-darkroom"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2

log = logging.getLogger("darkroom")


def package_version() -> str:
    """The installed version of darkroom."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (systemd runs exactly this)."""
    from daemon.service import Service

    return Service(settings).run()


def cmd_status(settings: Settings, _args: argparse.Namespace) -> int:
    """Print what the store knows: assets, stages and reviews."""
    from daemon.status import render_status

    print(render_status(settings))
    return EXIT_OK


def cmd_doctor(settings: Settings, _args: argparse.Namespace) -> int:
    """Check configuration and surroundings; exit non-zero when something fails."""
    from daemon.doctor import Outcome, format_report, run_checks

    checks = run_checks(settings)
    print(format_report(checks))
    return EXIT_FAILED if any(c.outcome is Outcome.FAIL for c in checks) else EXIT_OK


Command = Callable[[Settings, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="darkroom",
        description="Companion daemon for Immich: curates your photos with a local vision "
        "model and fine-tunes PixArt-Sigma on your library.",
    )
    parser.add_argument("--version", action="version", version=f"darkroom {package_version()}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: /etc/darkroom/darkroom.toml when present)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, func in (("run", cmd_run), ("status", cmd_status), ("doctor", cmd_doctor)):
        sub = commands.add_parser(name, help=(func.__doc__ or "").splitlines()[0])
        sub.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``darkroom`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    secrets = [settings.immich.api_key.get_secret_value()] if settings.immich.api_key else []
    configure_logging(
        settings.log_level,
        journal=use_journal_format(settings.log_format, os.environ),
        secrets=secrets,
    )
    func: Command = args.func
    return func(settings, args)


if __name__ == "__main__":
    sys.exit(main())
