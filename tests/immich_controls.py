"""What tests call on the stand-in Immich server besides HTTP: faults and library state.

Split out of :mod:`tests.immich_server` to keep modules short. :class:`ImmichServer`
inherits both mixins here, so tests still call ``immich.fail(...)`` or
``immich.add_asset(...)``; the names defined here are re-exported by the server module.

- :class:`_FaultControls` injects faults (error statuses, delays, dropped connections,
  corrupted bodies, a revoked key) that the server's request pipeline applies, and counts
  the requests it logged.
- :class:`_LibraryControls` puts users and assets in the library without HTTP, changes them
  the way a person in Immich's web UI would, and snapshots them (:class:`AssetState`) for
  assertions. It also makes new asset records with the server's defaults, which the upload
  endpoint uses too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from PIL import Image

from tests import immich_library as lib
from tests.immich_library import Asset, Library, User
from tests.immich_routes import ROUTES, FaultTarget, RequestRecord

if TYPE_CHECKING:
    from tests.immich_routes import Route

VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"  # a tiny fake MP4 header
MIME_BY_TYPE = {"IMAGE": lib.JPEG_MIME, "VIDEO": "video/mp4"}


@dataclass
class Fault:
    """An injected fault: after ``skip`` matching calls, acts on the next ``times`` (None:
    every) call. Kinds: ``status`` (error answer), ``delay``, ``drop``, ``corrupt``.
    """

    target: FaultTarget
    kind: str
    times: int | None = 1
    skip: int = 0
    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    retry_after: float | None = None
    seconds: float = 0.0
    mutate: Callable[[Any], Any] | None = None

    def take(self, route: Route, kind: str) -> bool:
        """Consume one use of this fault for ``route`` if it applies now."""
        if self.kind != kind or not route.targeted_by(self.target) or self.times == 0:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass(frozen=True)
class AssetState:
    """A snapshot of one asset for assertions in tests."""

    id: str
    owner_id: str
    description: str
    rating: int | None
    is_favorite: bool
    visibility: str
    trashed: bool
    thumbhash: str | None
    checksum: str
    updated_at: str
    edits: tuple[dict[str, Any], ...]
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    albums: tuple[str, ...]


class _Unset:
    """Marker for "argument not given" where None is a meaningful value."""


UNSET = _Unset()


class _FaultControls:
    """Fault injection and request counting; mixed into :class:`ImmichServer`."""

    faults: list[Fault]
    requests: list[RequestRecord]
    _lock: threading.Lock
    _key_budget: int | None

    def fail(
        self, target: FaultTarget, status: int = HTTPStatus.INTERNAL_SERVER_ERROR, *,
        times: int | None = 1, skip: int = 0, retry_after: float | None = None,
    ) -> Fault:  # fmt: skip
        """Answer ``status`` (with ``Retry-After`` if given) to the next ``times`` calls."""
        return self._add_fault(
            Fault(target, "status", times, skip, status=status, retry_after=retry_after)
        )

    def delay(
        self, target: FaultTarget, seconds: float, *, times: int | None = None, skip: int = 0
    ) -> Fault:
        """Sleep ``seconds`` before answering (every call unless ``times``)."""
        return self._add_fault(Fault(target, "delay", times, skip, seconds=seconds))

    def drop(self, target: FaultTarget, *, times: int | None = 1, skip: int = 0) -> Fault:
        """Close the connection without an answer on the next ``times`` calls."""
        return self._add_fault(Fault(target, "drop", times, skip))

    def corrupt(
        self,
        target: FaultTarget,
        mutate: Callable[[Any], Any],
        *,
        times: int | None = 1,
        skip: int = 0,
    ) -> Fault:
        """Pass the next successful JSON body through ``mutate`` (to test drift detection)."""
        return self._add_fault(Fault(target, "corrupt", times, skip, mutate=mutate))

    def revoke_key_after(self, calls: int) -> None:
        """Let ``calls`` more authenticated requests through, then answer 401 (key revoked)."""
        with self._lock:
            self._key_budget = calls

    def revoke_key(self) -> None:
        """Revoke the API key now."""
        self.revoke_key_after(0)

    def restore_key(self) -> None:
        """Make the API key valid again."""
        with self._lock:
            self._key_budget = None

    def clear_faults(self) -> None:
        """Forget all injected faults."""
        with self._lock:
            self.faults.clear()

    def _add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def request_count(self, target: FaultTarget | None = None) -> int:
        """How many requests hit ``target`` (an operationId or (method, template)), or all."""
        with self._lock:
            records = list(self.requests)
        if target is None:
            return len(records)
        by_id = {route.operation_id: route for route in ROUTES}
        return sum(
            1 for r in records if r.operation_id and by_id[r.operation_id].targeted_by(target)
        )


class _LibraryControls:
    """Library set-up, human edits and snapshots; mixed into :class:`ImmichServer`."""

    library: Library
    _file_counter: int

    @property
    def owner(self) -> User:
        """The user the API key belongs to."""
        return self.library.owner

    def add_user(self, name: str, email: str | None = None, *, partner: bool = True) -> str:
        """Add another user; ``partner`` users share their timeline with the key's owner."""
        user = User(lib.new_id(), email or f"{name.lower()}@example.com", name, partner=partner)
        with self.library.lock:
            self.library.users[user.id] = user
        return user.id

    def add_asset(
        self,
        image: bytes | Image.Image | Callable[[], bytes] | None = None,
        *,
        owner_id: str | None = None,
        type: str = "IMAGE",
        visibility: str = "timeline",
        trashed: bool = False,
        thumbhash_ready: bool = True,
        file_name: str | None = None,
        exif_orientation: int | None = None,
        live_photo: bool = False,
        taken_at: datetime | str | None = None,
        description: str = "",
        rating: int | None = None,
        is_favorite: bool = False,
        checksum: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> str:
        """Put an asset in the library (no HTTP) and return its id.

        ``image`` may be shared ``bytes`` (checksum and size are computed once per object, so
        100,000 assets are cheap), a Pillow image, or a callable making the bytes on first use
        (give ``checksum`` to keep it lazy). ``None`` uses a sample JPEG.
        """
        if owner_id is not None and owner_id not in self.library.users:
            raise ValueError(f"unknown owner {owner_id}: add_user() first")
        source = _as_source(image, type, exif_orientation)
        source, checksum, facts = self._source_facts(source, checksum, exif_orientation)
        asset = self._new_asset(
            owner_id or self.owner.id, type, visibility, source, checksum, file_name
        )
        asset.width, asset.height = width or facts.width, height or facts.height
        asset.orientation = facts.orientation
        asset.thumbhash = lib.thumbhash_for(checksum) if thumbhash_ready else None
        asset.description, asset.rating, asset.is_favorite = description, rating, is_favorite
        asset.taken_ms = asset.taken_ms if taken_at is None else lib.to_ms(taken_at)
        asset.deleted_ms = asset.updated_ms if trashed else None
        if live_photo:
            asset.live_photo_video_id = self._add_motion_part(asset)
        self.library.insert(asset)
        return asset.id

    def _source_facts(
        self, source: lib.OriginalSource, checksum: str | None, orientation: int | None
    ) -> tuple[lib.OriginalSource, str, lib.ImageFacts]:
        """The source with its checksum and header facts. A lazy source stays lazy when the
        checksum is given (its size is then unknown, as before Immich extracts metadata);
        otherwise it is made now.
        """
        if callable(source) and checksum is not None:
            return source, checksum, lib.ImageFacts(None, None, orientation)
        data = source() if callable(source) else source
        found, facts = self.library.facts(data)
        return data, checksum or found, facts

    def _add_motion_part(self, photo: Asset) -> str:
        """The hidden video half of a live photo (Immich lists it with visibility hidden)."""
        return self.add_asset(
            VIDEO_BYTES + photo.checksum.encode(),
            owner_id=photo.owner_id,
            type="VIDEO",
            visibility="hidden",
            taken_at=lib.iso(photo.taken_ms),
            file_name=photo.file_name.rsplit(".", 1)[0] + ".MOV",
        )

    def _new_asset(
        self,
        owner_id: str,
        kind: str,
        visibility: str,
        source: lib.OriginalSource,
        checksum: str,
        name: str | None,
    ) -> Asset:
        """A fresh asset record with server-side defaults (ids, names, timestamps)."""
        with self.library.lock:
            self._file_counter += 1
            stamp = self.library.tick()
            taken = self.library.next_taken_ms()
        extension = "MOV" if kind == "VIDEO" else "jpg"
        return Asset(
            id=lib.new_id(),
            owner_id=owner_id,
            type=kind,
            visibility=visibility,
            source=source,
            checksum=checksum,
            file_name=name or f"IMG_{self._file_counter:05d}.{extension}",
            mime_type=MIME_BY_TYPE.get(kind, "application/octet-stream"),
            taken_ms=taken,
            created_ms=stamp,
            updated_ms=stamp,
            device_asset_id=f"darkroom-test-{self._file_counter}",
        )

    def trash(self, asset_id: str) -> None:
        """Move an asset to the trash (bumps updatedAt, like Immich)."""
        with self.library.lock:
            asset = self.library.get(asset_id)
            self.library.touch(asset)
            asset.deleted_ms = asset.updated_ms

    def restore(self, asset_id: str) -> None:
        """Take an asset out of the trash."""
        with self.library.lock:
            asset = self.library.get(asset_id)
            asset.deleted_ms = None
            self.library.touch(asset)

    def hard_delete(self, asset_id: str) -> None:
        """Delete an asset for good (it simply stops appearing anywhere)."""
        self.library.remove(asset_id)

    def replace_file(self, asset_id: str, image: bytes) -> None:
        """Replace the asset's file (as Immich's "replace" or a re-import does): a new
        checksum and new renditions under the same id, and updatedAt moves.
        """
        source, checksum, facts = self._source_facts(image, None, None)
        with self.library.lock:
            asset = self.library.get(asset_id)
            asset.source, asset.checksum = source, checksum
            asset.width, asset.height, asset.orientation = (
                facts.width,
                facts.height,
                facts.orientation,
            )
            asset.thumbhash = lib.thumbhash_for(checksum)
            self.library.touch(asset)

    def group_duplicates(self, asset_ids: list[str]) -> str:
        """Put assets in one duplicate group, as Immich's duplicate detection does for a
        burst; returns the group id.
        """
        group = lib.new_id()
        with self.library.lock:
            for asset_id in asset_ids:
                asset = self.library.get(asset_id)
                asset.duplicate_id = group
                self.library.touch(asset)
        return group

    def mark_thumbnail_ready(self, asset_id: str) -> None:
        """Finish thumbnail generation: the thumbhash appears and updatedAt moves."""
        with self.library.lock:
            asset = self.library.get(asset_id)
            asset.thumbhash = lib.thumbhash_for(asset.checksum)
            self.library.touch(asset)

    def human_update(
        self,
        asset_id: str,
        *,
        description: str | _Unset = UNSET,
        rating: int | _Unset | None = UNSET,
        is_favorite: bool | _Unset = UNSET,
        edits: list[dict[str, Any]] | _Unset = UNSET,
    ) -> None:
        """Change an asset the way a person in Immich's web UI would (bumps updatedAt)."""
        with self.library.lock:
            asset = self.library.get(asset_id)
            if not isinstance(description, _Unset):
                asset.description = description
            if not isinstance(rating, _Unset):
                asset.rating = rating
            if not isinstance(is_favorite, _Unset):
                asset.is_favorite = is_favorite
            if not isinstance(edits, _Unset):
                self.library.set_edits(
                    asset, [(edit["action"], edit["parameters"]) for edit in edits]
                )
            self.library.touch(asset)

    def asset(self, asset_id: str) -> AssetState:
        """A snapshot of an asset's state, for assertions."""
        with self.library.lock:
            asset = self.library.get(asset_id)
            albums = tuple(a.name for a in self.library.albums.values() if asset_id in a.asset_ids)
            return AssetState(
                id=asset.id,
                owner_id=asset.owner_id,
                description=asset.description,
                rating=asset.rating,
                is_favorite=asset.is_favorite,
                visibility=asset.visibility,
                trashed=asset.deleted_ms is not None,
                thumbhash=asset.thumbhash,
                checksum=asset.checksum,
                updated_at=lib.iso(asset.updated_ms),
                edits=tuple(
                    {"action": e.action, "parameters": dict(e.parameters)} for e in asset.edits
                ),
                tags=tuple(self.library.tags[tag_id].value for tag_id in asset.tag_ids),
                metadata={key: entry.value for key, entry in asset.metadata.items()},
                albums=albums,
            )

    def tags(self) -> list[str]:
        """Every tag's full value (``a/b/c``)."""
        with self.library.lock:
            return sorted(tag.value for tag in self.library.tags.values())

    def albums(self) -> dict[str, list[str]]:
        """Album name → asset ids in it."""
        with self.library.lock:
            return {album.name: list(album.asset_ids) for album in self.library.albums.values()}


def _as_source(
    image: bytes | Image.Image | Callable[[], bytes] | None, kind: str, orientation: int | None
) -> lib.OriginalSource:
    """Normalise ``add_asset``'s image argument; writes the EXIF orientation if asked."""
    if image is None:
        image = VIDEO_BYTES if kind == "VIDEO" else _default_jpeg()
    if isinstance(image, Image.Image):
        image = lib.encode_jpeg(image)
    if isinstance(image, bytes) and orientation is not None and kind == "IMAGE":
        image = lib.with_exif_orientation(image, orientation)
    return image


@cache
def _default_jpeg() -> bytes:
    """One shared sample JPEG for assets added without an image."""
    return lib.make_jpeg("astronaut")
