"""Which curated photos become training samples, with which caption and which pixels.

A photo is examined once per change in Immich (its ``updatedAt`` or checksum moved) after
its curation was written back, so a library of any size costs requests only for what
changed.  The decisions:

* a person's rating outranks the model's stars; a person's -1 (rejected) never trains;
* the caption is Immich's description (a person's, or the one darkroom wrote), else the
  curation's;
* the pixels are the original when it is unedited or only rotated (the rotation is then
  applied by darkroom), else Immich's edited rendition, so a person's crop is respected;
* a photo in an open review, in the trash or deleted is not a sample;
* optionally, one photo per Immich duplicate group (a burst): the best rated.

Results live in the ``training`` table and the ``encode`` stage of the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from daemon import writeback
from daemon.store import Store, utc_now
from immich_client.models import Asset, AssetEdit

STAGE = "encode"
PERSON = "person"
DARKROOM = "darkroom"
REJECTED = -1
# Pixels: the original as uploaded (darkroom applies the rotation), Immich's full-size
# rendition with the edits applied, or its preview.
ORIGINAL, EDITED, PREVIEW = "original", "edited", "preview"
ROTATE = "rotate"
FULL_TURN = 360
# MIME types of originals that Pillow decodes (HEIC only with pillow-heif).
PILLOW_MIME = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/tiff", "image/bmp", "image/gif"}
)
HEIC_MIME = frozenset({"image/heic", "image/heif"})

# Curated (written back), still in Immich, out of the trash, not waiting for a person.
_CURATED = "JOIN stage_status w ON w.asset_id = a.id AND w.stage = 'writeback'"
_USABLE = (
    "w.status = 'done' AND NOT a.is_trashed AND NOT a.is_deleted AND a.thumbnail_ready "
    "AND NOT EXISTS (SELECT 1 FROM review_queue r WHERE r.asset_id = a.id "
    "AND r.status = 'open')"
)
# Best first within a duplicate group (a photo without one is a group of its own).
_GROUP = (
    "OVER (PARTITION BY COALESCE(t.duplicate_id, a.id) "
    "ORDER BY t.rating DESC, c.overall DESC, a.id)"
)


@dataclass(frozen=True)
class Verdict:
    """What examining one asset decided."""

    checksum: str
    caption: str | None
    rating: int | None
    rated_by: str | None
    duplicate_id: str | None
    pixels: str
    rotation: int
    eligible: bool
    reason: str | None


class Candidate(NamedTuple):
    """An eligible photo, as the encode stage needs it."""

    asset_id: str
    checksum: str
    caption: str
    pixels: str
    rotation: int


def rating_of(
    asset: Asset, stars: int | None, written: tuple[bool, object], claimed: bool
) -> tuple[int | None, str | None]:
    """(rating, who gave it): Immich's rating when a person set it, else the model's stars.

    A person set it when they claimed the field, or when Immich holds a rating darkroom
    did not write.
    """
    held = asset.exif_info.rating if asset.exif_info else None
    wrote, value = written
    if held is not None and (claimed or not wrote or value != held):
        return held, PERSON
    if stars is None:
        return None, None
    return stars, DARKROOM


def caption_of(asset: Asset, described: str | None) -> str | None:
    """Immich's description (a person's or darkroom's), else the curation's."""
    held = (asset.exif_info.description or "").strip() if asset.exif_info else ""
    return held or (described or "").strip() or None


def pixels_of(asset: Asset, edits: Sequence[AssetEdit], *, heic: bool) -> tuple[str, int]:
    """Which pixels to encode and the clockwise rotation darkroom applies to them."""
    if edits and any(edit.action != ROTATE for edit in edits):
        return EDITED, 0
    readable = PILLOW_MIME | (HEIC_MIME if heic else frozenset())
    if asset.original_mime_type not in readable:
        return PREVIEW, 0
    turns = sum(int(edit.parameters.get("angle", 0)) for edit in edits)
    return ORIGINAL, turns % FULL_TURN


def judge(
    asset: Asset,
    edits: Sequence[AssetEdit],
    curation: dict[str, object],
    *,
    written: tuple[bool, object],
    claimed: bool,
    min_rating: int,
    heic: bool,
) -> Verdict:
    """Decide whether ``asset`` trains, and on what."""
    stars = curation.get("stars")
    rating, rated_by = rating_of(asset, stars if isinstance(stars, int) else None, written, claimed)
    described = curation.get("description")
    caption = caption_of(asset, described if isinstance(described, str) else None)
    pixels, rotation = pixels_of(asset, edits, heic=heic)
    reason = None
    if rating == REJECTED:
        reason = "rejected by a person (rating -1)"
    elif rating is None:
        reason = "no rating: neither a person nor the model rated it"
    elif rating < min_rating:
        reason = f"rated {rating} by {rated_by}, below min_rating {min_rating}"
    elif caption is None:
        reason = "no description to train on"
    return Verdict(
        checksum=asset.checksum,
        caption=caption,
        rating=rating,
        rated_by=rated_by,
        duplicate_id=asset.duplicate_id,
        pixels=pixels,
        rotation=rotation,
        eligible=reason is None,
        reason=reason,
    )


class TrainingSet:
    """The training-sample view of the store (the store still owns the connection)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def to_examine(self) -> list[tuple[str, str]]:
        """(asset id, Immich updatedAt) of usable assets never examined or changed since."""
        return [
            (row[0], row[1])
            for row in self.store.read(
                f"SELECT a.id, a.immich_updated_at FROM assets a {_CURATED} WHERE {_USABLE} "
                "AND NOT EXISTS ("
                "SELECT 1 FROM training t WHERE t.asset_id = a.id "
                "AND t.checked_updated_at = a.immich_updated_at AND t.checksum = a.checksum) "
                "ORDER BY a.first_seen_at"
            )
        ]

    def written(self, asset_id: str) -> tuple[tuple[bool, object], bool]:
        """(what darkroom last wrote to the rating, whether a person claimed it)."""
        field = writeback.RATING
        return self.store.last_written(asset_id, field), self.store.is_human(asset_id, field)

    def record(self, asset_id: str, seen_updated_at: str, verdict: Verdict) -> None:
        """Keep a verdict; an ineligible photo is ``skipped`` in the encode stage."""
        row = (
            asset_id, seen_updated_at, verdict.checksum, verdict.caption, verdict.rating,
            verdict.rated_by, verdict.duplicate_id, verdict.pixels, verdict.rotation,
            int(verdict.eligible), verdict.reason, utc_now(),
        )  # fmt: skip
        with self.store.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO training VALUES ({', '.join('?' * len(row))})", row
            )
            status = "pending" if verdict.eligible else "skipped"
            self.store.set_stage(conn, asset_id, STAGE, status, error=verdict.reason)

    def wanted(self, *, thin_duplicates: bool) -> tuple[list[Candidate], dict[str, str]]:
        """Eligible usable photos, and (when thinning) the burst members left out, each with
        the id of the photo kept in its place.
        """
        rows = self.store.read(
            "SELECT a.id, t.checksum, t.caption, t.pixels, t.rotation, "
            f"ROW_NUMBER() {_GROUP}, FIRST_VALUE(a.id) {_GROUP} "
            f"FROM assets a {_CURATED} JOIN training t ON t.asset_id = a.id "
            f"LEFT JOIN curations c ON c.asset_id = a.id WHERE {_USABLE} "
            "AND t.eligible AND t.checksum = a.checksum ORDER BY a.first_seen_at"
        )
        wanted, thinned = [], {}
        for asset_id, checksum, caption, pixels, rotation, rank, best in rows:
            if thin_duplicates and rank > 1:
                thinned[asset_id] = best
                continue
            wanted.append(Candidate(asset_id, checksum, caption, pixels, rotation))
        return wanted, thinned

    def record_outcomes(self, outcomes: Iterable[tuple[str, str, str | None]]) -> None:
        """(asset id, status, reason) of an encode run, in one transaction."""
        with self.store.transaction() as conn:
            for asset_id, status, reason in outcomes:
                self.store.set_stage(
                    conn, asset_id, STAGE, status, error=reason, attempted=status != "skipped"
                )

    def rating_counts(self) -> dict[str, int]:
        """Photos eligible for training by star rating (the model card's distribution)."""
        rows = self.store.read(
            "SELECT rating, COUNT(*) FROM training WHERE eligible GROUP BY rating ORDER BY rating"
        )
        return {str(rating): count for rating, count in rows}

    def mean_scores(self) -> dict[str, float]:
        """The vision model's mean score of each quality factor over eligible photos."""
        rows = self.store.read(
            "SELECT f.key, AVG(f.value) FROM training t JOIN curations c USING (asset_id), "
            "json_each(c.scores) f WHERE t.eligible AND c.scores IS NOT NULL "
            "GROUP BY f.key ORDER BY f.key"
        )
        return {str(name): float(mean) for name, mean in rows}

    def verdict(self, asset_id: str) -> dict[str, object] | None:
        """The stored verdict of one asset, by column name."""
        rows = self.store.read("SELECT * FROM training WHERE asset_id = ?", (asset_id,))
        names = [column[1] for column in self.store.read("PRAGMA table_info(training)")]
        return dict(zip(names, rows[0], strict=True)) if rows else None
