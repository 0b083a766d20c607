"""The files a training run leaves for others to read, and how they are written.

``<output_dir>/progress.json`` is replaced atomically at every logging interval and at each
checkpoint; ``<output_dir>/train_log.jsonl`` gains one line per interval.  Torch-free, so
``darkroom status`` reads them on a machine without the training extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"
LOG_FILE = "train_log.jsonl"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` with ``payload`` so a reader sees the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_progress(output_dir: Path) -> dict[str, Any] | None:
    """The last progress record of the run writing to ``output_dir``, if any."""
    try:
        return json.loads((output_dir / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
