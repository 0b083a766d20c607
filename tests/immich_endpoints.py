"""The endpoints of the stand-in Immich server: one method per operationId darkroom uses.

Split out of :mod:`tests.immich_server` to keep modules short. The server builds the
endpoint table (operationId → bound method) from :class:`_Endpoints` and calls an endpoint
with a :class:`~tests.immich_routes.Call` that is already routed, authenticated and checked
against the spec; the endpoint reads and changes the library and answers a
:class:`~tests.immich_routes.Reply` (or raises :class:`~tests.immich_routes.ApiError` for
Immich's 400s). Server info, the user and key, assets (info, update, renditions, download,
upload), edits, metadata, tags and albums are here; the metadata search is in
:mod:`tests.immich_search`. The constants are re-exported by :mod:`tests.immich_server`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from tests import immich_library as lib
from tests.immich_library import Asset, User
from tests.immich_routes import ROUTES, ApiError, Call, Reply
from tests.immich_search import _SearchEndpoints

if TYPE_CHECKING:
    from tests.immich_server import ImmichServer

DEFAULT_THUMBNAIL_SIZE = "thumbnail"
ROTATION_ANGLES = frozenset({0, 90, 180, 270})
EDIT_PARAMETERS = {
    "crop": frozenset({"x", "y", "width", "height"}),
    "rotate": frozenset({"angle"}),
    "mirror": frozenset({"axis"}),
}
#: size → (short side or None for full size, Pillow format, MIME type)
RENDITIONS = {
    "preview": (lib.PREVIEW_SHORT_SIDE, "JPEG", lib.JPEG_MIME),
    "thumbnail": (lib.THUMBNAIL_SHORT_SIDE, "WEBP", lib.WEBP_MIME),
    "fullsize": (None, "JPEG", lib.JPEG_MIME),
}
SERVER_FEATURES = {
    "configFile": False, "duplicateDetection": True, "email": False, "facialRecognition": True,
    "importFaces": False, "map": True, "oauth": False, "oauthAutoLaunch": False, "ocr": False,
    "passwordLogin": True, "reverseGeocoding": True, "search": True, "sidecar": True,
    "smartSearch": True, "trash": True,
}  # fmt: skip


def _snake(operation_id: str) -> str:
    """``getMyApiKey`` → ``get_my_api_key`` (endpoint method names)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation_id).lower()


def _edit_errors(asset: Asset, edits: list[dict[str, Any]]) -> list[str]:
    """Rules Immich's edit DTO adds to the spec: right parameters per action, axis-aligned
    rotation, crops inside the picture, one edit per action (mirror per axis).
    """
    errors: list[str] = []
    seen: set[str] = set()
    width, height = lib.ImageFacts(asset.width, asset.height, asset.orientation).display_size
    for index, edit in enumerate(edits):
        action, params = edit["action"], edit["parameters"]
        where = f"edits.{index}.parameters"
        needed = EDIT_PARAMETERS[action]
        if not needed <= params.keys():
            errors.append(f"{where} must have {', '.join(sorted(needed))} for action {action}")
        elif action == "rotate" and params["angle"] not in ROTATION_ANGLES:
            errors.append(f"{where}.angle must be one of 0, 90, 180, 270")
        elif action == "crop":
            errors += _crop_errors(where, params, width, height)
        key = f"mirror-{params.get('axis')}" if action == "mirror" else action
        if key in seen:
            errors.append("Duplicate edit actions are not allowed")
        seen.add(key)
    return errors


def _crop_errors(
    where: str, params: dict[str, Any], width: int | None, height: int | None
) -> list[str]:
    """Crop boxes must be whole pixels inside the (orientation-applied) picture."""
    if any(not float(params[key]).is_integer() for key in EDIT_PARAMETERS["crop"]):
        return [f"{where} must be integer numbers"]
    too_wide = width is not None and params["x"] + params["width"] > width
    too_tall = height is not None and params["y"] + params["height"] > height
    return [f"{where} is outside the image"] if too_wide or too_tall else []


