"""``darkroom train``: resume the fine-tune from darkroom's settings.

The training itself is ``trainer.cli.run_training``; this only maps the ``[train]``,
``[cache]`` and ``[paths]`` settings onto a :class:`trainer.config.TrainConfig`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from daemon.cache_commands import EXIT_UNAVAILABLE, train_extra_missing
from daemon.settings import Settings
from trainer.limits import add_limit_arguments, limits_from

if TYPE_CHECKING:  # torch is optional: trainer modules are imported only when used
    from trainer.config import TrainConfig


def train_config(settings: Settings, args: argparse.Namespace) -> TrainConfig:
    """The trainer's configuration: the preset's bundle, then darkroom's settings."""
    from trainer.config import config_for

    train = settings.train
    overrides: dict[str, Any] = {
        "model": settings.cache.model,
        "cache_dir": settings.paths.cache_dir,
        "output_dir": settings.paths.checkpoint_dir,
        "device": args.device or train.device,
        "seed": train.seed,
        "checkpoint_every": train.checkpoint_every,
        "keep_last": train.keep_last,
        "milestone_every": train.milestone_every,
        "min_snr_gamma": train.min_snr_gamma,
        "ema_decay": train.ema_decay,
        "log_every": train.log_every,
        "tensorboard": train.tensorboard,
        "device_watts": train.device_watts,
        "energy_price_per_kwh": train.energy_price_per_kwh,
    }
    if train.learning_rate is not None:
        overrides["learning_rate"] = train.learning_rate
    return config_for(args.preset or train.preset, **overrides)


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    """Resume training from the latest checkpoint (stops at a limit or on SIGTERM)."""
    if train_extra_missing("train"):
        return EXIT_UNAVAILABLE
    from trainer.cli import run_training

    return run_training(train_config(settings, args), limits_from(args))


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``train`` on the main parser."""
    train = commands.add_parser("train", help=(cmd_train.__doc__ or "").splitlines()[0])
    train.set_defaults(func=cmd_train)
    add_limit_arguments(train)
