"""Progress of long work: a bar in a terminal, a log line now and then under systemd.

``darkroom encode`` may run for hours (T5 on a CPU clears about one caption a second), so
an owner watching a terminal sees a bar with a rate and an ETA, and the journal of a
service gets one line per interval instead of one per photo.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("darkroom.progress")

LOG_INTERVAL_S = 60.0


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """``"12m 05s"``-style time left at the rate so far; ``"?"`` before any work is done."""
    if done <= 0 or elapsed_s <= 0:
        return "?"
    left = max(total - done, 0) * elapsed_s / done
    hours, rest = divmod(int(left), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


class Progress:
    """Counts units of work done out of ``total``; shows them as a bar or as log lines.

    ``bar=None`` picks a bar when ``stream`` is a terminal.
    """

    def __init__(
        self,
        total: int,
        what: str,
        *,
        bar: bool | None = None,
        stream: TextIO | None = None,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.total, self.what, self.done = total, what, 0
        self._stream = stream or sys.stderr
        use_bar = self._stream.isatty() if bar is None else bar
        self._bar = tqdm(total=total, unit=what, file=self._stream) if use_bar else None
        self._interval_s = interval_s
        self._started = self._last_log = time.monotonic()

    def update(self, count: int = 1) -> None:
        """``count`` more units are done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last_log >= self._interval_s:
            self._last_log = now
            log.info("%s", self.summary())

    def summary(self) -> str:
        """``"120/400 photos, 2.1/s, ETA 2m 13s"``."""
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = eta_text(self.done, self.total, elapsed)
        return f"{self.done}/{self.total} {self.what}, {rate:.1f}/s, ETA {eta}"

    def close(self) -> None:
        """Finish the bar (or log the last line)."""
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            log.info("%s", self.summary())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
