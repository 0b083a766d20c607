"""The endpoints of the Immich API that darkroom uses, each a few lines over ``Transport``.

Synchronous by choice: darkroom's work is a handful of threads each waiting on a vision
model for seconds per photo, so an event loop would buy nothing and cost clarity.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import TypeAdapter

from immich_client.errors import ImmichProtocolError, ImmichTooLargeError
from immich_client.models import (
    ROTATE_ACTION,
    Album,
    ApiKeyInfo,
    Asset,
    AssetEdit,
    AssetEdits,
    AssetSummary,
    AssetType,
    BulkIdResult,
    MetadataItem,
    SearchPage,
    SearchResponse,
    ServerVersion,
    Tag,
    TagAssetsResult,
    ThumbnailSize,
    UploadResult,
    User,
    Visibility,
)
from immich_client.transport import RetryPolicy, Transport

MAX_PAGE_SIZE = 1000
READ_AHEAD = 2
DOWNLOAD_CHUNK = 256 * 1024
DEVICE_ID = "darkroom"

# The permission each endpoint needs (the spec's x-immich-permission); tests hold this
# table to the real OpenAPI spec.  None: any valid key may call it.
PERMISSIONS: dict[str, str | None] = {
    "GET /server/ping": None,
    "GET /server/version": None,
    "GET /server/features": None,
    "GET /api-keys/me": None,
    "GET /users/me": "user.read",
    "POST /search/metadata": "asset.read",
    "GET /assets/{id}": "asset.read",
    "PUT /assets/{id}": "asset.update",
    "GET /assets/{id}/thumbnail": "asset.view",
    "GET /assets/{id}/original": "asset.download",
    "GET /assets/{id}/edits": "asset.edit.get",
    "PUT /assets/{id}/edits": "asset.edit.create",
    "DELETE /assets/{id}/edits": "asset.edit.delete",
    "GET /assets/{id}/metadata": "asset.read",
    "PUT /assets/{id}/metadata": "asset.update",
    "PUT /tags": "tag.create",
    "PUT /tags/assets": "tag.asset",
    "GET /albums": "album.read",
    "POST /albums": "album.create",
    "PUT /albums/{id}/assets": "albumAsset.create",
    "POST /assets": "asset.upload",
}

_UNSET: Any = object()
_ASSET_LIST = TypeAdapter(list[Asset])
_METADATA_LIST = TypeAdapter(list[MetadataItem])
_TAG_LIST = TypeAdapter(list[Tag])
_ALBUM_LIST = TypeAdapter(list[Album])
_BULK_LIST = TypeAdapter(list[BulkIdResult])


def _iso(moment: datetime) -> str:
    """Immich's date-time form: UTC with milliseconds and a Z."""
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(model: Any, response: httpx.Response, what: str) -> Any:
    """Validate a JSON body into ``model`` (a model class or a TypeAdapter).

    Parsed straight from bytes by pydantic-core (no json.loads pass); anything that does
    not fit becomes an ImmichProtocolError naming the endpoint.
    """
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(response.content)
        return model.model_validate_json(response.content)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ImmichProtocolError(f"{what}: unexpected answer from Immich: {exc}") from None


def _date_header(response: httpx.Response) -> datetime | None:
    """Immich's clock when it answered (the Date header, to the second), if it said."""
    try:
        return parsedate_to_datetime(response.headers["date"])
    except (KeyError, TypeError, ValueError):
        return None


def _next_position(page: SearchPage) -> dict[str, Any] | None:
    """Where the next page starts: v3's cursor when offered, else the page number."""
    if page.next_cursor:
        return {"cursor": page.next_cursor}
    if page.next_page:
        return {"page": int(page.next_page)}
    return None


