"""What darkroom asks the vision model.  Change a prompt: bump ``PROMPT_VERSION``.

Results record the version they were made with, so ``darkroom recurate
--since-version`` can redo exactly the ones an older prompt produced.
"""

from __future__ import annotations

from daemon.scoring import FACTORS, SCORE_MAX, SCORE_MIN

PROMPT_VERSION = 1

DESCRIBE = (
    "Describe this photograph exhaustively in plain prose, as one paragraph: the subject, "
    "the setting, the light (direction, quality, time of day), the colours, the "
    "composition and framing, the lens feel (depth of field, perspective), textures and "
    "mood. Describe only what is visible. Do not start with phrases like 'This image "
    "shows'; do not use lists, headings or markdown."
)

SCORE = (
    "Rate this photograph as a demanding photo editor would. Give each of these factors an "
    f"integer from {SCORE_MIN} (very poor) to {SCORE_MAX} (outstanding): "
    + ", ".join(FACTORS)
    + ". Answer with a JSON object holding exactly these keys and integer values."
)

ORIENT = (
    "Look at this photograph. By how many degrees must it be rotated clockwise so that it "
    "is upright, the way the photographer saw the scene (sky up, people standing, text "
    "readable)? Answer with a JSON object whose key 'rotate_clockwise' is 0, 90, 180 or 270."
)
