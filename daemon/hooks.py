"""Stages 4 and 5, encode and train: started by the daemon, each in a process of its own.

A run is due when the local time is inside the training window (if one is set) and either
at least ``min_new_samples`` photos were curated since the last run began, or the last
training was cut short (window end, daemon stop) and continues.  A run is the encode command,
then (if it succeeded and the window is still open) the train command, then the samples
command (also after a train stopped at the window's end: its last checkpoint gets its
renders, evaluation and uploads); each is a separate process, so an out-of-memory kill
or a GPU driver crash ends that process, never the daemon.
Only one run exists at a time.

Every check (``check_interval_s``) looks at the running step and returns at once, so the
scheduler thread is never held for minutes:

* at the window's end the trainer is asked to stop (SIGTERM, or ``train_stop_command`` when
  it runs in a systemd unit of its own); it writes a checkpoint, exits, and is reaped by a
  later check, or killed once ``train_stop_timeout_s`` has passed;
* a trainer that crashed (non-zero exit) is started again after a backoff doubling from
  ``restart_backoff_s`` up to ``restart_backoff_max_s``, at most ``max_restarts`` times a run
  and only inside the window; exit 78 means its settings cannot work, and is never retried;
* every start and end is a row of the store's ``training_runs``, and the checkpoints'
  manifests are copied into its ``checkpoints`` table, for ``darkroom status``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as clock_time
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon.settings import HookSettings
from daemon.store import CheckpointRecord, Store, utc_now
from trainer.progress_file import (
    CHECKPOINTS_DIR,
    EXIT_UNWORKABLE,
    MANIFEST_NAME,
    STEP_NAME,
    read_progress,
)

log = logging.getLogger("darkroom.hooks")

LAST_RUN_KEY = "last_training_run"
RESUME_KEY = "training_resume_owed"  # non-empty: the last training was cut short
EPOCH = "1970-01-01T00:00:00+00:00"
TERMINATE_WAIT_S = 10.0  # on daemon shutdown: SIGTERM, then SIGKILL after this long
KILL_WAIT_S = 5.0  # after SIGKILL; a process stuck in the kernel is reaped at a later check
ENCODE, TRAIN, SAMPLES = "encode", "train", "samples"


class Outcome(StrEnum):
    """How a run ended, as ``training_runs.outcome`` stores it."""

    FINISHED = "finished"  # exited 0 by itself
    STOPPED = "stopped"  # asked to stop at the window's end, and did
    KILLED = "killed"  # still running train_stop_timeout_s after being asked to stop
    CRASHED = "crashed"  # any other non-zero exit, or the command could not start
    UNWORKABLE = "unworkable"  # exit 78: never retried
    SHUTDOWN = "shutdown"  # the daemon stopped while it ran
    ABANDONED = "abandoned"  # the daemon died while it ran (noticed at its next start)


def parse_window(window: str) -> tuple[clock_time, clock_time] | None:
    """``"01:00-06:00"`` as two times; None for "any time"."""
    if not window:
        return None
    start, end = window.split("-")
    return clock_time.fromisoformat(start), clock_time.fromisoformat(end)


def in_window(window: str, now: clock_time) -> bool:
    """Whether ``now`` falls in the window; a window may wrap midnight (22:00-05:00)."""
    bounds = parse_window(window)
    if bounds is None:
        return True
    start, end = bounds
    return start <= now < end if start <= end else (now >= start or now < end)


def scan_checkpoints(checkpoint_dir: Path) -> list[CheckpointRecord]:
    """The complete checkpoints under ``checkpoint_dir``, from their manifests.

    Unfinished (``.tmp-*``) folders do not match the name; a folder whose manifest is
    missing, unreadable or for another step is skipped (the trainer skips it too).
    """
    try:
        folders = sorted((checkpoint_dir / CHECKPOINTS_DIR).iterdir())
    except OSError:  # no checkpoint yet
        return []
    records = []
    for folder in folders:
        match = STEP_NAME.fullmatch(folder.name)
        manifest = _read_json(folder / MANIFEST_NAME) if match else None
        if match is None or manifest is None or manifest.get("step") != int(match[1]):
            continue
        generation, created = manifest.get("cache_generation"), manifest.get("created_at")
        records.append(
            CheckpointRecord(
                step=int(match[1]),
                path=str(folder),
                milestone=manifest.get("milestone") is True,
                cache_generation=generation if isinstance(generation, int) else None,
                created_at=created if isinstance(created, str) else None,
            )
        )
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class _Running:
    """A step's process, its ``training_runs`` row, and whether it was asked to stop."""

    name: str
    process: subprocess.Popen[bytes]
    run_id: int
    started_at: datetime  # tells this process's progress.json from an older one
    stop_asked_at: float | None = None  # the monotonic clock when it was asked to stop
    killed: bool = False


