"""``darkroom run``: the long-running service.

The stages run in this order for every asset:

1. discover — poll Immich for new and changed photos (``daemon/discover.py``),
2. curate — describe, score and orient with the vision model (``daemon/curate.py``),
3. write back — descriptions, stars, tags, rotations into Immich (``daemon/writeback.py``),
4. encode — latents and text embeddings into the training cache,
5. train — resume the fine-tune in its own process.

Until a stage exists, the service only opens its state and waits for a stop signal.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from daemon.settings import Settings
from daemon.store import Store

log = logging.getLogger("darkroom.service")


class Service:
    """Owns the store for the life of the process and stops on SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        """Run until asked to stop; return the process exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        with Store(self.settings.paths.database) as store:
            log.info(
                "darkroom started: state %s (schema %d), Immich %s",
                store.path,
                store.schema_version,
                self.settings.immich.url,
            )
            self.stopping.wait()
        log.info("darkroom stopped")
        return 0
