"""The nine-factor score: its schema, its validation, the overall score and the stars.

This module is the one place that defines how a model's score becomes an Immich rating:

* each factor is an integer from ``SCORE_MIN`` (1) to ``SCORE_MAX`` (10);
* the overall score is the plain mean of the nine factors, rounded to one decimal;
* stars are ``ceil(overall / 2)``, so 1–2 → ★, 2.1–4 → ★★, 4.1–6 → ★★★, 6.1–8 → ★★★★,
  8.1–10 → ★★★★★;
* the tag is ``<prefix>/score/<round(overall)>`` (``darkroom/score/7``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

SCORE_MIN = 1
SCORE_MAX = 10
STARS_MIN = 1
STARS_MAX = 5
FACTORS: tuple[str, ...] = (
    "focus",
    "exposure",
    "composition",
    "lighting",
    "colors",
    "creativity",
    "depth",
    "emotion",
    "subject",
)


def _factor() -> Any:
    return Field(ge=SCORE_MIN, le=SCORE_MAX)


class Scores(BaseModel):
    """Nine integer factors, all required, all in range; nothing else allowed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    focus: StrictInt = _factor()
    exposure: StrictInt = _factor()
    composition: StrictInt = _factor()
    lighting: StrictInt = _factor()
    colors: StrictInt = _factor()
    creativity: StrictInt = _factor()
    depth: StrictInt = _factor()
    emotion: StrictInt = _factor()
    subject: StrictInt = _factor()

    @property
    def overall(self) -> float:
        """The mean of the nine factors, one decimal."""
        values = [getattr(self, name) for name in FACTORS]
        return round(sum(values) / len(values), 1)

    @property
    def stars(self) -> int:
        """The Immich star rating this score earns (1–5)."""
        return min(STARS_MAX, max(STARS_MIN, math.ceil(self.overall / 2)))


def score_tag(prefix: str, overall: float) -> str:
    """The hierarchical tag for an overall score, e.g. ``darkroom/score/7``."""
    return f"{prefix}/score/{round(overall)}"


class ScoreRejectedError(ValueError):
    """The model's answer is not a valid score; the message says exactly why."""


def score_schema() -> dict[str, Any]:
    """The JSON schema sent to Ollama as ``format``: every factor required and bounded."""
    factor = {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX}
    return {
        "type": "object",
        "properties": {name: dict(factor) for name in FACTORS},
        "required": list(FACTORS),
        "additionalProperties": False,
    }


def parse_scores(text: str) -> Scores:
    """Validate a raw answer: exactly one JSON object of nine in-range integers.

    Text around the JSON, "8/10" strings, floats, missing or extra keys are all rejected;
    nothing is coerced, defaulted or partially kept.
    """
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScoreRejectedError(f"not a JSON object: {exc.msg} at char {exc.pos}") from None
    if not isinstance(payload, dict):
        raise ScoreRejectedError(f"expected a JSON object, got {type(payload).__name__}")
    try:
        return Scores.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'score'}: {e['msg']}" for e in exc.errors()
        )
        raise ScoreRejectedError(problems) from None
