"""The sampling defaults of the seed article, importable without torch.

``darkroom generate`` and the validation renders start from these; the daemon's settings
(``[samples]``) read them here so the core never imports the sampling code to learn them.
"""

from __future__ import annotations

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.5
DEFAULT_SEED = 42
DEFAULT_SIZE = 1024
DEFAULT_NEGATIVE = (
    "low quality, blurry, oversaturated, deformed hands, extra fingers, text, watermark, "
    "harsh flash, plastic skin, oversharpened"
)

BASE_LABEL = "base"  # the untouched base model, as people see it named


def step_label(step: int) -> str:
    """How a checkpoint is named to people: ``"base"`` (step 0) or ``"step 500"``."""
    return BASE_LABEL if step == 0 else f"step {step}"
