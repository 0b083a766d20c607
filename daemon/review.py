"""``darkroom review``: the rotations darkroom would not decide alone, and a person's answer.

A person can apply a rotation (the one the votes leaned to, or any angle), dismiss the
question (the photo stays as it is), or undo a rotation darkroom applied, whether it was
decided by the votes or from this queue.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from daemon.orientation import ANGLES
from daemon.store import Store
from daemon.writeback import ROTATION, ROTATION_REVIEW, record_write_for
from immich_client import ImmichClient
from immich_client.models import ROTATE_ACTION

QUARTER_TURNS = frozenset(ANGLES) - {0}


class ReviewError(Exception):
    """The requested review action cannot be done; the message says why."""


@dataclass(frozen=True)
class ReviewItem:
    """One open question for a person."""

    asset_id: str
    votes: dict[str, int | None]
    reason: str
    created_at: str

    @property
    def leaning(self) -> int | None:
        """The correction most votes named, if any vote was valid."""
        counted = Counter(v for v in self.votes.values() if v is not None)
        return counted.most_common(1)[0][0] if counted else None


def open_items(store: Store) -> list[ReviewItem]:
    """Every open rotation question, oldest first."""
    return [
        ReviewItem(asset_id, proposal.get("votes", {}), proposal.get("reason", ""), created)
        for asset_id, kind, proposal, created in store.reviews("open")
        if kind == ROTATION_REVIEW
    ]


def format_items(items: list[ReviewItem]) -> str:
    """The queue as a person reads it."""
    if not items:
        return "nothing to review"
    lines = [f"{len(items)} photo(s) to review (votes: view shown → correction for the photo):"]
    for item in items:
        ordered = sorted(item.votes.items(), key=lambda pair: int(pair[0]))
        votes = ", ".join(f"{shown}°→{'?' if vote is None else vote}" for shown, vote in ordered)
        lean = f"{item.leaning}°" if item.leaning is not None else "none"
        lines.append(f"  {item.asset_id}  [{votes}]  leaning {lean}  ({item.reason})")
    return "\n".join(lines)


def apply(store: Store, immich: ImmichClient, asset_id: str, angle: int | None) -> int:
    """Rotate as a person decided (default: the votes' leaning); return the angle used."""
    item = next((i for i in open_items(store) if i.asset_id == asset_id), None)
    if item is None:
        raise ReviewError(f"{asset_id} has no open rotation review")
    chosen = item.leaning if angle is None else angle
    if chosen not in QUARTER_TURNS:
        raise ReviewError(f"choose an angle of 90, 180 or 270 (got {chosen})")
    record_write_for(
        store, asset_id, ROTATION, chosen, lambda: immich.add_rotation(asset_id, chosen)
    )
    store.resolve_review(asset_id, ROTATION_REVIEW, "applied")
    store.claim_for_human(asset_id, ROTATION)
    return chosen


def dismiss(store: Store, asset_id: str) -> None:
    """Leave the photo as it is and close the question."""
    if not any(i.asset_id == asset_id for i in open_items(store)):
        raise ReviewError(f"{asset_id} has no open rotation review")
    store.resolve_review(asset_id, ROTATION_REVIEW, "dismissed")
    store.claim_for_human(asset_id, ROTATION)


def undo(store: Store, immich: ImmichClient, asset_id: str) -> int:
    """Remove the rotation darkroom applied (keeping every other edit); return its angle."""
    wrote, angle = store.last_written(asset_id, ROTATION)
    if not wrote or angle is None:
        raise ReviewError(f"darkroom has not rotated {asset_id}")
    edits = immich.get_edits(asset_id).edits
    ours = [
        i
        for i, e in enumerate(edits)
        if e.action == ROTATE_ACTION and e.parameters.get("angle") == angle
    ]
    if not ours:
        raise ReviewError(
            f"{asset_id} no longer has darkroom's {angle}° rotation (changed in Immich?)"
        )
    kept = [e for i, e in enumerate(edits) if i != ours[-1]]

    def remove() -> None:
        if kept:
            immich.put_edits(asset_id, kept)
        else:
            immich.delete_edits(asset_id)

    record_write_for(store, asset_id, ROTATION, None, remove)
    store.resolve_review(asset_id, ROTATION_REVIEW, "undone")
    store.claim_for_human(asset_id, ROTATION)
    return int(angle)
