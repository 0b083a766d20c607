"""The in-memory photo library behind the stand-in Immich server.

Holds users (the API key's owner and partners), assets, tags, albums, edits and metadata,
behind one lock so the threaded HTTP server can serve it. Everything the stand-in does to an
asset bumps its ``updatedAt`` like the real server, with a clock that never repeats a
millisecond, so "changed since" polling is exact.

Search keeps one sorted index of (fileCreatedAt, id) and caches the filtered list per query
until the library changes, so paging through 100,000 assets costs a slice per page, not a
scan. Originals can be shared ``bytes`` (the checksum and size are computed once per object)
or a callable that makes the bytes on first use.

The real test photos and image rendering live in :mod:`tests.immich_photos`, Immich's wire
shapes (timestamps, DTOs) in :mod:`tests.immich_wire`; their names are re-exported here
(see ``__all__``) so existing imports keep working.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.immich_photos import (
    EXIF_ORIENTATION_TAG,
    FULL_TURN,
    JPEG_MIME,
    JPEG_QUALITY,
    PLACEHOLDER_GREY,
    PLACEHOLDER_SIZE,
    PREVIEW_SHORT_SIDE,
    SAMPLE_PHOTOS,
    SIDE_SWAPPING_ORIENTATIONS,
    THUMBNAIL_SHORT_SIDE,
    WEBP_MIME,
    ImageFacts,
    apply_edits,
    checksum_of,
    encode_jpeg,
    make_jpeg,
    read_facts,
    render,
    sample_array,
    with_exif_orientation,
)
from tests.immich_wire import (
    AVATAR_COLOR,
    EPOCH,
    EXIF_FIELDS_UNKNOWN,
    IMAGE_DURATION,
    MS_PER_SECOND,
    THUMBHASH_BYTES,
    album_dto,
    asset_dto,
    edits_dto,
    exif_dto,
    iso,
    metadata_dto,
    tag_dto,
    thumbhash_for,
    to_ms,
    user_admin_dto,
    user_dto,
)

__all__ = [
    "AVATAR_COLOR", "EPOCH", "EXIF_FIELDS_UNKNOWN", "EXIF_ORIENTATION_TAG", "FIRST_TAKEN",
    "FULL_TURN", "IMAGE_DURATION", "JPEG_MIME", "JPEG_QUALITY", "MS_PER_SECOND",
    "PLACEHOLDER_GREY", "PLACEHOLDER_SIZE", "PREVIEW_SHORT_SIDE", "SAMPLE_PHOTOS",
    "SEARCH_CACHE_SIZE", "SIDE_SWAPPING_ORIENTATIONS", "TAKEN_STEP_MS", "THUMBHASH_BYTES",
    "THUMBNAIL_SHORT_SIDE", "VISIBILITY_HIDDEN", "VISIBILITY_LOCKED", "WEBP_MIME", "Album",
    "Asset", "AssetEdit", "ImageFacts", "Library", "MetadataEntry", "OriginalSource",
    "SearchFilter", "SearchPage", "Tag", "User", "album_dto", "apply_edits", "asset_dto",
    "checksum_of", "edits_dto", "encode_jpeg", "exif_dto", "iso", "make_jpeg", "metadata_dto",
    "new_id", "now_ms", "read_facts", "render", "sample_array", "tag_dto", "thumbhash_for",
    "to_ms", "user_admin_dto", "user_dto", "with_exif_orientation",
]  # fmt: skip

#: Default fileCreatedAt of the first library asset; later ones are a minute apart each.
FIRST_TAKEN = datetime(2021, 6, 1, 12, 0, tzinfo=UTC)
TAKEN_STEP_MS = 60_000
SEARCH_CACHE_SIZE = 8
VISIBILITY_LOCKED = "locked"
VISIBILITY_HIDDEN = "hidden"

OriginalSource = bytes | Callable[[], bytes]


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh UUID like the ids Immich hands out."""
    return str(uuid.uuid4())


# --------------------------------------------------------------------------- records


@dataclass
class User:
    """A user of the server. ``partner`` users share their timeline with the key's owner."""

    id: str
    email: str
    name: str
    partner: bool = False
    created_ms: int = field(default_factory=now_ms)


@dataclass
class AssetEdit:
    """One non-destructive edit (crop, rotate or mirror) with its parameters."""

    id: str
    action: str
    parameters: dict[str, Any]


@dataclass
class MetadataEntry:
    """A JSON object stored on an asset under a key."""

    value: dict[str, Any]
    updated_ms: int


@dataclass(slots=True)
class Asset:
    """One asset and everything the stand-in models about it."""

    id: str
    owner_id: str
    type: str
    visibility: str
    source: OriginalSource
    checksum: str
    file_name: str
    mime_type: str
    taken_ms: int
    created_ms: int
    updated_ms: int
    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    deleted_ms: int | None = None
    thumbhash: str | None = None
    description: str = ""
    rating: int | None = None
    is_favorite: bool = False
    live_photo_video_id: str | None = None
    device_asset_id: str = ""
    device_id: str = "darkroom-tests"
    edits: list[AssetEdit] = field(default_factory=list)
    duplicate_id: str | None = None  # Immich's duplicate (burst) group
    tag_ids: dict[str, None] = field(default_factory=dict)
    metadata: dict[str, MetadataEntry] = field(default_factory=dict)

    def original(self) -> bytes:
        """The original file's bytes, made on first use when the source is a callable."""
        if callable(self.source):
            self.source = self.source()
        return self.source