@dataclass
class Hooks:
    """Decides when a run is due, runs its steps one after the other, and watches them.

    ``checkpoint_dir`` (``paths.checkpoint_dir``) is where the trainer writes progress.json
    and its checkpoints; None records none.  ``clock`` measures the stop timeout and the
    restart backoff (tests pass their own); ``check`` takes the local time for the window.
    """

    settings: HookSettings
    store: Store
    checkpoint_dir: Path | None = None
    clock: Callable[[], float] = time.monotonic
    _queue: list[tuple[str, Sequence[str]]] = field(default_factory=list)
    _current: _Running | None = None
    _stopper: subprocess.Popen[bytes] | None = None
    _restart_at: float | None = None
    _restarts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        abandoned = self.store.end_unfinished_training_runs(Outcome.ABANDONED)
        if abandoned:
            log.warning("%d run(s) were still going when the daemon last stopped; training "
                        "continues next window", abandoned)  # fmt: skip
            self._owe_resume()

    def commands(self) -> list[tuple[str, Sequence[str]]]:
        """The configured steps of a run, in order."""
        steps = [
            (ENCODE, self.settings.encode_command),
            (TRAIN, self.settings.train_command),
            (SAMPLES, self.settings.samples_command),
        ]
        return [(name, command) for name, command in steps if command]

    def due(self, now: datetime) -> bool:
        """Whether a new run should begin now."""
        if self.running or not self.commands():
            return False
        if not in_window(self.settings.window, now.time()):
            return False
        if self.settings.train_command and self.store.get_value(RESUME_KEY):
            return True
        since = self.store.get_value(LAST_RUN_KEY) or EPOCH
        return self.store.curated_since(since) >= self.settings.min_new_samples

    @property
    def running(self) -> bool:
        """Whether a step is running, waiting to run, or waiting to be restarted."""
        return self._current is not None or bool(self._queue) or self._restart_at is not None

    def check(self, now: datetime) -> None:
        """Advance the run (watch or reap a step, restart, start the next) or begin one."""
        with self._lock:
            self._reap_stopper()
            if self._current is not None and not self._watch(now):
                return
            if self._restart_at is not None:
                if not self._restart_due(now):
                    return
            elif not self._queue and self.due(now):
                log.info("starting a training run: %s", ", ".join(n for n, _ in self.commands()))
                self.store.set_value(LAST_RUN_KEY, utc_now())
                self._queue, self._restarts = self.commands(), 0
            if self._queue:
                self._start_next(now)

    def _start_next(self, now: datetime) -> None:
        name, command = self._queue.pop(0)
        if name == TRAIN and not in_window(self.settings.window, now.time()):
            log.info("the window closed before training could start; it starts next window")
            self._owe_resume()
            return
        log.info("%s: running %s", name, " ".join(command))
        run_id = self.store.start_training_run(name, command)
        started_at = datetime.now(UTC)
        try:
            process = subprocess.Popen(list(command))
        except OSError as exc:
            log.error("%s: cannot start %s: %s; the run stops here", name, command[0], exc)
            self.store.end_training_run(run_id, Outcome.CRASHED, None)
            self._queue.clear()
            return
        if name == TRAIN:
            self.store.set_value(RESUME_KEY, "")
        self._current = _Running(name, process, run_id, started_at)

    def _watch(self, now: datetime) -> bool:
        """Look at the running step; True when it has ended (and was recorded)."""
        step = self._current
        assert step is not None
        if step.name == TRAIN:
            self._record_checkpoints()
        code = step.process.poll()
        if code is None and step.name == TRAIN:
            code = self._stop_outside_window(step, now)
        if code is None:
            return False
        self._current = None
        self._ended(step, code)
        return True

    def _stop_outside_window(self, step: _Running, now: datetime) -> int | None:
        """Ask the trainer to stop once the window has ended; kill it when it takes too long."""
        timeout = self.settings.train_stop_timeout_s
        if step.stop_asked_at is None:
            if not in_window(self.settings.window, now.time()):
                self._ask_to_stop(step)
            return None
        if self.clock() - step.stop_asked_at < timeout:
            return None
        log.warning("%s still running %.0fs after being asked to stop: killing it (it resumes "
                    "from its last checkpoint)", step.name, timeout)  # fmt: skip
        step.killed = True
        step.process.kill()
        try:
            return step.process.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def _ask_to_stop(self, step: _Running) -> None:
        command = self.settings.train_stop_command
        how = " ".join(command) if command else f"SIGTERM to process {step.process.pid}"
        log.info("the window %s has ended: stopping %s (%s); it writes a checkpoint first, "
                 "and is killed if still running in %.0fs", self.settings.window, step.name,
                 how, self.settings.train_stop_timeout_s)  # fmt: skip
        step.stop_asked_at = self.clock()
        if not command:
            step.process.terminate()
            return
        try:
            self._stopper = subprocess.Popen(list(command))
        except OSError as exc:
            log.error("cannot run %s (%s); sending SIGTERM instead", command[0], exc)
            step.process.terminate()

    def _reap_stopper(self) -> None:
        """Collect the exit of ``train_stop_command`` (no zombie is left behind)."""
        if self._stopper is None or (code := self._stopper.poll()) is None:
            return
        if code != 0:
            log.error("%s exited with code %d", " ".join(self.settings.train_stop_command), code)
        self._stopper = None

    def _ended(self, step: _Running, code: int) -> None:
        """Record how a step ended, then decide what follows: next step, restart, or nothing."""
        outcome = self._outcome(step, code)
        progress = self._record_end(step, outcome, code)
        if outcome is Outcome.FINISHED:
            log.info("%s finished", step.name)
            return
        samples = [(name, command) for name, command in self._queue if name == SAMPLES]
        self._queue.clear()
        if outcome in (Outcome.STOPPED, Outcome.KILLED):
            log.info("%s stopped at step %s (exit code %d); it continues next window",
                     step.name, progress.get("step"), code)  # fmt: skip
            self._owe_resume()
            if step.name == TRAIN:
                self._queue = samples  # the checkpoints written before the stop get samples
        elif outcome is Outcome.UNWORKABLE:
            reason = progress.get("reason") or progress.get("error") or "no reason in progress.json"
            log.error("%s exited with code 78, its settings cannot work here: %s; not retried",
                      step.name, reason)  # fmt: skip
        elif step.name == TRAIN:
            self._schedule_restart(code)
        else:
            log.error("%s failed with exit code %s; the run stops here", step.name, code)

    def _record_end(self, step: _Running, outcome: Outcome, code: int) -> dict[str, Any]:
        """Write the run's end (and the checkpoints found) to the store; return its progress."""
        progress = (self._progress(step) if step.name == TRAIN else None) or {}
        first, last = (progress.get(key) for key in ("first_step", "step"))
        self.store.end_training_run(
            step.run_id, outcome, code,
            first if isinstance(first, int) else None, last if isinstance(last, int) else None,
        )  # fmt: skip
        if step.name == TRAIN:
            self._record_checkpoints()
        return progress

    @staticmethod
    def _outcome(step: _Running, code: int) -> Outcome:
        if step.killed:
            return Outcome.KILLED
        if step.stop_asked_at is not None:
            return Outcome.STOPPED
        if code == 0:
            return Outcome.FINISHED
        return Outcome.UNWORKABLE if code == EXIT_UNWORKABLE else Outcome.CRASHED

    def _schedule_restart(self, code: int) -> None:
        if self._restarts >= self.settings.max_restarts:
            log.error("train crashed with exit code %d, and has been restarted %d times; the "
                      "run stops here", code, self._restarts)  # fmt: skip
            return
        settings = self.settings
        delay = min(settings.restart_backoff_s * 2**self._restarts, settings.restart_backoff_max_s)
        log.error("train crashed with exit code %d; restarting it from its last checkpoint in "
                  "%.0fs (restart %d of %d)", code, delay, self._restarts + 1,
                  settings.max_restarts)  # fmt: skip
        self._restart_at = self.clock() + delay

    def _restart_due(self, now: datetime) -> bool:
        """After a crash's backoff: queue the train step again, if the window is still open."""
        assert self._restart_at is not None
        if not in_window(self.settings.window, now.time()):
            log.info("the window closed before train could be restarted; it continues next "
                     "window")  # fmt: skip
            self._restart_at = None
            self._owe_resume()
            return False
        if self.clock() < self._restart_at:
            return False
        command = self.settings.train_command
        assert command, "only a train step is restarted"
        self._restart_at = None
        self._restarts += 1
        self._queue = [(TRAIN, command)]
        return True

    def _owe_resume(self) -> None:
        self.store.set_value(RESUME_KEY, utc_now())

    def _progress(self, step: _Running) -> dict[str, Any] | None:
        """The trainer's progress.json, if this process wrote it (else None)."""
        if self.checkpoint_dir is None:
            return None
        progress = read_progress(self.checkpoint_dir)
        if progress is None:
            return None
        try:
            started = datetime.fromisoformat(str(progress.get("started_at")))
        except ValueError:
            return None
        if started.tzinfo is None or started < step.started_at.replace(microsecond=0):
            return None
        return progress

    def _record_checkpoints(self) -> None:
        if self.checkpoint_dir is not None:
            found = scan_checkpoints(self.checkpoint_dir)
            if found:
                self.store.upsert_checkpoints(found)

    def stop(self) -> None:
        """The daemon stops: end a running step (it resumes from its checkpoint next time)."""
        with self._lock:
            self._queue.clear()
            self._restart_at = None
            step, self._current = self._current, None
            if step is None:
                return
            step.process.terminate()
            try:
                code = step.process.wait(TERMINATE_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", step.name, TERMINATE_WAIT_S)
                step.process.kill()
                code = step.process.wait()
            self._record_end(step, Outcome.SHUTDOWN, code)
            if step.name == TRAIN:
                self._owe_resume()
