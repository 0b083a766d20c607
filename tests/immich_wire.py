"""Immich's wire forms for the stand-in server: timestamps and response DTOs.

Split out of :mod:`tests.immich_library` to keep modules short; that module re-exports every
name here. It turns the library's records (users, assets, tags, albums, edits, metadata)
into the JSON shapes of Immich's OpenAPI spec, formats and parses Immich's timestamps, and
makes stand-in thumbhashes. It reads records and never changes them.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tests.immich_photos import ImageFacts

if TYPE_CHECKING:
    from tests.immich_library import Album, Asset, Library, MetadataEntry, Tag, User

IMAGE_DURATION = "0:00:00.00000"
MS_PER_SECOND = 1000
EPOCH = datetime(1970, 1, 1)  # naive UTC, for fast formatting
THUMBHASH_BYTES = 18
AVATAR_COLOR = "primary"
EXIF_FIELDS_UNKNOWN = (
    "city", "country", "exposureTime", "fNumber", "focalLength", "iso", "latitude",
    "lensModel", "longitude", "make", "model", "projectionType", "state", "timeZone",
)  # fmt: skip


def to_ms(moment: datetime | str) -> int:
    """Milliseconds since the epoch of a datetime or an ISO 8601 string (``Z`` allowed)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * MS_PER_SECOND)


def iso(ms: int) -> str:
    """Immich's timestamp form: UTC, milliseconds, ``Z`` (``2024-01-15T20:30:00.000Z``)."""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds") + "Z"


def user_dto(user: User) -> dict[str, Any]:
    """UserResponseDto."""
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "profileImagePath": "",
        "avatarColor": AVATAR_COLOR,
        "profileChangedAt": iso(user.created_ms),
    }


def user_admin_dto(user: User) -> dict[str, Any]:
    """UserAdminResponseDto (``GET /users/me``)."""
    return {
        **user_dto(user),
        "createdAt": iso(user.created_ms),
        "updatedAt": iso(user.created_ms),
        "deletedAt": None,
        "isAdmin": False,
        "license": None,
        "oauthId": "",
        "quotaSizeInBytes": None,
        "quotaUsageInBytes": 0,
        "shouldChangePassword": False,
        "status": "active",
        "storageLabel": None,
    }


def exif_dto(asset: Asset, taken: str) -> dict[str, Any]:
    """ExifResponseDto: what darkroom reads (description, rating, orientation) and nulls."""
    size = len(asset.source) if isinstance(asset.source, bytes) else None
    return {
        **dict.fromkeys(EXIF_FIELDS_UNKNOWN),
        "description": asset.description,
        "rating": asset.rating,
        "orientation": None if asset.orientation is None else str(asset.orientation),
        "exifImageWidth": asset.width,
        "exifImageHeight": asset.height,
        "fileSizeInByte": size,
        "dateTimeOriginal": taken,
        "modifyDate": taken,
    }


def tag_dto(tag: Tag) -> dict[str, Any]:
    """TagResponseDto (``parentId`` and ``color`` are left out when unset, as in Immich)."""
    dto: dict[str, Any] = {
        "id": tag.id,
        "name": tag.name,
        "value": tag.value,
        "createdAt": iso(tag.created_ms),
        "updatedAt": iso(tag.updated_ms),
    }
    if tag.parent_id is not None:
        dto["parentId"] = tag.parent_id
    if tag.color is not None:
        dto["color"] = tag.color
    return dto


def asset_dto(
    library: Library, asset: Asset, *, exif: bool = False, full: bool = False
) -> dict[str, Any]:
    """AssetResponseDto. Search results carry ``exifInfo`` only when ``withExif`` was asked;
    ``full`` adds what ``GET /assets/{id}`` adds (exif, tags, people, owner).
    """
    facts = ImageFacts(asset.width, asset.height, asset.orientation)
    width, height = facts.display_size
    taken = iso(asset.taken_ms)
    dto: dict[str, Any] = {
        "id": asset.id,
        "ownerId": asset.owner_id,
        "deviceAssetId": asset.device_asset_id,
        "deviceId": asset.device_id,
        "type": asset.type,
        "originalPath": f"/data/upload/{asset.owner_id}/{asset.id}/{asset.file_name}",
        "originalFileName": asset.file_name,
        "originalMimeType": asset.mime_type,
        "thumbhash": asset.thumbhash,
        "fileCreatedAt": taken,
        "fileModifiedAt": taken,
        "localDateTime": taken,
        "createdAt": iso(asset.created_ms),
        "updatedAt": iso(asset.updated_ms),
        "isFavorite": asset.is_favorite,
        "isArchived": asset.visibility == "archive",
        "isTrashed": asset.deleted_ms is not None,
        "isOffline": False,
        "isEdited": bool(asset.edits),
        "visibility": asset.visibility,
        "duration": IMAGE_DURATION,
        "hasMetadata": True,
        "checksum": asset.checksum,
        "livePhotoVideoId": asset.live_photo_video_id,
        "duplicateId": asset.duplicate_id,
        "libraryId": None,
        "width": width,
        "height": height,
    }
    if exif or full:
        dto["exifInfo"] = exif_dto(asset, taken)
    if full:
        dto["tags"] = [tag_dto(library.tags[tag_id]) for tag_id in asset.tag_ids]
        dto["people"] = []
        dto["unassignedFaces"] = []
        dto["owner"] = user_dto(library.users[asset.owner_id])
    return dto


def album_dto(library: Library, album: Album, *, with_assets: bool = False) -> dict[str, Any]:
    """AlbumResponseDto (``assets`` is empty unless ``with_assets``, as in album lists)."""
    members = [
        library.assets[asset_id] for asset_id in album.asset_ids if asset_id in library.assets
    ]
    dto: dict[str, Any] = {
        "id": album.id,
        "albumName": album.name,
        "description": album.description,
        "albumThumbnailAssetId": members[0].id if members else None,
        "albumUsers": [],
        "assetCount": len(members),
        "assets": [asset_dto(library, asset) for asset in members] if with_assets else [],
        "createdAt": iso(album.created_ms),
        "updatedAt": iso(album.updated_ms),
        "hasSharedLink": False,
        "isActivityEnabled": True,
        "owner": user_dto(library.users[album.owner_id]),
        "ownerId": album.owner_id,
        "shared": False,
        "order": "desc",
    }
    if members:
        taken = [asset.taken_ms for asset in members]
        dto["startDate"], dto["endDate"] = iso(min(taken)), iso(max(taken))
    return dto


def edits_dto(asset: Asset) -> dict[str, Any]:
    """AssetEditsResponseDto."""
    return {
        "assetId": asset.id,
        "edits": [
            {"id": e.id, "action": e.action, "parameters": e.parameters} for e in asset.edits
        ],
    }


def metadata_dto(key: str, entry: MetadataEntry) -> dict[str, Any]:
    """AssetMetadataResponseDto."""
    return {"key": key, "value": entry.value, "updatedAt": iso(entry.updated_ms)}


def thumbhash_for(checksum: str) -> str:
    """A stable stand-in thumbhash (base64, like the real one) derived from the checksum."""
    digest = hashlib.sha1(checksum.encode("ascii")).digest()[:THUMBHASH_BYTES]
    return base64.b64encode(digest).decode("ascii")
