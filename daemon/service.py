"""``darkroom run``: the long-running service, and the order of its stages.

Every photo goes through these stages, in this order (one module each):

1. discover  — ``daemon/discover.py``: poll Immich for new, changed and deleted photos;
2. curate    — ``daemon/curate.py``: describe, score and orient with the vision model;
3. writeback — ``daemon/writeback.py``: descriptions, stars, tags, rotations into Immich;
4. encode    — ``daemon/hooks.py``: latents and text embeddings into the training cache;
5. train     — ``daemon/hooks.py``: resume the fine-tune, in a process of its own.

APScheduler runs each as a job, one instance of a kind at a time (a slow run is never
stacked with another).  When Immich or Ollama is down the jobs back off exponentially and
say so once per attempt; a rejected API key or a missing model stops the service with exit
code 78, which systemd is told not to restart (``RestartPreventExitStatus=78``).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from daemon import curate, discover, writeback
from daemon.health import HealthServer
from daemon.hooks import Hooks
from daemon.immich import open_immich
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.pipeline import Context, FatalError, ServiceDownError, drain, open_context
from daemon.settings import Settings
from daemon.store import Store
from daemon.vision import VisionModelMissingError, VisionUnavailableError
from immich_client import (
    ImmichAuthError,
    ImmichForbiddenError,
    ImmichServerError,
    ImmichUnreachableError,
    RetryPolicy,
)

log = logging.getLogger("darkroom.service")

STAGES = ("discover", "curate", "writeback", "encode", "train")
EXIT_OK = 0
EXIT_CONFIG = 78  # EX_CONFIG: a person must fix something; restarting cannot help
SECONDS_PER_HOUR = 3600
IDLE_TICK_S = 5.0
DOWN = (ImmichUnreachableError, ImmichServerError, VisionUnavailableError, ServiceDownError)
FATAL = (ImmichAuthError, ImmichForbiddenError, VisionModelMissingError, FatalError)


class Backoff:
    """Exponential backoff with jitter, shared by every job: one outage, one rhythm.

    The delays are the Immich client's own retry policy (``RetryPolicy.delay``), so the
    daemon and the client back off alike.
    """

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._policy = RetryPolicy(base_delay_s=base_s, max_delay_s=max_s)
        self.failures = 0
        self.until = 0.0
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def blocked(self) -> bool:
        """Whether jobs should wait."""
        return time.monotonic() < self.until

    def failed(self) -> float:
        """Record a failure; return how long to wait."""
        with self._lock:
            delay = self._policy.delay(self.failures, self._rng, None)
            self.failures += 1
            self.until = time.monotonic() + delay
            return delay

    def succeeded(self) -> bool:
        """Record a success; True when it ends an outage."""
        with self._lock:
            recovered = self.failures > 0
            self.failures, self.until = 0, 0.0
            return recovered


class Service:
    """Owns the context, the scheduler and the health endpoint for the life of the process."""

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.fatal: str | None = None
        self.notifier = Notifier(os.environ if environ is None else environ)
        daemon = settings.daemon
        self.backoff = Backoff(daemon.backoff_base_s, daemon.backoff_max_s)
        self.ctx: Context | None = None
        self._ctx_lock = threading.Lock()
        self.metrics: Metrics | None = None
        self.hooks: Hooks | None = None

    # -- the jobs ------------------------------------------------------------------------

    def poll(self) -> None:
        """Discover changes; wake curation when there is something new."""
        ctx = self._ready_ctx()
        report = discover.discover(ctx.store, ctx.immich, ctx.settings.discovery)
        assert self.metrics is not None
        self.metrics.poll_succeeded(time.time())
        if report.counts.new or report.counts.replaced:
            self.scheduler.modify_job("curate", next_run_time=datetime.now())

    def reconcile(self) -> None:
        """Notice hard deletes by walking the whole library."""
        ctx = self._ready_ctx()
        discover.reconcile(ctx.store, ctx.immich, ctx.settings.discovery)

    def curate(self) -> None:
        """Curate and write back everything pending."""
        ctx = self._ready_ctx()
        drain(ctx, curate.STAGE)
        if not ctx.settings.curation.dry_run:
            drain(ctx, writeback.STAGE)

    def run_hooks(self) -> None:
        """Start or advance an encode/train run when one is due."""
        assert self.hooks is not None
        self.hooks.check(datetime.now())

    def _ready_ctx(self) -> Context:
        """The context, opened on first use (and again after Ollama was down at start)."""
        with self._ctx_lock:
            if self.ctx is None:
                assert self.metrics is not None
                self.ctx = open_context(
                    self.settings,
                    store=self.store,
                    immich_observer=self.metrics.observe_immich,
                    vision_observer=self.metrics.observe_ollama,
                )
                provenance = self.ctx.provenance
                log.info("vision model %s (%s) ready", provenance.model, provenance.digest[:12])
            return self.ctx

    def _guarded(self, name: str, job: Callable[[], None]) -> Callable[[], None]:
        """Wrap a job: skip while backing off, back off when down, stop when fatal."""

        def run() -> None:
            if self.stopping.is_set() or self.backoff.blocked():
                return
            try:
                job()
            except DOWN as exc:
                delay = self.backoff.failed()
                log.warning("%s: %s; retrying in %.0fs", name, exc, delay)
                self._state(False, f"{exc}; retrying in {delay:.0f}s")
                return
            except FATAL as exc:
                self._stop_fatally(str(exc))
                return
            if self.backoff.succeeded():
                log.info("%s: services reachable again; work resumes", name)
            self._state(True, "ok")

        return run

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal error (exit 78)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._start()
        self.notifier.ready(f"watching {self.settings.immich.url}")
        tick = self.notifier.watchdog_interval() or IDLE_TICK_S
        while not self.stopping.wait(tick):
            self.notifier.watchdog_ping()
        code, lingering = self._shutdown()
        if lingering:
            # Work still in flight past the bound is abandoned: like a crash, it is left
            # pending in the store (every write is one transaction) and redone next time.
            log.warning("%d task(s) still running after %.0fs; leaving them pending",
                        lingering, self.settings.daemon.stop_timeout_s)  # fmt: skip
            logging.shutdown()
            os._exit(code)
        return code

    def _start(self) -> None:
        open_immich(self.settings).close()  # SettingsError now, not in every job later
        self.store = Store(self.settings.paths.database)
        self.metrics = Metrics(self.store)
        self.hooks = Hooks(
            self.settings.hooks, self.store, checkpoint_dir=self.settings.paths.checkpoint_dir
        )
        self.health = None
        daemon = self.settings.daemon
        if daemon.health_enabled:
            self.health = HealthServer(daemon.health_host, daemon.health_port, self.metrics)
            self.health.start()
            log.info("health endpoint on %s", self.health.url)
        self.scheduler = BackgroundScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        )
        now = datetime.now()
        add = self.scheduler.add_job
        add(self._guarded("discover", self.poll), "interval", id="discover",
            seconds=self.settings.discovery.interval_s, next_run_time=now)  # fmt: skip
        add(self._guarded("curate", self.curate), "interval", id="curate",
            seconds=daemon.curate_interval_s, next_run_time=now)  # fmt: skip
        add(self._guarded("reconcile", self.reconcile), "interval", id="reconcile",
            hours=daemon.reconcile_interval_h)  # fmt: skip
        add(self._guarded("hooks", self.run_hooks), "interval", id="hooks",
            seconds=self.settings.hooks.check_interval_s)  # fmt: skip
        self.scheduler.start()
        log.info("darkroom started: stages %s; state %s", " → ".join(STAGES), self.store.path)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping.set()

    def _stop_fatally(self, reason: str) -> None:
        log.error("stopping: %s", reason)
        self.fatal = reason
        self._state(False, f"stopped: {reason}")
        self.stopping.set()

    def _state(self, ok: bool, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.set_state(ok, reason)
        self.notifier.status(reason)

    def _shutdown(self) -> tuple[int, int]:
        """Stop within ``stop_timeout_s``; return the exit code and how many tasks linger."""
        self.notifier.stopping()
        if self.ctx is not None:
            self.ctx.stopping.set()
        self.scheduler.shutdown(wait=False)
        if self.hooks is not None:
            self.hooks.stop()
        if self.health is not None:
            self.health.stop()
        # Every worker thread counts, daemon or not: concurrent.futures joins its workers
        # at exit anyway, so one stuck in a long model call would hold the process.
        deadline = time.monotonic() + self.settings.daemon.stop_timeout_s
        others = [t for t in threading.enumerate() if t is not threading.current_thread()]
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
        lingering = sum(1 for t in others if t.is_alive())
        code = EXIT_CONFIG if self.fatal else EXIT_OK
        if lingering:
            return code, lingering
        if self.ctx is not None:
            self.ctx.close()
        self.store.close()
        log.info("darkroom stopped")
        return code, 0
