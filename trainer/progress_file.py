"""The files a training run leaves for others to read, how they are written and named.

``<output_dir>/progress.json`` is replaced atomically at every logging interval and at each
checkpoint; ``<output_dir>/train_log.jsonl`` gains one line per interval.  Torch-free, so
``darkroom status`` reads them on a machine without the training extra.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"
LOG_FILE = "train_log.jsonl"
# Where checkpoints live in the output folder, and how the daemon tells them apart.
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
STEP_DIGITS = 8
STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d{{{STEP_DIGITS},}})")


def step_folder(step: int) -> str:
    """The folder name of a step's checkpoint (and samples), zero-padded so names sort by step."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


MANIFEST_NAME = "manifest.json"
# The trainer's exit code when its settings cannot work here (sysexits EX_CONFIG): no retry
# helps, so the daemon does not restart it.
EXIT_UNWORKABLE = 78


def replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, then rename it to ``path``.

    Readers see the old file or the new one, never half of one; the temporary file is gone
    afterwards even when ``write`` fails.  ``write`` must name the format itself (the
    temporary name ends in ``.tmp``).  Returns ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: Path, payload: object) -> None:
    """Replace ``path`` with ``payload`` so a reader sees the old or the new file, whole."""
    text = json.dumps(payload, indent=2) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_progress(output_dir: Path) -> dict[str, Any] | None:
    """The last progress record of the run writing to ``output_dir``, if any."""
    try:
        return json.loads((output_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
