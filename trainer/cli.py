"""Run training from a command line: ``darkroom train`` and ``python -m trainer``.

``darkroom train`` builds the :class:`TrainConfig` from darkroom's settings; ``python -m
trainer --model M --cache-dir C --output-dir O`` needs no settings, state database or
Immich, so a machine with only the cache copied over (a rented GPU) trains as is.  Both
resume from the latest checkpoint, stop at their limits or on SIGTERM (after writing a
checkpoint), and exit 0; :class:`TrainingStopped` (settings that do not fit the device)
exits 78 with its message, which the daemon does not retry.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from trainer.config import DEFAULT_PRESET, TrainConfig, config_for
from trainer.limits import RunLimits, add_limit_arguments, limits_from
from trainer.loop import Trainer, TrainingStopped
from trainer.progress_file import EXIT_UNWORKABLE

log = logging.getLogger("darkroom.train")

EXIT_OK = 0


class StopFlag:
    """Set by SIGTERM or SIGINT: the run finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.raised = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        self.raised = True

    def __call__(self) -> bool:
        return self.raised


def run_training(config: TrainConfig, limits: RunLimits) -> int:
    """Resume, train within ``limits``, checkpoint; the process exit code."""
    stop = StopFlag()
    stop.install()
    trainer = Trainer(config)
    try:
        trainer.resume()
        result = trainer.run(limits, should_stop=stop)
    except TrainingStopped as exc:
        log.error("training stopped: %s", exc)
        return EXIT_UNWORKABLE
    finally:
        trainer.close()
    log.info(
        "trained steps %d to %d (%s); checkpoints: %s", result.first_step, result.last_step,
        result.reason, ", ".join(str(path.name) for path in result.checkpoints) or "none",
    )  # fmt: skip
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer``: train from a cache folder, no darkroom settings needed."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--model", required=True, help="PixArt-Sigma folder or HF id")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints go here")
    parser.add_argument("--seed", type=int, default=0)
    add_limit_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = config_for(
        args.preset or DEFAULT_PRESET,
        model=args.model, cache_dir=args.cache_dir, output_dir=args.output_dir,
        seed=args.seed, **({"device": args.device} if args.device else {}),
    )  # fmt: skip
    return run_training(config, limits_from(args))
