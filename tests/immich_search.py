"""The metadata search endpoint of the stand-in Immich server: filters, order and paging.

Split out of :mod:`tests.immich_endpoints` to keep modules short; :class:`_Endpoints`
inherits :class:`_SearchEndpoints`, so ``searchAssets`` is in the endpoint table like every
other operation. It turns a ``POST /search/metadata`` body into the library's hashable
:class:`SearchFilter` (own and partners' assets; checksums as base64 or hex), pages by
``page`` and ``size`` (v2) or by the opaque v3 ``cursor``, and answers filters the stand-in
does not model with 501 instead of ignoring them. The constants are re-exported by
:mod:`tests.immich_server`.
"""

from __future__ import annotations

import base64
import binascii
import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from tests import immich_library as lib
from tests.immich_library import Asset, Library, SearchFilter, User
from tests.immich_routes import ApiError, Call, Reply

if TYPE_CHECKING:
    from tests.immich_server import ImmichServer

DEFAULT_PAGE_SIZE = 250
UNMODELLED_SEARCH_FIELDS = frozenset(
    {
        "albumIds",
        "city",
        "country",
        "description",
        "deviceAssetId",
        "deviceId",
        "encodedVideoPath",
        "isEncoded",
        "isMotion",
        "isNotInAlbum",
        "isOffline",
        "lensModel",
        "libraryId",
        "make",
        "model",
        "ocr",
        "originalFileName",
        "originalPath",
        "personIds",
        "previewPath",
        "rating",
        "state",
        "tagIds",
        "thumbnailPath",
    }
)
BASE64_SHA1_LENGTH = 28
EMPTY_ALBUM_RESULTS = {"total": 0, "count": 0, "items": [], "facets": []}


def _encode_cursor(asset: Asset) -> str:
    """v3's opaque ``nextCursor``: the last item's sort key."""
    return base64.urlsafe_b64encode(json.dumps([asset.taken_ms, asset.id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[int, str]:
    """The sort key inside a cursor; 400 when it is not one of ours."""
    try:
        taken_ms, asset_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return int(taken_ms), str(asset_id)
    except (ValueError, TypeError, binascii.Error) as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, ["cursor is invalid"]) from error


def _base64_checksum(checksum: str | None) -> str | None:
    """Immich takes a checksum as base64 (28 characters) or hex; compare as base64."""
    if checksum is None or len(checksum) == BASE64_SHA1_LENGTH:
        return checksum
    try:
        return base64.b64encode(bytes.fromhex(checksum)).decode()
    except ValueError:
        return checksum


class _SearchEndpoints:
    """``POST /search/metadata``; mixed into :class:`tests.immich_endpoints._Endpoints`."""

    server: ImmichServer
    library: Library

    def search_assets(self, call: Call) -> Reply:
        """``POST /search/metadata``: filter, order, page (and v3 cursor)."""
        body = call.body or {}
        unmodelled = sorted(UNMODELLED_SEARCH_FIELDS & body.keys())
        if unmodelled:
            message = f"the stand-in does not model search filters {unmodelled}"
            raise ApiError(HTTPStatus.NOT_IMPLEMENTED, message)
        flt = self._search_filter(call.user, body)
        descending = body.get("order", "desc") == "desc"
        size, page = int(body.get("size") or DEFAULT_PAGE_SIZE), int(body.get("page") or 1)
        cursor = body.get("cursor") if self.server.v3 else None
        if cursor:
            start = self.library.position_after(flt, descending, _decode_cursor(cursor))
        else:
            start = (page - 1) * size
        result = self.library.page(flt, descending, start, size)
        assets = self._search_results(result, bool(body.get("withExif")))
        if result.next_index is not None and not cursor:
            assets["nextPage"] = str(page + 1)
        return Reply(HTTPStatus.OK, {"albums": dict(EMPTY_ALBUM_RESULTS), "assets": assets})

    def _search_results(self, result: lib.SearchPage, with_exif: bool) -> dict[str, Any]:
        """SearchAssetResponseDto of one page (``nextPage`` null; v3 adds ``nextCursor``)."""
        with self.library.lock:
            items = [lib.asset_dto(self.library, a, exif=with_exif) for a in result.items]
        assets: dict[str, Any] = {"total": len(items), "count": len(items), "items": items}
        assets |= {"facets": [], "nextPage": None}
        if self.server.v3:
            more = result.next_index is not None
            assets["nextCursor"] = _encode_cursor(result.items[-1]) if more else None
        return assets

    def _search_filter(self, user: User, body: dict[str, Any]) -> SearchFilter:
        """The hashable filter of a search body; own and partners' assets."""
        with self.library.lock:
            partners = {other.id for other in self.library.users.values() if other.partner}

        def ms(key: str) -> int | None:
            return lib.to_ms(body[key]) if body.get(key) else None

        return SearchFilter(
            user_ids=frozenset({user.id} | partners),
            visibility=body.get("visibility"),
            with_deleted=bool(body.get("withDeleted")),
            asset_type=body.get("type"),
            is_favorite=body.get("isFavorite"),
            asset_id=body.get("id"),
            checksum=_base64_checksum(body.get("checksum")),
            updated_after=ms("updatedAfter"),
            updated_before=ms("updatedBefore"),
            taken_after=ms("takenAfter"),
            taken_before=ms("takenBefore"),
            created_after=ms("createdAfter"),
            created_before=ms("createdBefore"),
            trashed_after=ms("trashedAfter"),
            trashed_before=ms("trashedBefore"),
        )