@dataclass
class Tag:
    """A tag; ``value`` is its full path (``a/b/c``), ``name`` the last part."""

    id: str
    owner_id: str
    name: str
    value: str
    parent_id: str | None
    created_ms: int
    updated_ms: int
    color: str | None = None


@dataclass
class Album:
    """An album and its assets, in the order they were added."""

    id: str
    owner_id: str
    name: str
    description: str
    created_ms: int
    updated_ms: int
    asset_ids: dict[str, None] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchFilter:
    """The part of a metadata search that decides which assets match (hashable: cached)."""

    user_ids: frozenset[str]
    visibility: str | None = None
    with_deleted: bool = False
    asset_type: str | None = None
    is_favorite: bool | None = None
    asset_id: str | None = None
    checksum: str | None = None
    updated_after: int | None = None
    updated_before: int | None = None
    taken_after: int | None = None
    taken_before: int | None = None
    created_after: int | None = None
    created_before: int | None = None
    trashed_after: int | None = None
    trashed_before: int | None = None

    def matches(self, asset: Asset) -> bool:
        """Whether ``asset`` passes every filter (absent visibility: all but locked)."""
        trashed_range = self.trashed_after is not None or self.trashed_before is not None
        return (
            asset.owner_id in self.user_ids
            and _visible(asset.visibility, self.visibility)
            and (asset.deleted_ms is None or self.with_deleted or trashed_range)
            and self.asset_type in (None, asset.type)
            and self.is_favorite in (None, asset.is_favorite)
            and self.asset_id in (None, asset.id)
            and self.checksum in (None, asset.checksum)
            and _within(asset.updated_ms, self.updated_after, self.updated_before)
            and _within(asset.taken_ms, self.taken_after, self.taken_before)
            and _within(asset.created_ms, self.created_after, self.created_before)
            and (
                not trashed_range
                or _within(asset.deleted_ms, self.trashed_after, self.trashed_before)
            )
        )


def _visible(actual: str, wanted: str | None) -> bool:
    """Immich's visibility rule for API keys: one value, or everything but locked."""
    return actual == wanted if wanted is not None else actual != VISIBILITY_LOCKED


def _within(value: int | None, after: int | None, before: int | None) -> bool:
    """Inclusive range check like Immich's ``>=`` / ``<=`` filters."""
    if value is None:
        return after is None and before is None
    return (after is None or value >= after) and (before is None or value <= before)


@dataclass(frozen=True)
class SearchPage:
    """One page of search results and how to ask for the next one."""

    items: list[Asset]
    next_index: int | None


