"""Validation of the model's answers: captions, nine-factor scores, orientation votes."""

from __future__ import annotations

import json

import pytest

from daemon.captions import clean_caption
from daemon.orientation import correction_for_original, decide, parse_answer
from daemon.scoring import FACTORS, ScoreRejectedError, Scores, parse_scores, score_schema
from daemon.vision import AnswerRejectedError

SEVENS = dict.fromkeys(FACTORS, 7)


def caption(text: str, max_chars: int = 2000, keep: bool = False) -> str:
    return clean_caption(text, max_chars=max_chars, keep_preamble=keep)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("This image shows a red kite over a green hill.", "A red kite over a green hill."),
        (
            "Here is a detailed description of the image: "
            "The photo depicts a red kite in a blue sky.",
            "A red kite in a blue sky.",
        ),
        ("In this photo, two dogs run on wet sand.", "Two dogs run on wet sand."),
        ("**A red kite** over\n\na  green hill.", "A red kite over a green hill."),
        ("A red kite\u0000 over a hill\u200b.", "A red kite over a hill."),
    ],
)
def test_caption_cleaned(raw: str, clean: str) -> None:
    assert caption(raw) == clean


def test_preamble_kept_when_wanted() -> None:
    text = "This image shows a red kite over a green hill."
    assert caption(text, keep=True) == text


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "I'm sorry, but I can't describe this image.",
        "I cannot help with that request, as it may contain people.",
        "As an AI, I do not see images.",
        "Unable to view the image.",
        "A cat.",  # too short to be a caption
    ],
)
def test_empty_short_and_refusals_rejected(raw: str) -> None:
    with pytest.raises(AnswerRejectedError):
        caption(raw)


def test_caption_bounded_at_sentence_end_and_utf8_safe() -> None:
    text = "Ein Fuchs läuft über das Feld. " * 10 + "Die Sonne geht unter über den Hügeln."
    bounded = caption(text, max_chars=100)
    assert len(bounded) <= 100 and bounded.endswith("Feld.")
    bounded.encode("utf-8")
    no_stop = caption("word " * 100, max_chars=60)
    assert len(no_stop) <= 61 and no_stop.endswith("word.")


def test_valid_score() -> None:
    scores = parse_scores(json.dumps({**SEVENS, "focus": 10, "emotion": 1}))
    assert scores.overall == round((7 * 7 + 10 + 1) / 9, 1)
    assert 1 <= scores.stars <= 5


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ('{"focus": 7}', "exposure"),
        (json.dumps({**SEVENS, "focus": 0}), "focus"),
        (json.dumps({**SEVENS, "focus": 11}), "focus"),
        (json.dumps({**SEVENS, "focus": "8/10"}), "focus"),
        (json.dumps({**SEVENS, "focus": "8"}), "focus"),
        (json.dumps({**SEVENS, "focus": 7.5}), "focus"),
        (json.dumps({**SEVENS, "focus": True}), "focus"),
        (json.dumps({**SEVENS, "sharpness": 7}), "sharpness"),
        ("Here you go: " + json.dumps(SEVENS), "not a JSON object"),
        (json.dumps(SEVENS) + " Hope this helps!", "not a JSON object"),
        ("[7, 7, 7]", "expected a JSON object"),
        ("", "not a JSON object"),
    ],
)
def test_invalid_scores_rejected(answer: str, why: str) -> None:
    with pytest.raises(ScoreRejectedError, match=why):
        parse_scores(answer)


@pytest.mark.parametrize(
    ("overall_value", "stars"),
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (7, 4), (8, 4), (9, 5), (10, 5)],
)
def test_stars_mapping(overall_value: int, stars: int) -> None:
    assert Scores(**dict.fromkeys(FACTORS, overall_value)).stars == stars


def test_score_schema_requires_and_bounds_every_factor() -> None:
    schema = score_schema()
    assert schema["required"] == list(FACTORS)
    assert schema["additionalProperties"] is False
    assert all(
        p == {"type": "integer", "minimum": 1, "maximum": 10} for p in schema["properties"].values()
    )


def test_orientation_answers() -> None:
    assert parse_answer('{"rotate_clockwise": 90}') == 90
    for bad in ('{"rotate_clockwise": 45}', '{"rotate_clockwise": "90"}', "90", '{"angle": 90}'):
        with pytest.raises(AnswerRejectedError):
            parse_answer(bad)


def test_votes_map_back_to_the_original() -> None:
    # The original needs 90° clockwise. Shown turned by 90 it needs 0 more, and so on.
    answers = {0: 90, 90: 0, 180: 270, 270: 180}
    votes = {shown: correction_for_original(shown, a) for shown, a in answers.items()}
    assert decide(votes, "unanimous").correction == 90


def test_decision_rules() -> None:
    split = {0: 90, 90: 90, 180: 90, 270: 0}
    assert decide(split, "unanimous").correction is None
    assert decide(split, "majority").correction == 90
    assert decide({0: 90, 90: 90, 180: 0, 270: 0}, "majority").correction is None
    abstained = {0: 180, 90: 180, 180: 180, 270: None}
    assert decide(abstained, "unanimous").correction is None
    assert decide({0: None, 90: None, 180: None, 270: None}, "majority").correction is None
