"""The daemon's metrics: what it measured itself, and what the state store says right now.

:class:`Metrics` owns a private ``CollectorRegistry`` (never prometheus_client's global one,
so tests and several daemons in one process never share series).  Latencies and errors are
recorded by the Immich transport and the vision pool through observer callbacks; the store
figures are read by :class:`StoreCollector` at scrape time with the same queries as
``darkroom status``, so the endpoint and the CLI can never disagree.  The health state the
service sets is kept here too, for ``/healthz``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.store import Store

log = logging.getLogger("darkroom.metrics")

# Immich calls are LAN HTTP: most take milliseconds, a preview download up to seconds, and
# the client gives up at ``immich.timeout_s`` (30 s by default).
HTTP_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# A vision-model call takes seconds on a consumer GPU, longer when the model is loading or
# Ollama queues the request; the client gives up at ``ollama.timeout_s`` (300 s).
MODEL_BUCKETS_S: tuple[float, ...] = (
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

ImmichErrorKind = Literal["unreachable", "timeout", "4xx", "5xx"]
IMMICH_ERROR_KINDS: tuple[ImmichErrorKind, ...] = ("unreachable", "timeout", "4xx", "5xx")
HTTP_CLIENT_ERROR = 400
HTTP_SERVER_ERROR = 500
HTTP_STATUS_END = 600

STARTING_REASON = "starting: no poll has finished yet"

STORE_UP_HELP = "1 when the state store could be read for this scrape, else 0."
ASSETS_HELP = "Assets darkroom knows, by state in Immich (known, trashed, deleted)."
STAGE_HELP = "Assets in each stage, by status (as darkroom status shows them)."
QUEUE_HELP = "Assets workable now in each stage (pending, not trashed, deleted or unready)."
REVIEWS_HELP = "Decisions waiting for a person in the review queue."


@dataclass(frozen=True)
class HealthState:
    """Whether the daemon is working, why not, and since when (unix time)."""

    ok: bool
    reason: str
    since: float


def immich_error_kind(status: int | None, kind: ImmichErrorKind | None = None) -> str | None:
    """The error kind of one Immich exchange, or None when it succeeded.

    ``kind`` is what the caller knows and the status cannot say (a transport failure has no
    status: it is ``"unreachable"`` unless the caller says ``"timeout"``); otherwise the
    status decides (4xx, 5xx; anything below 400 is not an error).
    """
    if kind is not None:
        return kind
    if status is None:
        return "unreachable"
    if HTTP_CLIENT_ERROR <= status < HTTP_SERVER_ERROR:
        return "4xx"
    if HTTP_SERVER_ERROR <= status < HTTP_STATUS_END:
        return "5xx"
    return None


def queue_depths(store: Store) -> dict[str, int]:
    """Per stage, how many assets are workable now: what ``Store.pending`` would return.

    Every stage the store knows is listed, with 0 when nothing is pending there.
    """
    return {stage: store.pending_count(stage) for stage in sorted(store.stage_counts())}


class StoreCollector(Collector):
    """Reads the store at each scrape: a handful of COUNT queries, nothing cached."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (without reading the store at registration)."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """The store's figures now; if the store cannot be read, only ``darkroom_store_up 0``."""
        try:
            families = list(self._families(self._store))
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the store is closed
            log.warning("metrics: cannot read the state store: %s", exc)
            return [GaugeMetricFamily("darkroom_store_up", STORE_UP_HELP, value=0)]
        return [*families, GaugeMetricFamily("darkroom_store_up", STORE_UP_HELP, value=1)]

    @staticmethod
    def _families(store: Store | None = None) -> Iterator[GaugeMetricFamily]:
        """Build the families, filled from ``store`` (empty for ``describe``)."""
        assets = GaugeMetricFamily("darkroom_assets", ASSETS_HELP, labels=["state"])
        stages = GaugeMetricFamily("darkroom_stage_assets", STAGE_HELP, labels=["stage", "status"])
        queue = GaugeMetricFamily("darkroom_queue_depth", QUEUE_HELP, labels=["stage"])
        reviews = GaugeMetricFamily("darkroom_open_reviews", REVIEWS_HELP)
        if store is not None:
            for state, count in store.asset_counts().items():
                assets.add_metric([state], count)
            for stage, counts in store.stage_counts().items():
                for status, count in counts.items():
                    stages.add_metric([stage, status], count)
            for stage, depth in queue_depths(store).items():
                queue.add_metric([stage], depth)
            reviews.add_metric([], store.open_reviews())
        yield from (assets, stages, queue, reviews)


