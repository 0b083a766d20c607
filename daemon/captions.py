"""Turning the model's description into a caption fit for training and for Immich.

The model's prose is cleaned (markdown, control characters, a leading "This image
shows"), bounded in length at a sentence end, and rejected outright when it is empty or a
refusal: a refusal must never become a training caption.
"""

from __future__ import annotations

import re
import unicodedata

from daemon.vision import AnswerRejectedError

MIN_CAPTION_CHARS = 20
# Openers that describe the medium rather than the scene.
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay)[,!.]?\s*)?(?:here(?:'s| is) (?:a|the) "
    r"(?:detailed |exhaustive )?description(?: of (?:the|this) (?:image|photo|photograph))?"
    r"\s*[:.]\s*)?(?:(?:this|the) (?:image|photo|photograph|picture|scene)\s+"
    r"(?:shows|depicts|features|captures|presents|portrays|is of)\s+|"
    r"in (?:this|the) (?:image|photo|photograph|picture),?\s+)",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"^\s*(?:i(?:'m| am)? (?:sorry|unable|not able)|i can(?:no|')t|as an ai|"
    r"i (?:do not|don't) (?:see|have)|unable to (?:view|see|describe)|"
    r"there is no image|no image (?:was|is) (?:provided|attached))",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"(\*\*|__|`|^#+\s*|^\s*[-*•]\s+)", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean_caption(raw: str, *, max_chars: int, keep_preamble: bool) -> str:
    """A single-paragraph caption, or AnswerRejectedError saying why there is none."""
    text = unicodedata.normalize("NFC", raw)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = _MARKDOWN.sub("", text)
    text = " ".join(text.split())
    if _REFUSAL.match(text):
        raise AnswerRejectedError(f"the model declined to describe the photo: {text[:80]!r}")
    if not keep_preamble:
        text = _PREAMBLE.sub("", text, count=1)
        text = text[:1].upper() + text[1:]
    text = _bound(text, max_chars)
    if len(text) < MIN_CAPTION_CHARS:
        raise AnswerRejectedError(f"description too short to be useful: {text!r}")
    return text


def _bound(text: str, max_chars: int) -> str:
    """Cut at the last sentence end within ``max_chars`` (else at a word boundary)."""
    if len(text) <= max_chars:
        return text
    window = text[:max_chars]
    ends = [match.end() for match in _SENTENCE_END.finditer(window)]
    if ends:
        return window[: ends[-1]]
    return window.rsplit(" ", 1)[0].rstrip(",;:") + "."
