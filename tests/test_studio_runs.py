"""The studio's run queue with plain worker functions: order, one at a time, progress,
failures, the waiting limit and which finished runs are kept."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from daemon.studio.runs import QueueFull, RunQueue, State

WAIT_S = 10


class Gate:
    """A worker function that records its calls and renders only when released."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.running = 0
        self.most_at_once = 0
        self.release = threading.Event()
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, spec: Any, progress: Any) -> str:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.calls.append(spec)
        progress(1, 2)
        self.started.set()
        self.release.wait(WAIT_S)
        with self._lock:
            self.running -= 1
        if spec == "bad":
            raise ValueError("the prompt is bad")
        if spec == "broken":
            raise RuntimeError("out of memory")
        progress(2, 2)
        return f"image of {spec}"


def make_queue(gate: Gate, **limits: int) -> RunQueue[str]:
    settings = {"max_waiting": 8, "max_runs": 16, "max_bytes": 10**6, **limits}
    return RunQueue(gate, size_of=len, **settings)


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.release.set()


def test_runs_go_one_at_a_time_in_order(gate: Gate) -> None:
    queue = make_queue(gate)
    runs = [queue.submit(name, 2) for name in ("a", "b", "c")]
    assert gate.started.wait(WAIT_S)
    assert runs[0].state is State.RUNNING and (runs[0].done, runs[0].total) == (1, 2)
    assert [r.state for r in runs[1:]] == [State.QUEUED, State.QUEUED]
    assert [queue.position(r) for r in runs[1:]] == [0, 1]
    gate.release.set()
    assert all(queue.wait(run, WAIT_S) for run in runs)
    assert gate.calls == ["a", "b", "c"] and gate.most_at_once == 1
    assert [r.result for r in runs] == ["image of a", "image of b", "image of c"]
    assert all(r.done == r.total == 2 and r.seconds is not None for r in runs)
    queue.close()


def test_a_failed_run_says_why_and_the_next_one_renders(gate: Gate) -> None:
    gate.release.set()
    queue = make_queue(gate)
    bad, broken, good = (queue.submit(name, 2) for name in ("bad", "broken", "good"))
    assert all(queue.wait(run, WAIT_S) for run in (bad, broken, good))
    assert (bad.state, bad.error, bad.result) == (State.FAILED, "the prompt is bad", None)
    assert (broken.state, broken.error) == (State.FAILED, "out of memory")
    assert (good.state, good.result) == (State.DONE, "image of good")
    queue.close()


def test_too_many_waiting_runs_are_refused(gate: Gate) -> None:
    queue = make_queue(gate, max_waiting=1)
    queue.submit("a", 2)
    assert gate.started.wait(WAIT_S)  # a renders, so it no longer waits
    queue.submit("b", 2)
    with pytest.raises(QueueFull, match="1 runs are already waiting"):
        queue.submit("c", 2)
    gate.release.set()
    queue.close()


def test_finished_runs_are_kept_up_to_the_count_least_recently_used_dropped(gate: Gate) -> None:
    gate.release.set()
    queue = make_queue(gate, max_runs=2)
    first, second = queue.submit("a", 2), queue.submit("b", 2)
    assert queue.wait(second, WAIT_S)
    assert queue.get(first.id) is first  # now the most recently used
    third = queue.submit("c", 2)
    assert queue.wait(third, WAIT_S)
    assert queue.get(second.id) is None
    assert queue.get(first.id) is first and queue.get(third.id) is third
    queue.close()


def test_finished_runs_are_kept_within_the_byte_budget(gate: Gate) -> None:
    """Results here are strings sized by len: each "image of x" holds 10 bytes."""
    gate.release.set()
    queue = make_queue(gate, max_bytes=25)
    runs = [queue.submit(name, 2) for name in ("a", "b", "c")]
    assert all(queue.wait(run, WAIT_S) for run in runs)
    assert [queue.get(r.id) is not None for r in runs] == [False, True, True]
    queue.close()


def test_the_newest_run_is_kept_even_over_the_budget(gate: Gate) -> None:
    gate.release.set()
    queue = make_queue(gate, max_bytes=5)
    run = queue.submit("a", 2)
    assert queue.wait(run, WAIT_S)
    assert queue.get(run.id) is run
    queue.close()