class Metrics:
    """Everything the health endpoint exposes, in a registry of its own.

    The ``observe_*`` methods match the observer callbacks of the Immich transport
    (``(method, route, status, seconds)``) and of the vision pool
    (``(host, outcome, seconds)``), so they can be passed as they are.  They never raise
    for a value they do not expect: a metric must not break the work it measures.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self._state = HealthState(ok=True, reason=STARTING_REASON, since=time.time())
        self._last_poll: float | None = None
        self._lock = threading.Lock()
        self._build_instruments()
        self.registry.register(StoreCollector(store))

    def _build_instruments(self) -> None:
        """Create the latency, error, poll and health series in this registry."""
        registry = self.registry
        self._immich_seconds = Histogram(
            "darkroom_immich_request_duration_seconds",
            "Immich HTTP request latency, by method and route template.",
            ["method", "route"], buckets=HTTP_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self._immich_errors = Counter(
            "darkroom_immich_errors",
            "Failed Immich requests, by kind (unreachable, timeout, 4xx, 5xx).",
            ["kind"], registry=registry,
        )  # fmt: skip
        for kind in IMMICH_ERROR_KINDS:  # present at 0 from the start, so rate() works
            self._immich_errors.labels(kind)
        self._ollama_seconds = Histogram(
            "darkroom_ollama_call_duration_seconds",
            "Vision-model call latency, by Ollama host.",
            ["host"], buckets=MODEL_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self._ollama_calls = Counter(
            "darkroom_ollama_calls",
            "Vision-model calls, by Ollama host and outcome (ok, rejected, unavailable, missing).",
            ["host", "outcome"], registry=registry,
        )  # fmt: skip
        self._last_poll_gauge = Gauge(
            "darkroom_last_poll_success_timestamp_seconds",
            "Unix time of the last successful discovery poll of Immich (0: none yet).",
            registry=registry,
        )
        self._healthy = Gauge(
            "darkroom_healthy", "1 when the daemon is working, 0 when not.", registry=registry
        )
        self._healthy.set(1)

    # -- what the daemon measures ---------------------------------------------------------

    def observe_immich(
        self,
        method: str,
        route: str,
        status: int | None,
        seconds: float,
        kind: ImmichErrorKind | None = None,
    ) -> None:
        """Record one Immich exchange: its latency, and its error if it failed.

        ``route`` is a template (``/assets/{id}``), never a path with ids in it.  ``status``
        is None for a transport failure; pass ``kind="timeout"`` when it was a timeout.
        """
        self._immich_seconds.labels(method.upper(), route).observe(seconds)
        error = immich_error_kind(status, kind)
        if error is not None:
            self._immich_errors.labels(error).inc()

    def observe_ollama(self, host: str, outcome: str, seconds: float) -> None:
        """Record one vision-model call: its latency and how it ended."""
        self._ollama_seconds.labels(host).observe(seconds)
        self._ollama_calls.labels(host, outcome).inc()

    def poll_succeeded(self, at: float) -> None:
        """A discovery poll finished at unix time ``at``."""
        with self._lock:
            self._last_poll = at
        self._last_poll_gauge.set(at)

    # -- health ---------------------------------------------------------------------------

    def set_state(self, ok: bool, reason: str) -> None:
        """Set the health ``/healthz`` reports: ``(True, "ok")`` or ``(False, why)``."""
        with self._lock:
            if (ok, reason) != (self._state.ok, self._state.reason):
                self._state = HealthState(ok=ok, reason=reason, since=time.time())
        self._healthy.set(1 if ok else 0)

    @property
    def state(self) -> HealthState:
        """The current health state."""
        with self._lock:
            return self._state

    @property
    def last_poll(self) -> float | None:
        """Unix time of the last successful discovery poll, None before the first."""
        with self._lock:
            return self._last_poll

    def queue_depth(self) -> dict[str, int]:
        """Per stage, how many assets are workable now (read from the store)."""
        return queue_depths(self.store)
