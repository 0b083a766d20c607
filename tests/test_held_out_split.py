"""Which photos are held out of training (``daemon/held_out.py``)."""

from __future__ import annotations

from daemon.held_out import held_out_rank, is_held_out, split_held_out
from daemon.training_set import ORIGINAL, Candidate

EVERY = 5


def candidate(asset_id: str) -> Candidate:
    return Candidate(asset_id, f"sum-{asset_id}", "a caption", ORIGINAL, 0)


def library(size: int) -> list[Candidate]:
    return [candidate(f"asset-{n:04d}") for n in range(size)]


def test_about_one_in_every_is_held_out_and_the_choice_is_stable() -> None:
    wanted = library(2000)
    held = [c.asset_id for c in wanted if is_held_out(c.asset_id, EVERY)]
    assert 300 < len(held) < 500  # 1 in 5 of 2000, give or take
    again = [c.asset_id for c in library(3000)[:2000] if is_held_out(c.asset_id, EVERY)]
    assert held == again  # a bigger library does not change who was held out
    assert not any(is_held_out(c.asset_id, 0) for c in wanted)  # 0: none


def test_split_never_trains_a_held_out_photo_and_caps_the_evaluation_set() -> None:
    wanted = library(500)
    split = split_held_out(wanted, every=EVERY, cap=10, already=())
    held = {c.asset_id for c in wanted if is_held_out(c.asset_id, EVERY)}
    assert {c.asset_id for c in split.train} == {c.asset_id for c in wanted} - held
    assert len(split.held_out) == 10
    assert {c.asset_id for c in split.held_out} | set(split.over_cap) == held
    ranks = sorted(held_out_rank(asset_id) for asset_id in held)
    assert sorted(held_out_rank(c.asset_id) for c in split.held_out) == ranks[:10]


def test_photos_already_held_out_keep_their_place() -> None:
    wanted = library(500)
    first = split_held_out(wanted[:250], every=EVERY, cap=10, already=())
    kept = [c.asset_id for c in first.held_out]
    later = split_held_out(wanted, every=EVERY, cap=10, already=set(kept))
    assert [c.asset_id for c in later.held_out] == kept  # the evaluation set stays the same