class ImmichClient:
    """A typed client for one Immich server; use as a context manager or call close()."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        **transport_options: Any,
    ) -> None:
        self._t = Transport(
            base_url,
            api_key,
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
            **transport_options,
        )

    @property
    def base_url(self) -> str:
        """The API root, always ending in ``/api/``."""
        return self._t.base_url

    def close(self) -> None:
        """Release pooled connections."""
        self._t.close()

    def __enter__(self) -> ImmichClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- server and identity -------------------------------------------------------------

    def ping(self) -> bool:
        """True when the server answers ``pong``."""
        response = self._t.request("GET", "server/ping")
        return response.json().get("res") == "pong"

    def version(self) -> ServerVersion:
        """The server's version."""
        return _parse(ServerVersion, self._t.request("GET", "server/version"), "server/version")

    def features(self) -> dict[str, bool]:
        """Feature flags (``duplicateDetection``, ``smartSearch``, …)."""
        body = self._t.request("GET", "server/features").json()
        return {name: value for name, value in body.items() if isinstance(value, bool)}

    def api_key_info(self) -> ApiKeyInfo:
        """The key in use and its permissions."""
        return _parse(ApiKeyInfo, self._t.request("GET", "api-keys/me"), "api-keys/me")

    def me(self) -> User:
        """The user who owns the key."""
        return _parse(User, self._t.request("GET", "users/me"), "users/me")

    # -- search --------------------------------------------------------------------------

    def search_pages(
        self,
        *,
        updated_after: datetime | None = None,
        visibility: Visibility | None = None,
        asset_type: AssetType | None = None,
        with_deleted: bool = False,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[SearchPage]:
        """Every page of a metadata search, following ``nextCursor`` or ``nextPage``."""
        body: dict[str, Any] = {"size": min(page_size, MAX_PAGE_SIZE), "withDeleted": with_deleted}
        if updated_after is not None:
            body["updatedAfter"] = _iso(updated_after)
        if visibility is not None:
            body["visibility"] = visibility
        if asset_type is not None:
            body["type"] = asset_type
        # Read ahead, so pages are on their way while the caller works: with page numbers,
        # READ_AHEAD pages at once (once a second page is known to exist); with v3's
        # cursor, the next one as soon as its cursor is known.
        with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="immich-search") as ahead:
            queued = deque([ahead.submit(self._search_page, body, {"page": 1})])
            requested = 1
            while queued:
                page = queued.popleft().result()
                position = _next_position(page)
                if position is None:
                    yield page
                    return
                if "cursor" in position:
                    queued.append(ahead.submit(self._search_page, body, position))
                else:
                    while len(queued) < READ_AHEAD:
                        requested += 1
                        queued.append(ahead.submit(self._search_page, body, {"page": requested}))
                yield page

    def _search_page(self, body: dict[str, Any], position: dict[str, Any]) -> SearchPage:
        response = self._t.request("POST", "search/metadata", json=body | position, idempotent=True)
        page = _parse(SearchResponse, response, "search/metadata").assets
        return page.model_copy(update={"served_at": _date_header(response)})

    def search_assets(self, **filters: Any) -> Iterator[AssetSummary]:
        """Every asset a metadata search finds (see ``search_pages`` for the filters)."""
        for page in self.search_pages(**filters):
            yield from page.items

    # -- one asset -----------------------------------------------------------------------

    def get_asset(self, asset_id: str) -> Asset:
        """One asset with its EXIF block (description, rating) and tags."""
        return _parse(Asset, self._t.request("GET", f"assets/{asset_id}"), "assets/{id}")

    def update_asset(
        self, asset_id: str, *, description: str | None = _UNSET, rating: int | None = _UNSET
    ) -> Asset:
        """Set the description and/or star rating (1–5; None clears it)."""
        body: dict[str, Any] = {}
        if description is not _UNSET:
            body["description"] = description
        if rating is not _UNSET:
            body["rating"] = rating
        response = self._t.request("PUT", f"assets/{asset_id}", json=body)
        return _parse(Asset, response, "assets/{id}")

    def get_edits(self, asset_id: str) -> AssetEdits:
        """The non-destructive edits (crop, rotate, mirror) on an asset, in order."""
        return _parse(AssetEdits, self._t.request("GET", f"assets/{asset_id}/edits"), "edits")

    def put_edits(self, asset_id: str, edits: Iterable[AssetEdit]) -> AssetEdits:
        """Replace all edits of an asset with ``edits``."""
        body = {"edits": [{"action": e.action, "parameters": e.parameters} for e in edits]}
        response = self._t.request("PUT", f"assets/{asset_id}/edits", json=body)
        return _parse(AssetEdits, response, "edits")

    def delete_edits(self, asset_id: str) -> None:
        """Remove every edit of an asset."""
        self._t.request("DELETE", f"assets/{asset_id}/edits")

    def add_rotation(self, asset_id: str, angle: int) -> AssetEdits:
        """Append a clockwise rotate edit, keeping the edits already there."""
        current = self.get_edits(asset_id).edits
        rotate = AssetEdit(action=ROTATE_ACTION, parameters={"angle": angle})
        return self.put_edits(asset_id, [*current, rotate])

    def get_metadata(self, asset_id: str) -> list[MetadataItem]:
        """Every metadata key stored on an asset."""
        response = self._t.request("GET", f"assets/{asset_id}/metadata")
        return _parse(_METADATA_LIST, response, "metadata")

    def put_metadata(self, asset_id: str, key: str, value: dict[str, Any]) -> list[MetadataItem]:
        """Store a JSON object under ``key`` on an asset (replacing that key only)."""
        body = {"items": [{"key": key, "value": value}]}
        response = self._t.request("PUT", f"assets/{asset_id}/metadata", json=body)
        return _parse(_METADATA_LIST, response, "metadata")

    # -- downloads -----------------------------------------------------------------------

    def thumbnail_bytes(
        self,
        asset_id: str,
        *,
        max_bytes: int,
        size: ThumbnailSize = "preview",
        edited: bool = False,
    ) -> bytes:
        """A rendition JPEG (preview: 1440 px short side, EXIF orientation applied).

        ``edited``: with the asset's edits (crop, rotation, mirror) applied.
        """
        params = {"size": size} | ({"edited": "true"} if edited else {})
        return self._download(f"assets/{asset_id}/thumbnail", params, max_bytes)

    def original_bytes(self, asset_id: str, *, max_bytes: int, edited: bool = False) -> bytes:
        """The original file as uploaded (``edited``: a full-size JPEG with edits applied)."""
        params = {"edited": "true"} if edited else {}
        return self._download(f"assets/{asset_id}/original", params, max_bytes)

    def save_original(self, asset_id: str, dest: Path, *, max_bytes: int) -> int:
        """Stream the original into ``dest`` (written whole or not at all); return its size."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                size = self._stream(f"assets/{asset_id}/original", {}, max_bytes, handle.write)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, dest)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return size

    def _download(self, path: str, params: dict[str, str], max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        self._stream(path, params, max_bytes, chunks.append)
        return b"".join(chunks)

    def _stream(self, path: str, params: dict[str, str], max_bytes: int, sink: Any) -> int:
        """Feed the body to ``sink`` chunk by chunk, refusing it once past ``max_bytes``."""
        response = self._t.request("GET", path, params=params, stream=True)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and int(declared) > max_bytes:
                raise ImmichTooLargeError(f"GET /api/{path}: {declared} bytes exceeds {max_bytes}")
            received = 0
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise ImmichTooLargeError(f"GET /api/{path}: more than {max_bytes} bytes")
                sink(chunk)
            return received
        finally:
            response.close()

    # -- tags, albums, uploads -----------------------------------------------------------

    def upsert_tags(self, values: Iterable[str]) -> list[Tag]:
        """Create (or find) tags by full path such as ``darkroom/score/7``, parents too."""
        response = self._t.request("PUT", "tags", json={"tags": list(values)})
        return _parse(_TAG_LIST, response, "tags")

    def tag_assets(self, tag_ids: Iterable[str], asset_ids: Iterable[str]) -> int:
        """Put every tag on every asset; return how many new pairs Immich made."""
        body = {"tagIds": list(tag_ids), "assetIds": list(asset_ids)}
        response = self._t.request("PUT", "tags/assets", json=body)
        return _parse(TagAssetsResult, response, "tags/assets").count

    def list_albums(self, *, containing: str | None = None) -> list[Album]:
        """The albums the user owns or has been shared (only those holding an asset, if given)."""
        params = {"assetId": containing} if containing else {}
        return _parse(_ALBUM_LIST, self._t.request("GET", "albums", params=params), "albums")

    def create_album(self, name: str, *, description: str = "") -> Album:
        """Create an empty album."""
        body = {"albumName": name, "description": description}
        return _parse(Album, self._t.request("POST", "albums", json=body), "albums")

    def add_to_album(self, album_id: str, asset_ids: Iterable[str]) -> list[BulkIdResult]:
        """Add assets to an album; assets already there come back as ``duplicate``."""
        body = {"ids": list(asset_ids)}
        response = self._t.request("PUT", f"albums/{album_id}/assets", json=body)
        return _parse(_BULK_LIST, response, "albums/{id}/assets")

    def upload_asset(
        self, data: bytes, filename: str, *, taken_at: datetime, device_asset_id: str | None = None
    ) -> UploadResult:
        """Upload an image; Immich answers ``duplicate`` when it already has these bytes."""
        stamp = _iso(taken_at)
        form = {
            "deviceAssetId": device_asset_id or hashlib.sha1(data).hexdigest(),
            "deviceId": DEVICE_ID,
            "fileCreatedAt": stamp,
            "fileModifiedAt": stamp,
            "filename": filename,
        }
        files = {"assetData": (filename, data, "application/octet-stream")}
        response = self._t.request("POST", "assets", data=form, files=files)
        return _parse(UploadResult, response, "assets")
