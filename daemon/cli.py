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

from daemon import cache_commands, sample_commands, studio_command, train_command
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

    try:
        return Service(settings).run()
    except SettingsError as exc:
        print(f"darkroom: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG


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


def cmd_review(settings: Settings, args: argparse.Namespace) -> int:
    """List the rotations waiting for a person; apply, dismiss or undo one."""
    from daemon import review
    from daemon.immich import open_immich
    from daemon.store import Store

    with Store(settings.paths.database) as store:
        if args.action == "list":
            print(review.format_items(review.open_items(store)))
            return EXIT_OK
        try:
            if args.action == "dismiss":
                review.dismiss(store, args.asset)
                print(f"{args.asset}: left as it is")
                return EXIT_OK
            with open_immich(settings) as immich:
                if args.action == "apply":
                    angle = review.apply(store, immich, args.asset, args.angle)
                    print(f"{args.asset}: rotated {angle}° clockwise")
                else:
                    angle = review.undo(store, immich, args.asset)
                    print(f"{args.asset}: darkroom's {angle}° rotation removed")
        except review.ReviewError as exc:
            print(f"darkroom review: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def cmd_recurate(settings: Settings, args: argparse.Namespace) -> int:
    """Queue photos for curation again: older prompt versions, or the quarantined."""
    from daemon import curate
    from daemon.store import Store

    if args.since_version is None and not args.quarantined:
        print("darkroom recurate: give --since-version N and/or --quarantined", file=sys.stderr)
        return EXIT_BAD_CONFIG
    with Store(settings.paths.database) as store:
        count = 0
        if args.since_version is not None:
            count += store.requeue_older_curations(args.since_version, curate.STAGE)
        if args.quarantined:
            count += store.requeue(curate.STAGE, "quarantined")
    print(f"{count} photo(s) queued for curation")
    return EXIT_OK


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
    subs = {}
    for name, func in (
        ("run", cmd_run),
        ("status", cmd_status),
        ("doctor", cmd_doctor),
        ("review", cmd_review),
        ("recurate", cmd_recurate),
    ):
        subs[name] = commands.add_parser(name, help=(func.__doc__ or "").splitlines()[0])
        subs[name].set_defaults(func=func)
    cache_commands.add_arguments(commands)
    train_command.add_arguments(commands)
    sample_commands.add_arguments(commands)
    studio_command.add_arguments(commands)
    _review_arguments(subs["review"])
    subs["recurate"].add_argument(
        "--since-version",
        type=int,
        metavar="N",
        help="redo photos curated with a prompt version older than N",
    )
    subs["recurate"].add_argument(
        "--quarantined", action="store_true", help="give quarantined photos another try"
    )
    return parser


def _review_arguments(review: argparse.ArgumentParser) -> None:
    actions = review.add_subparsers(dest="action", metavar="ACTION")
    review.set_defaults(action="list")
    actions.add_parser("list", help="the photos waiting for a decision (default)")
    apply = actions.add_parser("apply", help="rotate a photo (default: as most votes said)")
    apply.add_argument("asset", help="the asset id")
    apply.add_argument("--angle", type=int, choices=(90, 180, 270), help="clockwise degrees")
    dismiss = actions.add_parser("dismiss", help="leave a photo as it is")
    dismiss.add_argument("asset", help="the asset id")
    undo = actions.add_parser("undo", help="remove a rotation darkroom applied")
    undo.add_argument("asset", help="the asset id")


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
