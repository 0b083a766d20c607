"""The studio's runs: a queue served by one worker thread, and the finished runs kept.

One GPU renders one image at a time, so runs go through a single worker in the order they
came.  While a run renders, its progress (steps done of total) is visible; when it is done
its result stays in memory so scrubbing steps and clicking tokens never re-render.  Kept
runs are dropped least recently used first once there are more than ``max_runs`` or they
hold more than ``max_bytes``; queued and running runs are never dropped.

This module knows nothing of models: the worker function is given, so the queue's rules
are tested with plain functions.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

log = logging.getLogger("darkroom.studio")

R = TypeVar("R")
Progress = Callable[[int, int], None]


class State(StrEnum):
    """Where a run is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class QueueFull(Exception):
    """More runs are waiting than the studio takes."""


@dataclass(eq=False)
class Run(Generic[R]):
    """One requested render: ``spec`` as the caller resolved it, progress, and the result
    (``error`` says why when it failed)."""

    id: str
    spec: Any
    total: int
    state: State = State.QUEUED
    done: int = 0
    result: R | None = None
    error: str | None = None
    seconds: float | None = None
    size: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # per-run memo (encoded pictures)


class RunQueue(Generic[R]):
    """Runs ``work(spec, progress)`` for each submitted run, one at a time, in order."""

    def __init__(
        self,
        work: Callable[[Any, Progress], R],
        *,
        size_of: Callable[[R], int],
        max_waiting: int,
        max_runs: int,
        max_bytes: int,
    ) -> None:
        """Start the worker thread; ``size_of`` tells how many bytes a result holds."""
        self._work = work
        self._size_of = size_of
        self._max_waiting = max_waiting
        self._max_runs = max_runs
        self._max_bytes = max_bytes
        self._runs: OrderedDict[str, Run[R]] = OrderedDict()  # oldest use first
        self._waiting: deque[Run[R]] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="studio-worker", daemon=True)
        self._thread.start()

    def submit(self, spec: Any, total: int) -> Run[R]:
        """Queue a run of ``spec`` taking ``total`` steps; QueueFull when too many wait."""
        with self._lock:
            if len(self._waiting) >= self._max_waiting:
                raise QueueFull(f"{len(self._waiting)} runs are already waiting; try again soon")
            run: Run[R] = Run(id=f"r{next(self._ids)}", spec=spec, total=total)
            self._runs[run.id] = run
            self._waiting.append(run)
            self._lock.notify_all()
        log.info("run %s queued (%d waiting)", run.id, len(self._waiting))
        return run

    def get(self, run_id: str) -> Run[R] | None:
        """The run with ``run_id`` (now the most recently used), None when unknown or
        dropped."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                self._runs.move_to_end(run_id)
            return run

    def position(self, run: Run[R]) -> int:
        """How many runs will render before ``run`` (0 when it is next or not waiting)."""
        with self._lock:
            return next((i for i, waiting in enumerate(self._waiting) if waiting is run), 0)

    def runs(self) -> list[Run[R]]:
        """All known runs, most recently used first."""
        with self._lock:
            return list(reversed(self._runs.values()))

    def wait(self, run: Run[R], timeout: float) -> bool:
        """Block until ``run`` is done or failed (True) or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while run.state in (State.QUEUED, State.RUNNING):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self) -> None:
        """Stop taking runs; the worker finishes the one it renders and exits."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()

    # --- the worker ---

    def _serve(self) -> None:
        """Take runs in order until closed."""
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                run = self._waiting.popleft()
                run.state = State.RUNNING
            self._render(run)

    def _render(self, run: Run[R]) -> None:
        """Run one render; any failure is the run's, logged, and the worker goes on."""
        started = time.monotonic()

        def progress(done: int, total: int) -> None:
            run.done, run.total = done, total

        try:
            result = self._work(run.spec, progress)
        except Exception as exc:  # the per-run boundary: one bad run must not stop the studio
            log.warning("run %s failed: %s", run.id, exc, exc_info=not isinstance(exc, ValueError))
            self._finish(run, State.FAILED, None, f"{exc}" or type(exc).__name__, started)
        else:
            self._finish(run, State.DONE, result, None, started)

    def _finish(
        self, run: Run[R], state: State, result: R | None, error: str | None, started: float
    ) -> None:
        """Record the outcome, wake waiters and drop old runs beyond the limits."""
        size = self._size_of(result) if result is not None else 0
        with self._lock:
            run.result, run.error, run.size = result, error, size
            run.seconds = time.monotonic() - started
            run.state = state
            self._evict(keep=run)
            self._lock.notify_all()
        log.info("run %s %s in %.1f s", run.id, state.value, run.seconds)

    def _evict(self, keep: Run[R]) -> None:
        """Drop finished runs, least recently used first, while over a limit (lock held);
        ``keep``, the run just finished, stays even when it alone is over the budget."""
        finished = [
            r
            for r in self._runs.values()
            if r.state in (State.DONE, State.FAILED) and r is not keep
        ]
        kept = len(finished) + 1
        held = sum(r.size for r in finished) + keep.size
        for run in finished:  # least recently used first
            if kept <= self._max_runs and held <= self._max_bytes:
                break
            del self._runs[run.id]
            kept -= 1
            held -= run.size
            log.info("run %s dropped from memory (limits: %d runs)", run.id, self._max_runs)
