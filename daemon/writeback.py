"""Stage 3, write back: put a curation into Immich without ever overruling a person.

For each field darkroom writes (description, rating, score tag, metadata, rotation) the
rule is the same:

* a field a person has claimed is never written again;
* a field is darkroom's to write while Immich holds either nothing or exactly the last
  value darkroom wrote; any other value means a person changed it, and the field becomes
  theirs for good;
* a value Immich already holds is not written again;
* every write is recorded in the store before it is made and confirmed after, so a crash
  in between is settled on the next run by looking at what Immich actually holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.scoring import score_tag
from daemon.settings import CurationSettings
from daemon.store import Store
from immich_client import ImmichClient, ImmichNotFoundError, ImmichValidationError
from immich_client.models import ROTATE_ACTION, Asset

log = logging.getLogger("darkroom.writeback")

STAGE = "writeback"
METADATA_KEY = "darkroom"
ROTATION_REVIEW = "rotation"
REVIEW_ALBUM_KEY = "review_album_id"
TAG_ID_KEY = "tag_id:"
# Immich's edits API works on still images; these cannot take a rotate edit.
UNEDITABLE_MIME_TYPES = frozenset({"image/gif", "image/svg+xml"})

DESCRIPTION = "description"
RATING = "rating"
TAG = "tag"
METADATA = "metadata"
ROTATION = "rotation"
REVIEW_ALBUM = "review-album"


@dataclass
class WriteContext:
    """What write-back needs for one asset: where to write, what it holds now, the rules."""

    store: Store
    immich: ImmichClient
    settings: CurationSettings
    asset: Asset
    _edits: list[dict[str, Any]] | None = None

    @property
    def asset_id(self) -> str:
        """The asset being written."""
        return self.asset.id

    def edits(self) -> list[dict[str, Any]]:
        """The asset's current edits, read once."""
        if self._edits is None:
            edits = self.immich.get_edits(self.asset_id).edits
            self._edits = [{"action": e.action, "parameters": e.parameters} for e in edits]
        return self._edits


def _normalize_rating(value: int | None) -> int | None:
    # Immich stores 0 as "unrated".
    return value or None


def current_value(ctx: WriteContext, field: str) -> object:
    """What Immich holds now for ``field``."""
    if field == DESCRIPTION:
        return ctx.asset.description or None
    if field == RATING:
        return _normalize_rating(ctx.asset.rating)
    raise ValueError(f"no current value for {field}")


def holds(ctx: WriteContext, field: str, value: Any) -> bool:
    """Whether Immich already holds ``value`` in ``field`` (settles unfinished writes)."""
    if field in (DESCRIPTION, RATING):
        return current_value(ctx, field) == value
    if field == TAG:
        return any(tag.value == value for tag in ctx.asset.tags)
    if field == METADATA:
        stored = {item.key: item.value for item in ctx.immich.get_metadata(ctx.asset_id)}
        return stored.get(METADATA_KEY) == value
    if field == ROTATION:
        rotate = {"action": ROTATE_ACTION, "parameters": {"angle": value}}
        return rotate in ctx.edits()
    if field == REVIEW_ALBUM:
        return any(a.id == value for a in ctx.immich.list_albums(containing=ctx.asset_id))
    raise ValueError(f"unknown field {field}")


def settle_unfinished(ctx: WriteContext) -> None:
    """Confirm or abandon writes a crash left unconfirmed, by what Immich holds."""
    for write_id, field, value in ctx.store.unfinished_writes(ctx.asset_id):
        state = "done" if holds(ctx, field, value) else "abandoned"
        log.info("%s: unfinished %s write from before a restart: %s", ctx.asset_id, field, state)
        ctx.store.finish_write(write_id, state)


def darkroom_may_write(ctx: WriteContext, field: str) -> bool:
    """A field is darkroom's while Immich holds nothing or darkroom's own last value."""
    store, asset_id = ctx.store, ctx.asset_id
    if store.is_human(asset_id, field):
        return False
    wrote, last = store.last_written(asset_id, field)
    current = current_value(ctx, field)
    if (wrote and current == last) or (not wrote and current is None):
        return True
    log.info("%s: %s was changed by a person; darkroom leaves it alone", asset_id, field)
    store.claim_for_human(asset_id, field)
    return False


def record_writes(
    store: Store, asset_id: str, values: dict[str, Any], write: Callable[[], object]
) -> None:
    """Make one write to Immich carrying ``values`` (field → value), each recorded before
    and confirmed after."""
    write_ids = [store.intend_write(asset_id, field, value) for field, value in values.items()]
    write()
    for write_id in write_ids:
        store.finish_write(write_id, "done")


def record_write_for(
    store: Store, asset_id: str, field: str, value: Any, write: Callable[[], object]
) -> None:
    """``record_writes`` of a single field."""
    record_writes(store, asset_id, {field: value}, write)


def record_write(ctx: WriteContext, field: str, value: Any, write: Callable[[], object]) -> None:
    """``record_write_for`` the asset being written."""
    record_write_for(ctx.store, ctx.asset_id, field, value, write)


def wanted_field(ctx: WriteContext, field: str, value: object, mode: str) -> bool:
    """Whether ``value`` should be written to ``field`` now."""
    if value is None or mode == "never" or current_value(ctx, field) == value:
        return False
    return darkroom_may_write(ctx, field)


