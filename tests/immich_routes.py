"""The request and reply types shared by the stand-in Immich server and its endpoints.

Split out of :mod:`tests.immich_server` so that :mod:`tests.immich_endpoints`,
:mod:`tests.immich_search` and :mod:`tests.immich_controls` can use them without importing
the server (which imports them: no import cycle). Holds the routes the stand-in serves
(:data:`ROUTES`, keyed like the spec), a parsed request as an endpoint sees it
(:class:`Call`), what an endpoint answers (:class:`Reply`), Immich's error answer
(:class:`ApiError`) and the request log entry (:class:`RequestRecord`). All are re-exported
by :mod:`tests.immich_server`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from tests.immich_spec import JSON_TYPE, template_regex

if TYPE_CHECKING:
    from tests.immich_library import User

FaultTarget = str | tuple[str, str]


class ApiError(Exception):
    """An error answer in Immich's shape (``message``, ``error``, ``statusCode``)."""

    def __init__(
        self, status: int, message: str | list[str], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Reply:
    """What an endpoint answers: a status and a JSON value or raw bytes."""

    status: int
    body: Any = None
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """One operation the stand-in serves, keyed like the spec (path relative to /api)."""

    method: str
    template: str
    operation_id: str
    permission: str | None
    public: bool = False

    @cached_property
    def regex(self) -> Any:
        """Pattern matching concrete paths of this route."""
        return template_regex(self.template)

    def targeted_by(self, target: FaultTarget) -> bool:
        """Whether a fault target ("*", an operationId or (method, template)) names this."""
        if isinstance(target, tuple):
            return (target[0].upper(), target[1]) == (self.method, self.template)
        return target in ("*", self.operation_id)


ROUTES = (
    Route("GET", "/server/ping", "pingServer", None, public=True),
    Route("GET", "/server/version", "getServerVersion", None, public=True),
    Route("GET", "/server/features", "getServerFeatures", None, public=True),
    Route("GET", "/users/me", "getMyUser", "user.read"),
    Route("GET", "/api-keys/me", "getMyApiKey", None),
    Route("POST", "/search/metadata", "searchAssets", "asset.read"),
    Route("POST", "/assets", "uploadAsset", "asset.upload"),
    Route("GET", "/assets/{id}", "getAssetInfo", "asset.read"),
    Route("PUT", "/assets/{id}", "updateAsset", "asset.update"),
    Route("GET", "/assets/{id}/thumbnail", "viewAsset", "asset.view"),
    Route("GET", "/assets/{id}/original", "downloadAsset", "asset.download"),
    Route("GET", "/assets/{id}/edits", "getAssetEdits", "asset.edit.get"),
    Route("PUT", "/assets/{id}/edits", "editAsset", "asset.edit.create"),
    Route("DELETE", "/assets/{id}/edits", "removeAssetEdits", "asset.edit.delete"),
    Route("GET", "/assets/{id}/metadata", "getAssetMetadata", "asset.read"),
    Route("PUT", "/assets/{id}/metadata", "updateAssetMetadata", "asset.update"),
    Route("GET", "/tags", "getAllTags", "tag.read"),
    Route("POST", "/tags", "createTag", "tag.create"),
    Route("PUT", "/tags", "upsertTags", "tag.create"),
    Route("PUT", "/tags/assets", "bulkTagAssets", "tag.asset"),
    Route("GET", "/albums", "getAllAlbums", "album.read"),
    Route("POST", "/albums", "createAlbum", "album.create"),
    Route("PUT", "/albums/{id}/assets", "addAssetsToAlbum", "albumAsset.create"),
)


@dataclass
class Call:
    """One request, parsed and checked, as an endpoint sees it."""

    route: Route
    user: User
    params: dict[str, str]
    query: dict[str, Any]
    body: Any = None
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """One logged request; ``status`` is None when the connection was dropped."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None = None
    operation_id: str | None = None
