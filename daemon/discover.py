"""Stage 1, discover: notice new, changed, trashed and replaced photos in Immich.

Each poll asks for what changed since the last change seen (minus a safety margin, since
Immich's clock and its indexing are not ours), in every visibility darkroom handles, trash
included.  Only the key owner's assets are kept (search also returns partners').  Our own
writes bump ``updatedAt`` and so come back here: they only refresh the stored row; a photo
is curated again only when its checksum changes (the file was replaced).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from daemon.settings import DiscoverySettings
from daemon.store import SeenAsset, Store, UpsertCounts, utc_now
from immich_client import ImmichClient
from immich_client.models import AssetSummary

log = logging.getLogger("darkroom.discover")

WATERMARK_KEY = "discovery_watermark"
OWNER_KEY = "owner_id"
RECONCILED_KEY = "last_reconciliation"
# Rows written per transaction during a sweep: one commit per page would rewrite the same
# index pages again and again once the library is large.  A crash mid-sweep loses
# nothing: the watermark only moves after the sweep, so the next poll repeats it.
WRITE_BATCH = 5_000


@dataclass(frozen=True)
class DiscoveryReport:
    """What one poll found."""

    counts: UpsertCounts
    requests: int
    watermark: datetime | None
    started_at: datetime | None = None  # Immich's clock at the first answer


def seen(asset: AssetSummary) -> SeenAsset:
    """The part of an Immich asset the store keeps."""
    return SeenAsset(
        id=asset.id,
        owner_id=asset.owner_id,
        type=asset.type,
        checksum=asset.checksum,
        updated_at=asset.updated_at.isoformat(),
        visibility=asset.visibility,
        is_trashed=asset.is_trashed,
        original_file_name=asset.original_file_name,
        thumbnail_ready=asset.thumbhash is not None,
    )


def owner_id(store: Store, immich: ImmichClient) -> str:
    """The key owner's id, asked once and remembered."""
    known = store.get_value(OWNER_KEY)
    if known is None:
        known = immich.me().id
        store.set_value(OWNER_KEY, known)
    return known


def discover(store: Store, immich: ImmichClient, settings: DiscoverySettings) -> DiscoveryReport:
    """Poll Immich once for what changed and bring the store up to date."""
    stored = store.get_value(WATERMARK_KEY)
    watermark = datetime.fromisoformat(stored) if stored else None
    since = watermark - timedelta(seconds=settings.safety_margin_s) if watermark else None
    report = _sweep(store, immich, settings, since, watermark)
    # Everything changed before the poll began was seen by it (give or take the margin
    # for late commits), so the next poll may start from there even when nothing changed:
    # after a big import, polls are one request per visibility again.
    moments = (report.watermark, report.started_at)
    newest = max((m for m in moments if m is not None), default=None)
    if newest is not None and newest != watermark:
        store.set_value(WATERMARK_KEY, newest.isoformat())
    log.info("poll: %s in %d requests", report.counts, report.requests)
    return report


def reconcile(store: Store, immich: ImmichClient, settings: DiscoverySettings) -> int:
    """Walk the whole library once; assets Immich no longer has are marked deleted.

    Hard deletes leave no trace a poll could see, so this is the only way to notice them.
    Returns how many assets were found gone.
    """
    started = utc_now()
    _sweep(store, immich, settings, None, None)
    gone = store.mark_unseen_deleted(started)
    store.set_value(RECONCILED_KEY, started)
    log.info("reconciliation: %d asset(s) gone from Immich", gone)
    return gone


def _sweep(
    store: Store,
    immich: ImmichClient,
    settings: DiscoverySettings,
    since: datetime | None,
    newest: datetime | None,
) -> DiscoveryReport:
    """Page through every visibility (trash included) and upsert the owner's assets."""
    owner = owner_id(store, immich)
    requests = 0
    started_at: datetime | None = None
    batch: list[SeenAsset] = []
    # Writes go to a thread of their own (SQLite works without the GIL), so reading
    # pages and writing rows overlap; at most one batch waits, bounding memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="discover-write") as writer:
        written: list[Future[UpsertCounts]] = []
        for visibility in settings.visibilities:
            pages = immich.search_pages(
                updated_after=since, visibility=visibility, with_deleted=True
            )
            for page in pages:
                requests += 1
                started_at = started_at or page.served_at
                batch += [seen(a) for a in page.items if a.owner_id == owner]
                if len(batch) >= WRITE_BATCH:
                    if written:
                        written[-1].result()
                    written.append(writer.submit(store.upsert_assets, batch))
                    batch = []
                latest = max((a.updated_at for a in page.items), default=None)
                if latest is not None and (newest is None or latest > newest):
                    newest = latest
        written.append(writer.submit(store.upsert_assets, batch))
        total = sum((future.result() for future in written), UpsertCounts())
    return DiscoveryReport(total, requests, newest, started_at)