class _Endpoints(_SearchEndpoints):
    """The endpoints darkroom uses, one method per operationId (in snake case)."""

    def __init__(self, server: ImmichServer) -> None:
        self.server = server
        self.library = server.library

    def table(self) -> dict[str, Callable[[Call], Reply]]:
        """operationId → bound endpoint method."""
        return {route.operation_id: getattr(self, _snake(route.operation_id)) for route in ROUTES}

    # ------------------------------------------------------------------ access

    def _asset(self, call: Call, *, write: bool = False) -> Asset:
        """The asset of the path's ``id`` if the user may use it (Immich's 400 otherwise)."""
        with self.library.lock:
            asset = self.library.assets.get(call.params["id"])
            allowed = asset is not None and (
                asset.owner_id == call.user.id
                if write
                else self.library.can_read(call.user.id, asset)
            )
        if not allowed or asset is None:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"Not found or no {call.route.permission} access"
            )
        return asset

    # ------------------------------------------------------------------ server & user

    def ping_server(self, call: Call) -> Reply:
        """``{"res": "pong"}``."""
        return Reply(HTTPStatus.OK, {"res": "pong"})

    def get_server_version(self, call: Call) -> Reply:
        """The configured version (2.7.5, or 3.0.0 in v3 mode)."""
        major, minor, patch = self.server.version
        return Reply(HTTPStatus.OK, {"major": major, "minor": minor, "patch": patch})

    def get_server_features(self, call: Call) -> Reply:
        """Feature flags of a plain home server."""
        return Reply(HTTPStatus.OK, dict(SERVER_FEATURES))

    def get_my_user(self, call: Call) -> Reply:
        """The key owner as UserAdminResponseDto."""
        return Reply(HTTPStatus.OK, lib.user_admin_dto(call.user))

    def get_my_api_key(self, call: Call) -> Reply:
        """The key itself with its permissions (what ``darkroom doctor`` checks)."""
        stamp = lib.iso(self.server.key_created_ms)
        body = {
            "id": self.server.key_id,
            "name": "darkroom",
            "createdAt": stamp,
            "updatedAt": stamp,
        }
        return Reply(HTTPStatus.OK, {**body, "permissions": list(self.server.permissions)})

    # ------------------------------------------------------------------ assets

    def get_asset_info(self, call: Call) -> Reply:
        """One asset with exif, tags, people and owner."""
        asset = self._asset(call)
        with self.library.lock:
            return Reply(HTTPStatus.OK, lib.asset_dto(self.library, asset, full=True))

    def update_asset(self, call: Call) -> Reply:
        """Description, rating (0 → null), favourite, visibility; other fields ignored."""
        asset = self._asset(call, write=True)
        body = call.body or {}
        rating = body.get("rating")
        if isinstance(rating, int | float) and not float(rating).is_integer():
            raise ApiError(HTTPStatus.BAD_REQUEST, ["rating must be an integer number"])
        with self.library.lock:
            if "description" in body:
                asset.description = body["description"]
            if "rating" in body:
                asset.rating = None if rating in (None, 0) else int(rating)
            if "isFavorite" in body:
                asset.is_favorite = bool(body["isFavorite"])
            if "visibility" in body:
                asset.visibility = body["visibility"]
            self.library.touch(asset)
            return Reply(HTTPStatus.OK, lib.asset_dto(self.library, asset, full=True))

    def view_asset(self, call: Call) -> Reply:
        """A derived image: preview (JPEG, 1440 short side), thumbnail (WEBP, 250), fullsize.

        Immich redirects an unedited ``fullsize`` of a JPEG to the original; the stand-in
        answers the original's bytes directly (what a client following the redirect gets).
        """
        asset = self._asset(call)
        size = call.query.get("size") or DEFAULT_THUMBNAIL_SIZE
        edited = call.query.get("edited") in (True, "true")
        if size == "original":
            raise ApiError(HTTPStatus.BAD_REQUEST, "May not request original file")
        if asset.thumbhash is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Asset media not found")
        if size == "fullsize" and not edited and asset.mime_type == lib.JPEG_MIME:
            return Reply(HTTPStatus.OK, asset.original(), asset.mime_type)
        edits = list(asset.edits) if edited else []
        short_side, fmt, mime = RENDITIONS[size]
        return Reply(HTTPStatus.OK, lib.render(asset.original(), short_side, edits, fmt), mime)

    def download_asset(self, call: Call) -> Reply:
        """The original bytes (the edited full-size JPEG with ``edited=true``)."""
        asset = self._asset(call)
        if call.query.get("edited") in (True, "true") and asset.edits:
            return Reply(
                HTTPStatus.OK,
                lib.render(asset.original(), None, list(asset.edits), "JPEG"),
                lib.JPEG_MIME,
            )
        return Reply(HTTPStatus.OK, asset.original(), asset.mime_type)

    def upload_asset(self, call: Call) -> Reply:
        """Multipart upload; an owner's existing checksum answers 200 ``duplicate``."""
        fields = call.body or {}
        if "assetData" not in call.files:
            raise ApiError(HTTPStatus.BAD_REQUEST, ["assetData is required"])
        file_name, data = call.files["assetData"]
        checksum, facts = self.library.facts(data)
        existing = self.library.find_by_checksum(call.user.id, checksum)
        if existing is not None:
            return Reply(HTTPStatus.OK, {"id": existing.id, "status": "duplicate"})
        kind = "IMAGE" if facts.width else "VIDEO"
        name = fields.get("filename") or file_name or None
        asset = self.server._new_asset(
            call.user.id, kind, fields.get("visibility", "timeline"), data, checksum, name
        )
        asset.width, asset.height, asset.orientation = facts.width, facts.height, facts.orientation
        asset.taken_ms = lib.to_ms(fields["fileCreatedAt"])
        asset.device_asset_id, asset.device_id = fields["deviceAssetId"], fields["deviceId"]
        asset.is_favorite = fields.get("isFavorite") in (True, "true")
        asset.thumbhash = (
            lib.thumbhash_for(checksum) if self.server.thumbnails_ready_on_upload else None
        )
        self.library.insert(asset)
        return Reply(HTTPStatus.CREATED, {"id": asset.id, "status": "created"})

    # ------------------------------------------------------------------ edits & metadata

    def get_asset_edits(self, call: Call) -> Reply:
        """The asset's edits (empty list when none)."""
        asset = self._asset(call)
        with self.library.lock:
            return Reply(HTTPStatus.OK, lib.edits_dto(asset))

    def edit_asset(self, call: Call) -> Reply:
        """Replace all edits (images only); bumps updatedAt."""
        asset = self._asset(call, write=True)
        edits = call.body["edits"]
        if asset.type != "IMAGE":
            raise ApiError(HTTPStatus.BAD_REQUEST, "Only images can be edited")
        errors = _edit_errors(asset, edits)
        if errors:
            raise ApiError(HTTPStatus.BAD_REQUEST, errors)
        needed = [
            (e["action"], {k: e["parameters"][k] for k in EDIT_PARAMETERS[e["action"]]})
            for e in edits
        ]
        with self.library.lock:
            self.library.set_edits(asset, needed)
            return Reply(HTTPStatus.OK, lib.edits_dto(asset))

    def remove_asset_edits(self, call: Call) -> Reply:
        """Remove all edits: 204."""
        asset = self._asset(call, write=True)
        self.library.set_edits(asset, [])
        return Reply(HTTPStatus.NO_CONTENT)

    def get_asset_metadata(self, call: Call) -> Reply:
        """Every key → JSON object stored on the asset."""
        asset = self._asset(call)
        with self.library.lock:
            return Reply(HTTPStatus.OK, [lib.metadata_dto(k, v) for k, v in asset.metadata.items()])

    def update_asset_metadata(self, call: Call) -> Reply:
        """Upsert keys; answers the items written."""
        asset = self._asset(call, write=True)
        items = [(item["key"], item["value"]) for item in call.body["items"]]
        with self.library.lock:
            keys = self.library.upsert_metadata(asset, items)
            return Reply(
                HTTPStatus.OK, [lib.metadata_dto(key, asset.metadata[key]) for key in keys]
            )

    # ------------------------------------------------------------------ tags

    def get_all_tags(self, call: Call) -> Reply:
        """The user's tags."""
        with self.library.lock:
            mine = [tag for tag in self.library.tags.values() if tag.owner_id == call.user.id]
            return Reply(HTTPStatus.OK, [lib.tag_dto(tag) for tag in mine])

    def create_tag(self, call: Call) -> Reply:
        """One tag under an optional parent; an existing value is a 400."""
        body = call.body
        with self.library.lock:
            parent = self.library.tags.get(body.get("parentId") or "")
            if body.get("parentId") and (parent is None or parent.owner_id != call.user.id):
                raise ApiError(HTTPStatus.BAD_REQUEST, "Not found or no tag.read access")
            value = f"{parent.value}/{body['name']}" if parent else body["name"]
            if self.library.find_tag(call.user.id, value) is not None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "A tag with that name already exists")
            tag = self.library.upsert_tag_path(call.user.id, value)
            tag.color = body.get("color")
            return Reply(HTTPStatus.CREATED, lib.tag_dto(tag))

    def upsert_tags(self, call: Call) -> Reply:
        """Create ``a/b/c`` values with their parents; answers the leaf of each."""
        try:
            with self.library.lock:
                leaves = [
                    self.library.upsert_tag_path(call.user.id, value) for value in call.body["tags"]
                ]
                return Reply(HTTPStatus.OK, [lib.tag_dto(tag) for tag in leaves])
        except ValueError as error:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, ["tags must not contain empty values"]
            ) from error

    def bulk_tag_assets(self, call: Call) -> Reply:
        """Tag every writable asset with every tag; answers how many links are new."""
        tag_ids, asset_ids = call.body["tagIds"], call.body["assetIds"]
        with self.library.lock:
            tags = [self.library.tags.get(tag_id) for tag_id in tag_ids]
            if any(tag is None or tag.owner_id != call.user.id for tag in tags):
                raise ApiError(
                    HTTPStatus.BAD_REQUEST, f"Not found or no {call.route.permission} access"
                )
            assets = [self.library.assets.get(asset_id) for asset_id in asset_ids]
            mine = [
                asset for asset in assets if asset is not None and asset.owner_id == call.user.id
            ]
            count = sum(
                self.library.tag_asset(asset, tag_id) for asset in mine for tag_id in tag_ids
            )
        return Reply(HTTPStatus.OK, {"count": count})

    # ------------------------------------------------------------------ albums

    def get_all_albums(self, call: Call) -> Reply:
        """The user's albums (``assetId`` narrows to albums holding that asset)."""
        wanted = call.query.get("assetId")
        with self.library.lock:
            albums = [
                album
                for album in self.library.albums.values()
                if album.owner_id == call.user.id and (wanted is None or wanted in album.asset_ids)
            ]
            return Reply(HTTPStatus.OK, [lib.album_dto(self.library, album) for album in albums])

    def create_album(self, call: Call) -> Reply:
        """A new album, with the readable ones of ``assetIds``."""
        body = call.body
        with self.library.lock:
            stamp = self.library.tick()
            album = lib.Album(
                lib.new_id(),
                call.user.id,
                body["albumName"],
                body.get("description", ""),
                stamp,
                stamp,
            )
            self.library.albums[album.id] = album
            for asset_id in body.get("assetIds", []):
                asset = self.library.assets.get(asset_id)
                if asset is not None and self.library.can_read(call.user.id, asset):
                    self.library.add_to_album(album, asset)
            return Reply(HTTPStatus.CREATED, lib.album_dto(self.library, album, with_assets=True))

    def add_assets_to_album(self, call: Call) -> Reply:
        """Add assets; each answer says success, ``duplicate`` or ``no_permission``."""
        with self.library.lock:
            album = self.library.albums.get(call.params["id"])
            if album is None or album.owner_id != call.user.id:
                raise ApiError(
                    HTTPStatus.BAD_REQUEST, f"Not found or no {call.route.permission} access"
                )
            return Reply(
                HTTPStatus.OK,
                [self._add_one(album, asset_id, call.user) for asset_id in call.body["ids"]],
            )

    def _add_one(self, album: lib.Album, asset_id: str, user: User) -> dict[str, Any]:
        """One BulkIdResponseDto of an album addition."""
        asset = self.library.assets.get(asset_id)
        if asset is None or not self.library.can_read(user.id, asset):
            return {"id": asset_id, "success": False, "error": "no_permission"}
        if not self.library.add_to_album(album, asset):
            return {"id": asset_id, "success": False, "error": "duplicate"}
        return {"id": asset_id, "success": True}
