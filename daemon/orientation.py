"""Which way is up: votes from the photo shown at four rotations, and the decision.

The photo is shown turned clockwise by 0, 90, 180 and 270 degrees.  If the model says a
view turned by ``shown`` needs ``answer`` more degrees clockwise to be upright, the
original needs ``(shown + answer) % 360``.  A model that truly sees which way is up gives
the same correction for all four views; one that guesses does not.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from daemon.vision import AnswerRejectedError

ANGLES: tuple[int, ...] = (0, 90, 180, 270)
FULL_TURN = 360
ANSWER_KEY = "rotate_clockwise"
Rule = Literal["unanimous", "majority"]


def orientation_schema() -> dict[str, Any]:
    """The JSON schema of one orientation answer."""
    return {
        "type": "object",
        "properties": {ANSWER_KEY: {"type": "integer", "enum": list(ANGLES)}},
        "required": [ANSWER_KEY],
        "additionalProperties": False,
    }


def parse_answer(text: str) -> int:
    """The clockwise correction the model asked for: exactly one of 0/90/180/270."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnswerRejectedError(f"orientation answer is not JSON: {exc.msg}") from None
    if not isinstance(payload, dict) or set(payload) != {ANSWER_KEY}:
        raise AnswerRejectedError(f"orientation answer must be {{{ANSWER_KEY!r}: angle}}")
    value = payload[ANSWER_KEY]
    if type(value) is not int or value not in ANGLES:
        raise AnswerRejectedError(f"orientation {value!r} is not one of {ANGLES}")
    return value


def correction_for_original(shown: int, answer: int) -> int:
    """Map an answer about a turned view back to a clockwise correction of the original."""
    return (shown + answer) % FULL_TURN


@dataclass(frozen=True)
class Decision:
    """The votes (correction per view; None where no valid answer came) and the outcome."""

    votes: dict[int, int | None]
    correction: int | None

    @property
    def agreed(self) -> bool:
        """Whether the votes settled it."""
        return self.correction is not None

    def as_dict(self) -> dict[str, Any]:
        """For the store, Immich metadata and the review queue."""
        return {"votes": {str(k): v for k, v in self.votes.items()}, "correction": self.correction}


def decide(votes: dict[int, int | None], rule: Rule) -> Decision:
    """Agree on a correction under ``rule``, or leave it to a person (correction None)."""
    counted = Counter(v for v in votes.values() if v is not None)
    if not counted:
        return Decision(votes, None)
    best, count = counted.most_common(1)[0]
    agreed = count == len(votes) if rule == "unanimous" else count > len(votes) / 2
    return Decision(votes, best if agreed else None)