def write_description_and_rating(
    ctx: WriteContext, description: str | None, stars: int | None
) -> None:
    """The caption and the stars, each only where the field is darkroom's; one request."""
    settings = ctx.settings
    changes: dict[str, Any] = {}
    if wanted_field(ctx, DESCRIPTION, description, settings.description_mode):
        changes[DESCRIPTION] = description
    if wanted_field(ctx, RATING, stars, settings.rating_mode):
        changes[RATING] = stars
    if not changes:
        return
    record_writes(
        ctx.store, ctx.asset_id, changes, lambda: ctx.immich.update_asset(ctx.asset_id, **changes)
    )


def write_score_tag(ctx: WriteContext, overall: float | None) -> None:
    """``<prefix>/score/N`` as a hierarchical tag."""
    if overall is None:
        return
    path = score_tag(ctx.settings.tag_prefix, overall)
    if holds(ctx, TAG, path):
        return

    def tag() -> None:
        try:
            ctx.immich.tag_assets([tag_id(ctx, path)], [ctx.asset_id])
        except (ImmichValidationError, ImmichNotFoundError):
            # The remembered tag was deleted in Immich: make it again, once.
            ctx.immich.tag_assets([tag_id(ctx, path, refresh=True)], [ctx.asset_id])

    record_write(ctx, TAG, path, tag)


def tag_id(ctx: WriteContext, path: str, *, refresh: bool = False) -> str:
    """The id of the tag ``path``: remembered in the store, else created in Immich."""
    key = TAG_ID_KEY + path
    known = None if refresh else ctx.store.get_value(key)
    if known is None:
        created = ctx.immich.upsert_tags([path])
        known = next(t.id for t in created if t.value == path)
        ctx.store.set_value(key, known)
    return known


def write_metadata(ctx: WriteContext, result: dict[str, Any]) -> None:
    """The full result with provenance under one metadata key."""
    wrote, last = ctx.store.last_written(ctx.asset_id, METADATA)
    if wrote and last == result:
        return
    record_write(
        ctx, METADATA, result, lambda: ctx.immich.put_metadata(ctx.asset_id, METADATA_KEY, result)
    )


def rotation_blocker(ctx: WriteContext) -> str | None:
    """Why this asset must not get an automatic rotate edit, or None."""
    asset = ctx.asset
    if asset.type != "IMAGE":
        return f"{asset.type.lower()} assets cannot be rotated"
    if asset.live_photo_video_id:
        return "live photo"
    if asset.original_mime_type in UNEDITABLE_MIME_TYPES:
        return f"Immich cannot edit {asset.original_mime_type}"
    if ctx.edits():
        return "already edited by a person"
    return None


def write_rotation(ctx: WriteContext, orientation: dict[str, Any] | None) -> None:
    """Rotate when the votes agree and the asset may be edited; else ask a person."""
    if orientation is None:
        return
    correction = orientation["correction"]
    wrote, last = ctx.store.last_written(ctx.asset_id, ROTATION)
    if correction == 0 or (wrote and last == correction):
        return
    if ctx.store.is_human(ctx.asset_id, ROTATION):
        return  # a person already decided this photo's rotation in review
    blocker = None if correction is None else rotation_blocker(ctx)
    if correction is None or blocker:
        send_to_review(ctx, {**orientation, "reason": blocker or "the votes disagree"})
        return
    record_write(
        ctx, ROTATION, correction, lambda: ctx.immich.add_rotation(ctx.asset_id, correction)
    )


def send_to_review(ctx: WriteContext, proposal: dict[str, Any]) -> None:
    """Queue a rotation decision for a person, in the store and in the review album."""
    with ctx.store.transaction() as conn:
        ctx.store.open_review(conn, ctx.asset_id, ROTATION_REVIEW, proposal)
    album_id = review_album(ctx.store, ctx.immich, ctx.settings.review_album)
    record_write(
        ctx, REVIEW_ALBUM, album_id, lambda: ctx.immich.add_to_album(album_id, [ctx.asset_id])
    )


def review_album(store: Store, immich: ImmichClient, name: str) -> str:
    """The review album's id: remembered, found by name, or created."""
    known = store.get_value(REVIEW_ALBUM_KEY)
    if known:
        return known
    album = next((a for a in immich.list_albums() if a.album_name == name), None)
    if album is None:
        album = immich.create_album(
            name, description="Photos whose rotation darkroom could not settle"
        )
    store.set_value(REVIEW_ALBUM_KEY, album.id)
    return album.id


def write_back(
    store: Store, immich: ImmichClient, settings: CurationSettings, asset_id: str
) -> None:
    """Write one asset's curation into Immich and mark the stage done."""
    curation = store.curation(asset_id)
    if curation is None:
        raise LookupError(f"{asset_id}: no curation to write back")
    ctx = WriteContext(store, immich, settings, immich.get_asset(asset_id))
    settle_unfinished(ctx)
    result = {k: curation[k] for k in ("description", "scores", "overall", "stars", "orientation")}
    result["provenance"] = curation["provenance"]
    result["curated_at"] = curation["created_at"]
    write_description_and_rating(ctx, curation["description"], curation["stars"])
    write_score_tag(ctx, curation["overall"])
    write_metadata(ctx, result)
    write_rotation(ctx, curation["orientation"])
    store.mark(asset_id, STAGE, "done", attempted=True)
