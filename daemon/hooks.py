"""Stages 4 and 5, encode and train: started by the daemon, each in a process of its own.

A run is due when the local time is inside the training window (if one is set) and at
least ``min_new_samples`` photos were curated since the last run began.  A run is the
encode command, then (if it succeeded) the train command; each is a separate process,
so an out-of-memory kill or a GPU driver crash ends that process, never the daemon.
Only one run exists at a time.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time

from daemon.settings import HookSettings
from daemon.store import Store, utc_now

log = logging.getLogger("darkroom.hooks")

LAST_RUN_KEY = "last_training_run"
EPOCH = "1970-01-01T00:00:00+00:00"
TERMINATE_WAIT_S = 10.0


def parse_window(window: str) -> tuple[time, time] | None:
    """``"01:00-06:00"`` as two times; None for "any time"."""
    if not window:
        return None
    start, end = window.split("-")
    return time.fromisoformat(start), time.fromisoformat(end)


def in_window(window: str, now: time) -> bool:
    """Whether ``now`` falls in the window; a window may wrap midnight (22:00-05:00)."""
    bounds = parse_window(window)
    if bounds is None:
        return True
    start, end = bounds
    return start <= now < end if start <= end else (now >= start or now < end)


@dataclass
class Hooks:
    """Decides when a run is due, and runs its commands one after the other."""

    settings: HookSettings
    store: Store
    _queue: list[tuple[str, Sequence[str]]] = field(default_factory=list)
    _current: tuple[str, subprocess.Popen[bytes]] | None = None

    def commands(self) -> list[tuple[str, Sequence[str]]]:
        """The configured steps of a run, in order."""
        steps = [("encode", self.settings.encode_command), ("train", self.settings.train_command)]
        return [(name, command) for name, command in steps if command]

    def due(self, now: datetime) -> bool:
        """Whether a new run should begin now."""
        if self.running or not self.commands():
            return False
        if not in_window(self.settings.window, now.time()):
            return False
        since = self.store.get_value(LAST_RUN_KEY) or EPOCH
        return self.store.curated_since(since) >= self.settings.min_new_samples

    @property
    def running(self) -> bool:
        """Whether a step is running or waiting to run."""
        return self._current is not None or bool(self._queue)

    def check(self, now: datetime) -> None:
        """Advance the run (reap a finished step, start the next) or begin one if due."""
        if self._current is not None and not self._reap():
            return
        if not self._queue and self.due(now):
            log.info("starting a training run: %s", ", ".join(n for n, _ in self.commands()))
            self.store.set_value(LAST_RUN_KEY, utc_now())
            self._queue = self.commands()
        if self._queue:
            name, command = self._queue.pop(0)
            log.info("%s: running %s", name, " ".join(command))
            self._current = (name, subprocess.Popen(list(command)))

    def _reap(self) -> bool:
        """True when the current step has ended (and what follows may start)."""
        assert self._current is not None
        name, process = self._current
        code = process.poll()
        if code is None:
            return False
        self._current = None
        if code == 0:
            log.info("%s finished", name)
        else:
            log.error("%s failed with exit code %s; the run stops here", name, code)
            self._queue.clear()
        return True

    def stop(self) -> None:
        """Ask a running step to stop (it resumes from its checkpoint next time)."""
        self._queue.clear()
        if self._current is None:
            return
        name, process = self._current
        process.terminate()
        try:
            process.wait(TERMINATE_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", name, TERMINATE_WAIT_S)
            process.kill()
            process.wait()
        self._current = None
