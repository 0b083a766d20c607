"""A stand-in vision model for the Ollama stand-in: it really looks at the pixels.

It recognises the scikit-image sample photos at any quarter turn by comparing a tiny
grey thumbnail with each reference, so its orientation answers are right for the photo
it was actually shown, and its descriptions name what is in it.  Tests can make it
confused about a photo (it then always says "upright") or have it answer a script.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from daemon.orientation import ANGLES, ANSWER_KEY
from daemon.scoring import FACTORS
from tests.immich_library import SAMPLE_PHOTOS, make_jpeg
from tests.ollama_server import Answer, ChatRequest

THUMB = 24
FULL_TURN = 360
DESCRIPTIONS = {
    "astronaut": "an astronaut in a white suit posing in front of an American flag.",
    "chelsea": "a ginger tabby cat looking to the side, soft window light on its fur.",
    "coffee": "a cup of coffee on a saucer with a spoon, seen from above on a red table.",
    "rocket": "a rocket on its launch pad under a pale sky, lit by low sun.",
    "stereo_motorcycle": "a red motorcycle parked in a workshop with tools on the wall.",
}
DEFAULT_SCORES = dict.fromkeys(FACTORS, 7)


def _thumb(image: Image.Image) -> np.ndarray:
    grey = image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.float32)


@dataclass
class Critic:
    """Answers describe/score/orient prompts about the sample photos it recognises."""

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    confused: set[str] = field(default_factory=set)
    preamble: str = "This image shows "
    calls: int = 0
    _references: dict[tuple[str, int], tuple[np.ndarray, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SAMPLE_PHOTOS:
            upright = Image.open(io.BytesIO(make_jpeg(name)))
            for turn in ANGLES:
                view = upright.rotate(-turn, expand=True)
                self._references[(name, turn)] = (_thumb(view), view.width / view.height)

    def identify(self, image: Image.Image) -> tuple[str, int]:
        """Which sample this is, and how far clockwise it is turned from upright."""
        seen, aspect = _thumb(image), image.width / image.height
        best = min(
            self._references.items(),
            key=lambda item: (
                float(np.mean((item[1][0] - seen) ** 2))
                + (0.0 if abs(item[1][1] - aspect) < 0.05 else 1e6)
            ),
        )
        return best[0]

    def __call__(self, request: ChatRequest) -> Answer | str:
        self.calls += 1
        name, turned = self.identify(request.image(0))
        prompt = request.prompt
        if ANSWER_KEY in prompt:
            correction = 0 if name in self.confused else (FULL_TURN - turned) % FULL_TURN
            return Answer.json({ANSWER_KEY: correction})
        if "Rate this photograph" in prompt:
            return Answer.json(self.scores.get(name, DEFAULT_SCORES))
        return self.preamble + DESCRIPTIONS[name]
