"""When a training run ends, and the command-line options that say so.

Kept free of torch so ``darkroom --help`` can list ``darkroom train``'s options on a machine
without the training extra.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLimits:
    """When a run ends: at an absolute step, after a number of steps, or after some minutes."""

    until_step: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None

    def target_step(self, first: int) -> int | None:
        """The step a run starting at ``first`` stops at (the nearer of both step limits)."""
        targets = [] if self.until_step is None else [self.until_step]
        if self.max_steps is not None:
            targets.append(first + self.max_steps)
        return min(targets) if targets else None


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--device`` and the run limits, shared by both entry points."""
    parser.add_argument("--preset", default=None, help="memory preset: 12gb, 24gb or cpu-test")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda[:N], xpu[:N], mps")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run")
    parser.add_argument("--until-step", type=int, default=None, help="stop at this step")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this long")


def limits_from(args: argparse.Namespace) -> RunLimits:
    """The run limits given on the command line."""
    return RunLimits(
        until_step=args.until_step, max_steps=args.max_steps, max_minutes=args.max_minutes
    )
