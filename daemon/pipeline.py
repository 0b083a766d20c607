"""Running a stage over its pending assets: the per-asset boundary and the worker pool.

Each asset is handled inside one boundary that turns every failure into a status in the
store with the reason, then carries on with the next asset.  Two kinds of failure stop the
whole batch instead: a service being down (Immich or Ollama: the batch ends, the asset
stays pending, the scheduler backs off) and a fatal one (the API key was rejected, the
vision model is missing: nothing can work until a person acts).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from daemon import curate, writeback
from daemon.immich import open_immich
from daemon.settings import Settings
from daemon.store import Store
from daemon.vision import (
    Provenance,
    VisionModelMissingError,
    VisionObserver,
    VisionPool,
    VisionUnavailableError,
)
from immich_client import (
    ImmichAuthError,
    ImmichClient,
    ImmichForbiddenError,
    ImmichNotFoundError,
    ImmichServerError,
    ImmichTooLargeError,
    ImmichUnreachableError,
    ImmichValidationError,
)
from immich_client.transport import Observer

log = logging.getLogger("darkroom.pipeline")

BYTES_PER_MB = 1024 * 1024
WORKERS_PER_SLOT = 3
QUEUE_PER_WORKER = 2
MAX_SERVICE_FAILURES = 10


class ServiceDownError(Exception):
    """Immich or Ollama cannot be reached now; try the batch again later."""


class FatalError(Exception):
    """Work cannot go on until a person fixes something (key, permissions, model)."""


@dataclass
class Context:
    """Everything a stage needs, built once by the service and passed down."""

    settings: Settings
    store: Store
    immich: ImmichClient
    vision: VisionPool | None = None
    provenance: Provenance | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    owns_store: bool = True

    def close(self) -> None:
        """Release connections (and the database, when this context opened it)."""
        if self.vision is not None:
            self.vision.close()
        self.immich.close()
        if self.owns_store:
            self.store.close()


def open_context(
    settings: Settings,
    *,
    with_vision: bool = True,
    store: Store | None = None,
    immich_observer: Observer | None = None,
    vision_observer: VisionObserver | None = None,
) -> Context:
    """Open the store (unless given) and the Immich client, and check the vision model.

    Raises VisionModelMissingError when the model is absent or blind, and
    VisionUnavailableError when Ollama does not answer.
    """
    owns_store = store is None
    store = store or Store(settings.paths.database)
    immich = open_immich(settings, observer=immich_observer)
    ctx = Context(settings, store, immich, owns_store=owns_store)
    if with_vision:
        ctx.vision = VisionPool(settings.ollama, vision_observer)
        try:
            ctx.provenance = ctx.vision.check()
        except BaseException:
            ctx.close()
            raise
    return ctx


def curate_one(ctx: Context, asset_id: str) -> None:
    """Download the preview, ask the model, store the result."""
    if ctx.vision is None or ctx.provenance is None:
        raise FatalError("curation needs the vision model, which was not checked at start")
    cap = ctx.settings.immich.download_cap_mb * BYTES_PER_MB
    options = ctx.settings.ollama
    jpeg = ctx.immich.thumbnail_bytes(asset_id, max_bytes=cap)
    views = options.orientation_long_side if ctx.settings.curation.orient else None
    image = curate.prepare_image(jpeg, options.image_long_side, views)
    result = curate.curate_image(ctx.vision, image, ctx.settings.curation, ctx.provenance)
    curate.save_curation(ctx.store, asset_id, result)
    log.info("%s curated", asset_id)


def write_back_one(ctx: Context, asset_id: str) -> None:
    """Write one asset's curation into Immich."""
    writeback.write_back(ctx.store, ctx.immich, ctx.settings.curation, asset_id)
    log.info("%s written back", asset_id)


STAGE_WORK: dict[str, Callable[[Context, str], None]] = {
    curate.STAGE: curate_one,
    writeback.STAGE: write_back_one,
}


