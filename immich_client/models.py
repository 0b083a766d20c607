"""Typed views of the Immich responses darkroom reads.

Models keep only the fields darkroom uses and ignore the rest, so the same models parse
Immich 2.5 through 3.x responses (which add fields, e.g. ``nextCursor``).  Field names are
snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

AssetType = Literal["IMAGE", "VIDEO", "AUDIO", "OTHER"]
Visibility = Literal["archive", "timeline", "hidden", "locked"]
ThumbnailSize = Literal["thumbnail", "preview", "fullsize"]
ROTATE_ACTION = "rotate"


class ImmichModel(BaseModel):
    """Base: camelCase on the wire, unknown fields ignored, instances immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class ServerVersion(ImmichModel):
    """``GET /server/version``."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def as_tuple(self) -> tuple[int, int, int]:
        """For comparisons such as ``>= (2, 5, 0)``."""
        return (self.major, self.minor, self.patch)


class ApiKeyInfo(ImmichModel):
    """``GET /api-keys/me``: the key itself and what it may do."""

    id: str
    name: str
    permissions: list[str]

    def lacks(self, needed: list[str]) -> list[str]:
        """The permissions of ``needed`` this key does not have (``all`` grants every one)."""
        if "all" in self.permissions:
            return []
        return [permission for permission in needed if permission not in self.permissions]


class User(ImmichModel):
    """``GET /users/me``."""

    id: str
    email: str
    name: str


class ExifInfo(ImmichModel):
    """The part of EXIF darkroom reads: what a person (or darkroom) set, and orientation."""

    description: str | None = None
    rating: int | None = None
    orientation: str | None = None
    exif_image_width: float | None = None
    exif_image_height: float | None = None


class Tag(ImmichModel):
    """A tag; ``value`` is the full hierarchical path such as ``darkroom/score/7``."""

    id: str
    name: str
    value: str
    parent_id: str | None = None


class AssetSummary(ImmichModel):
    """What a search result needs to say about an asset: identity, state, change marks.

    Search pages hold a thousand of these; fewer fields make paging a large library
    measurably cheaper.
    """

    id: str
    owner_id: str
    type: AssetType
    checksum: str
    updated_at: datetime
    visibility: Visibility
    is_trashed: bool
    thumbhash: str | None
    original_file_name: str


class Asset(AssetSummary):
    """An asset as ``GET /assets/{id}`` returns it, with its EXIF block and tags."""

    is_edited: bool = False
    original_mime_type: str | None = None
    live_photo_video_id: str | None = None
    duplicate_id: str | None = None
    width: float | None = None
    height: float | None = None
    exif_info: ExifInfo | None = None
    tags: list[Tag] = Field(default_factory=list)

    @property
    def description(self) -> str | None:
        """The description shown in Immich (it lives in the EXIF block)."""
        return self.exif_info.description if self.exif_info else None

    @property
    def rating(self) -> int | None:
        """The star rating shown in Immich, None when unrated."""
        return self.exif_info.rating if self.exif_info else None


class SearchPage(ImmichModel):
    """One page of ``POST /search/metadata`` (the ``assets`` part)."""

    total: int
    count: int
    items: list[AssetSummary]
    next_page: str | None = None
    next_cursor: str | None = None
    # Not from the body: when Immich answered (its Date header), set by the client.
    served_at: datetime | None = Field(default=None, exclude=True)


class SearchResponse(ImmichModel):
    """``POST /search/metadata``: darkroom reads only the assets half."""

    assets: SearchPage


class AssetEdit(ImmichModel):
    """One edit action; ``parameters`` depends on ``action`` (rotate: ``{"angle": 90}``)."""

    id: str | None = None
    action: str
    parameters: dict[str, Any]


class AssetEdits(ImmichModel):
    """``GET/PUT /assets/{id}/edits``."""

    asset_id: str
    edits: list[AssetEdit]


class MetadataItem(ImmichModel):
    """One key of an asset's metadata."""

    key: str
    value: dict[str, Any]
    updated_at: datetime | None = None


class Album(ImmichModel):
    """An album (without its assets)."""

    id: str
    album_name: str
    asset_count: int = 0
    owner_id: str | None = None


class BulkIdResult(ImmichModel):
    """Per-id outcome of a bulk call such as adding assets to an album."""

    id: str
    success: bool
    error: str | None = None


class UploadResult(ImmichModel):
    """``POST /assets``: ``created``, ``replaced`` or ``duplicate``."""

    id: str
    status: str


class TagAssetsResult(ImmichModel):
    """``PUT /tags/assets``: how many (asset, tag) pairs were added."""

    count: int
