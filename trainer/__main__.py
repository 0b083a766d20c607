"""``python -m trainer``: train from a cache folder without darkroom's settings."""

from __future__ import annotations

import sys

from trainer.cli import main

sys.exit(main())