def handle_asset(ctx: Context, stage: str, asset_id: str) -> None:
    """The per-asset boundary: run the stage, record the outcome, re-raise only batch stoppers."""
    work = STAGE_WORK[stage]
    try:
        work(ctx, asset_id)
    except (ImmichAuthError, ImmichForbiddenError, VisionModelMissingError) as exc:
        ctx.store.mark(asset_id, stage, "pending", error=str(exc))
        raise FatalError(str(exc)) from None
    except (ImmichUnreachableError, ImmichServerError, VisionUnavailableError) as exc:
        _service_failed(ctx, stage, asset_id, exc)
    except (curate.QuarantineError, ImmichTooLargeError) as exc:
        log.warning("%s quarantined in %s: %s", asset_id, stage, exc)
        ctx.store.mark(asset_id, stage, "quarantined", error=str(exc), attempted=True)
    except ImmichNotFoundError:
        log.info("%s is gone from Immich; skipped", asset_id)
        ctx.store.mark(asset_id, stage, "skipped", error="asset no longer in Immich")
    except ImmichValidationError as exc:
        log.warning("%s: Immich refused a write: %s", asset_id, exc)
        ctx.store.mark(asset_id, stage, "failed", error=str(exc), attempted=True)
    except Exception as exc:  # the per-asset boundary: log, record, carry on
        log.exception("%s failed in %s", asset_id, stage)
        ctx.store.mark(
            asset_id, stage, "failed", error=f"{type(exc).__name__}: {exc}", attempted=True
        )


def _service_failed(ctx: Context, stage: str, asset_id: str, exc: Exception) -> None:
    """Leave the asset pending (at the back of the queue) and stop the batch.

    An asset that keeps failing while others pass (say, a photo that crashes the model
    runner every time) is quarantined after ``MAX_SERVICE_FAILURES`` tries, so one photo
    can neither block the queue nor be retried forever.
    """
    previous = ctx.store.stage_of(asset_id, stage)
    attempts = (previous[1] if previous else 0) + 1
    if attempts >= MAX_SERVICE_FAILURES:
        reason = f"failed {attempts} times, last: {exc}"
        log.warning("%s quarantined in %s: %s", asset_id, stage, reason)
        ctx.store.mark(asset_id, stage, "quarantined", error=reason, attempted=True)
        return
    ctx.store.mark(asset_id, stage, "pending", error=str(exc), attempted=True)
    raise ServiceDownError(str(exc)) from None


def workers_for(ctx: Context) -> int:
    """Threads per stage: enough that downloads overlap the model's work on every slot."""
    slots = ctx.vision.slots if ctx.vision is not None else 1
    return slots * WORKERS_PER_SLOT


def process_asset(ctx: Context, stage: str, asset_id: str) -> None:
    """Run ``stage`` on one asset, then write back at once what curation produced."""
    if ctx.stopping.is_set():
        return
    handle_asset(ctx, stage, asset_id)
    if stage != curate.STAGE or ctx.settings.curation.dry_run:
        return
    status = ctx.store.stage_of(asset_id, writeback.STAGE)
    if status is not None and status[0] == "pending":
        handle_asset(ctx, writeback.STAGE, asset_id)


def drain(ctx: Context, stage: str) -> int:
    """Run ``stage`` until nothing is pending (or a stop is asked); return how many ran.

    The worker pool is fed continuously, so no slot waits for a batch to finish.  A batch
    stopper (ServiceDownError, FatalError) ends the feeding; the assets in flight finish,
    then it is raised.
    """
    workers = workers_for(ctx)
    queue_depth = workers * QUEUE_PER_WORKER
    futures: dict[Future[None], str] = {}
    handled = 0
    stopper: Exception | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=stage) as pool:
        while True:
            if stopper is None and not ctx.stopping.is_set() and len(futures) < queue_depth:
                busy = set(futures.values())
                for asset_id in ctx.store.pending(stage, queue_depth + len(busy)):
                    if asset_id not in busy and len(futures) < queue_depth:
                        futures[pool.submit(process_asset, ctx, stage, asset_id)] = asset_id
            if not futures:
                break
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                del futures[future]
                handled += 1
                try:
                    future.result()
                except (ServiceDownError, FatalError) as exc:
                    stopper = stopper or exc
    if stopper is not None:
        raise stopper
    return handled