class Library:
    """All state of the stand-in server, guarded by one re-entrant lock.

    Change assets through its methods or the server's helpers (they bump ``updatedAt`` and
    the version that invalidates cached searches), not by setting fields directly.
    """

    def __init__(self, owner: User) -> None:
        self.lock = threading.RLock()
        self.owner = owner
        self.users: dict[str, User] = {owner.id: owner}
        self.assets: dict[str, Asset] = {}
        self.tags: dict[str, Tag] = {}
        self.albums: dict[str, Album] = {}
        self._last_ms = 0
        self._version = 0
        self._taken_counter = 0
        self._index: list[tuple[int, str]] = []
        self._index_dirty = False
        self._search_cache: dict[SearchFilter, tuple[int, list[tuple[int, str]]]] = {}
        self._facts: dict[int, tuple[bytes, str, ImageFacts]] = {}

    # ------------------------------------------------------------------ clock & changes

    def tick(self) -> int:
        """A timestamp for a change: now, but always after the previous one."""
        with self.lock:
            self._last_ms = max(now_ms(), self._last_ms + 1)
            self._version += 1
            return self._last_ms

    def touch(self, asset: Asset) -> None:
        """Record a change to ``asset``: bump its updatedAt like the real server does."""
        asset.updated_ms = self.tick()

    def next_taken_ms(self) -> int:
        """A default fileCreatedAt: a minute after the previous default one."""
        self._taken_counter += 1
        return to_ms(FIRST_TAKEN) + self._taken_counter * TAKEN_STEP_MS

    def facts(self, data: bytes) -> tuple[str, ImageFacts]:
        """Checksum and header facts of ``data``, computed once per bytes object."""
        cached = self._facts.get(id(data))
        if cached is None or cached[0] is not data:
            cached = (data, checksum_of(data), read_facts(data))
            self._facts[id(data)] = cached
        return cached[1], cached[2]

    # ------------------------------------------------------------------ assets

    def insert(self, asset: Asset) -> Asset:
        """Add a fully built asset and index it."""
        with self.lock:
            self.assets[asset.id] = asset
            self._index.append((asset.taken_ms, asset.id))
            self._index_dirty = True
            self._version += 1
            return asset

    def get(self, asset_id: str) -> Asset:
        """The asset with this id (KeyError if there is none)."""
        with self.lock:
            return self.assets[asset_id]

    def remove(self, asset_id: str) -> None:
        """Delete an asset for good, with its album and tag links."""
        with self.lock:
            asset = self.assets.pop(asset_id)
            self._index.remove((asset.taken_ms, asset_id))
            for album in self.albums.values():
                album.asset_ids.pop(asset_id, None)
            self._version += 1

    def find_by_checksum(self, owner_id: str, checksum: str) -> Asset | None:
        """The owner's asset with this checksum, trashed or not (Immich's duplicate rule)."""
        with self.lock:
            for asset in self.assets.values():
                if asset.owner_id == owner_id and asset.checksum == checksum:
                    return asset
            return None

    def can_read(self, user_id: str, asset: Asset) -> bool:
        """Owners and their partners may read an asset."""
        return asset.owner_id == user_id or self.users[asset.owner_id].partner

    def set_edits(self, asset: Asset, edits: list[tuple[str, dict[str, Any]]]) -> None:
        """Replace all edits of ``asset`` (an empty list removes them)."""
        with self.lock:
            asset.edits = [AssetEdit(new_id(), action, params) for action, params in edits]
            self.touch(asset)

    def upsert_metadata(self, asset: Asset, items: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Store JSON objects under keys on ``asset``; returns the keys written."""
        with self.lock:
            stamp = self.tick()
            for key, value in items:
                asset.metadata[key] = MetadataEntry(value, stamp)
            asset.updated_ms = stamp
            return [key for key, _ in items]

    # ------------------------------------------------------------------ tags & albums

    def upsert_tag_path(self, owner_id: str, path: str) -> Tag:
        """Find or create the tag ``a/b/c`` and all its parents; returns the leaf."""
        with self.lock:
            parent: Tag | None = None
            parts = [part for part in path.split("/") if part]
            for depth in range(len(parts)):
                value = "/".join(parts[: depth + 1])
                found = self.find_tag(owner_id, value)
                if found is None:
                    stamp = self.tick()
                    parent_id = parent.id if parent else None
                    found = Tag(new_id(), owner_id, parts[depth], value, parent_id, stamp, stamp)
                    self.tags[found.id] = found
                parent = found
            if parent is None:
                raise ValueError("empty tag path")
            return parent

    def find_tag(self, owner_id: str, value: str) -> Tag | None:
        """The owner's tag with this full path, if any."""
        with self.lock:
            for tag in self.tags.values():
                if tag.owner_id == owner_id and tag.value == value:
                    return tag
            return None

    def tag_asset(self, asset: Asset, tag_id: str) -> bool:
        """Link a tag to an asset; False if it was already there."""
        with self.lock:
            if tag_id in asset.tag_ids:
                return False
            asset.tag_ids[tag_id] = None
            self.touch(asset)
            return True

    def add_to_album(self, album: Album, asset: Asset) -> bool:
        """Add an asset to an album; False if it was already in it."""
        with self.lock:
            if asset.id in album.asset_ids:
                return False
            album.asset_ids[asset.id] = None
            album.updated_ms = self.tick()
            self.touch(asset)
            return True

    # ------------------------------------------------------------------ search

    def _sorted_index(self) -> list[tuple[int, str]]:
        """(fileCreatedAt, id) of every asset, ascending; re-sorted only after changes."""
        if self._index_dirty:
            self._index.sort()
            self._index_dirty = False
        return self._index

    def matching(self, flt: SearchFilter) -> list[tuple[int, str]]:
        """Ascending (fileCreatedAt, id) of the assets matching ``flt``, cached per version."""
        with self.lock:
            cached = self._search_cache.get(flt)
            if cached is not None and cached[0] == self._version:
                return cached[1]
            found = [key for key in self._sorted_index() if flt.matches(self.assets[key[1]])]
            if len(self._search_cache) >= SEARCH_CACHE_SIZE:
                self._search_cache.pop(next(iter(self._search_cache)))
            self._search_cache[flt] = (self._version, found)
            return found

    def page(self, flt: SearchFilter, descending: bool, start: int, size: int) -> SearchPage:
        """``size`` matches from position ``start`` in the requested order."""
        with self.lock:
            found = self.matching(flt)
            total = len(found)
            end = min(start + size, total)
            keys = found[total - end : total - start][::-1] if descending else found[start:end]
            items = [self.assets[asset_id] for _, asset_id in keys]
            return SearchPage(items, end if end < total else None)

    def position_after(self, flt: SearchFilter, descending: bool, key: tuple[int, str]) -> int:
        """Where the page after the item with sort ``key`` starts (for v3 cursors)."""
        with self.lock:
            found = self.matching(flt)
            if descending:
                return len(found) - bisect.bisect_left(found, key)
            return bisect.bisect_right(found, key)
