"""Stage 1, discover: notice new, changed, trashed and replaced photos in Immich.

Each poll asks for what changed since the last change seen (minus a safety margin, since
Immich's clock and its indexing are not ours), in every visibility darkroom handles, trash
included.  Only the key owner's assets are kept (search also returns partners').  Our own
writes bump ``updatedAt`` and so come back here: they only refresh the stored row; a photo
is curated again only when its checksum changes (the file was replaced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from daemon.settings import DiscoverySettings
from daemon.store import SeenAsset, Store, UpsertCounts
from immich_client import ImmichClient
from immich_client.models import Asset

log = logging.getLogger("darkroom.discover")

WATERMARK_KEY = "discovery_watermark"
OWNER_KEY = "owner_id"


@dataclass(frozen=True)
class DiscoveryReport:
    """What one poll found."""

    counts: UpsertCounts
    requests: int
    watermark: datetime | None


def seen(asset: Asset) -> SeenAsset:
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
    """Poll Immich once and bring the store up to date."""
    owner = owner_id(store, immich)
    stored = store.get_value(WATERMARK_KEY)
    watermark = datetime.fromisoformat(stored) if stored else None
    since = watermark - timedelta(seconds=settings.safety_margin_s) if watermark else None
    total = UpsertCounts()
    requests = 0
    newest = watermark
    for visibility in settings.visibilities:
        pages = immich.search_pages(updated_after=since, visibility=visibility, with_deleted=True)
        for page in pages:
            requests += 1
            mine = [seen(a) for a in page.items if a.owner_id == owner]
            total += store.upsert_assets(mine)
            latest = max((a.updated_at for a in page.items), default=None)
            if latest is not None and (newest is None or latest > newest):
                newest = latest
    if newest is not None and newest != watermark:
        store.set_value(WATERMARK_KEY, newest.isoformat())
    log.info("poll: %s in %d requests", total, requests)
    return DiscoveryReport(total, requests, newest)
