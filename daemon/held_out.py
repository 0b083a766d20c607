"""Which photos are held out of training, so evaluation sees photos the model never saw.

One photo in ``cache.held_out_every`` is held out, chosen by a hash of its Immich id: the
choice never changes as the library grows, so a held-out photo can never have been trained
on earlier.  Up to ``cache.held_out_max`` of them are encoded into a cache of their own
(``paths.held_out_dir``) for ``darkroom samples`` to evaluate on; the ones already there keep
their place (the evaluation set stays the same from checkpoint to checkpoint once full), and
free places go to the lowest hashes.  Held-out photos beyond the cap are not encoded at all,
and still never trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from daemon.training_set import Candidate

HASH_BYTES = 8  # of the sha256 of an asset id: a 64-bit number, evenly spread

HELD_OUT_REASON = "held out for evaluation (never trained on)"
OVER_CAP_REASON = "held out, not evaluated (cache.held_out_max reached); never trained on"


def held_out_rank(asset_id: str) -> int:
    """A stable, evenly spread number for an asset (its place among held-out photos)."""
    return int.from_bytes(hashlib.sha256(asset_id.encode()).digest()[:HASH_BYTES], "big")


def is_held_out(asset_id: str, every: int) -> bool:
    """Whether the photo is one of the one-in-``every`` never trained on (0: none is)."""
    return every > 0 and held_out_rank(asset_id) % every == 0


@dataclass
class HeldOutSplit:
    """The wanted photos, split into training and evaluation."""

    train: list[Candidate] = field(default_factory=list)
    held_out: list[Candidate] = field(default_factory=list)
    over_cap: list[str] = field(default_factory=list)


def split_held_out(
    wanted: Sequence[Candidate], *, every: int, cap: int, already: Collection[str]
) -> HeldOutSplit:
    """Split ``wanted``; ``already`` are the refs the held-out cache holds now."""
    split = HeldOutSplit()
    chosen = []
    for candidate in wanted:
        if is_held_out(candidate.asset_id, every):
            chosen.append(candidate)
        else:
            split.train.append(candidate)
    chosen.sort(key=lambda c: (c.asset_id not in already, held_out_rank(c.asset_id)))
    split.held_out = chosen[:cap]
    split.over_cap = [candidate.asset_id for candidate in chosen[cap:]]
    return split
