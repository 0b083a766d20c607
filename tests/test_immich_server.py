"""Tests of the stand-in Immich server itself, spoken to with plain httpx."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import ImmichFactory
from tests.immich_library import make_jpeg
from tests.immich_server import ROUTES, ImmichServer
from tests.immich_spec import SPEC_MISSING_REASON, ImmichSpec, load_spec

PAGE = 1000
ANGLE = 90


def api(server: ImmichServer, key: str | None = "default") -> httpx.Client:
    """An httpx client for ``server``'s /api with its key (or ``key``, or none)."""
    headers = {} if key is None else {"x-api-key": server.api_key if key == "default" else key}
    return httpx.Client(base_url=f"{server.url}/api", headers=headers, timeout=10)


@pytest.fixture
def client(immich: ImmichServer) -> Iterator[httpx.Client]:
    """A client of the ``immich`` fixture with the right key."""
    with api(immich) as http:
        yield http


@pytest.fixture
def spec() -> ImmichSpec:
    """The real spec; tests about spec checking skip (saying why) without it."""
    if SPEC_MISSING_REASON is not None:
        pytest.skip(SPEC_MISSING_REASON)
    loaded = load_spec()
    assert loaded is not None
    return loaded


def search(http: httpx.Client, **body: Any) -> dict[str, Any]:
    """POST /search/metadata and return the ``assets`` part."""
    response = http.post("/search/metadata", json=body)
    assert response.status_code == httpx.codes.OK, response.text
    return response.json()["assets"]


def all_ids(http: httpx.Client, **body: Any) -> list[str]:
    """Every id a search returns, following ``nextPage``."""
    ids: list[str] = []
    page: int | None = 1
    while page is not None:
        assets = search(http, page=page, **body)
        ids += [item["id"] for item in assets["items"]]
        page = int(assets["nextPage"]) if assets["nextPage"] is not None else None
    return ids


# ---------------------------------------------------------------------------- spec


def test_routes_match_the_spec_operations_and_permissions(spec: ImmichSpec) -> None:
    for route in ROUTES:
        op = spec.operation(route.method, route.template)
        assert op is not None, route
        assert op.operation_id == route.operation_id
        assert op.permission == route.permission
        assert op.authenticated != route.public


@pytest.mark.usefixtures("spec")
def test_bad_requests_get_immich_like_400s(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()
    rating = client.put(f"/assets/{asset_id}", json={"rating": 7})
    size = client.get(f"/assets/{asset_id}/thumbnail", params={"size": "5000"})
    bad_id = client.get("/assets/not-a-uuid")
    page = client.post("/search/metadata", json={"size": 5000, "updatedAfter": "yesterday"})

    assert rating.status_code == httpx.codes.BAD_REQUEST
    body = rating.json()
    assert body["message"] == ["rating must not be greater than 5"]
    assert (body["error"], body["statusCode"]) == ("Bad Request", 400)
    assert body["correlationId"]
    assert "size must be one of the following values" in size.json()["message"][0]
    assert bad_id.json()["message"] == ["id must be a UUID"]
    assert page.json()["message"] == [
        "size must not be greater than 1000",
        "updatedAfter must be a valid ISO 8601 date string",
    ]


def test_unknown_fields_are_ignored_and_rating_zero_is_unrated(
    immich: ImmichServer, client: httpx.Client
) -> None:
    asset_id = immich.add_asset(rating=3)

    response = client.put(f"/assets/{asset_id}", json={"rating": 0, "orientation": 6})

    assert response.status_code == httpx.codes.OK
    assert response.json()["exifInfo"]["rating"] is None
    assert immich.asset(asset_id).rating is None


def test_a_response_outside_the_spec_is_recorded(
    spec: ImmichSpec, immich: ImmichServer, client: httpx.Client
) -> None:
    asset_id = immich.add_asset()
    immich.corrupt("getAssetInfo", lambda body: {**body, "isFavorite": "yes", "checksum": None})

    client.get(f"/assets/{asset_id}")

    assert sorted(immich.spec_violations) == [
        "getAssetInfo 200: checksum must be a string",
        "getAssetInfo 200: isFavorite must be a boolean value",
    ]
    immich.spec_violations.clear()  # the fixture would fail this test otherwise


def test_without_the_spec_the_server_works_and_skips_checks(make_immich: ImmichFactory) -> None:
    server = make_immich(spec=None)
    server.corrupt("getAssetInfo", lambda body: {**body, "isFavorite": "yes"})
    asset_id = server.add_asset()
    with api(server) as http:
        assert http.get(f"/assets/{asset_id}").json()["isFavorite"] == "yes"
        assert http.get("/assets/not-a-uuid").status_code == httpx.codes.BAD_REQUEST
    assert server.spec_violations == []


def test_a_crash_of_the_stand_in_is_a_500_and_recorded(make_immich: ImmichFactory) -> None:
    server = make_immich(spec=None)  # unchecked, so a malformed body reaches the endpoint
    asset_id = server.add_asset()
    with api(server) as http:
        response = http.put(f"/assets/{asset_id}/edits", json={"no": "edits"})

    assert response.status_code == httpx.codes.INTERNAL_SERVER_ERROR
    assert "KeyError" in server.crashes[0]
    server.crashes.clear()


# ---------------------------------------------------------------------------- auth


def test_auth_needs_the_api_key(immich: ImmichServer) -> None:
    with api(immich, key=None) as anonymous, api(immich, key="wrong") as wrong:
        assert anonymous.get("/server/ping").json() == {"res": "pong"}
        missing = anonymous.get("/users/me")
        invalid = wrong.get("/users/me")

    assert missing.status_code == invalid.status_code == httpx.codes.UNAUTHORIZED
    assert missing.json()["message"] == "Authentication required"
    assert invalid.json()["message"] == "Invalid API key"
    assert invalid.json()["error"] == "Unauthorized"


def test_permissions_are_enforced(make_immich: ImmichFactory) -> None:
    server = make_immich(permissions=["asset.read"])
    asset_id = server.add_asset()
    with api(server) as http:
        assert http.get(f"/assets/{asset_id}").status_code == httpx.codes.OK
        denied = http.put(f"/assets/{asset_id}", json={"description": "x"})
        key = http.get("/api-keys/me")

    assert denied.status_code == httpx.codes.FORBIDDEN
    assert denied.json()["message"] == "Missing required permission: asset.update"
    assert denied.json()["error"] == "Forbidden"
    assert key.json()["permissions"] == ["asset.read"]


def test_unknown_paths_are_404_and_unmodelled_spec_paths_501(client: httpx.Client) -> None:
    unmodelled = httpx.codes.NOT_FOUND if SPEC_MISSING_REASON else httpx.codes.NOT_IMPLEMENTED

    assert client.get("/no/such/thing").status_code == httpx.codes.NOT_FOUND
    assert client.get("/server/about").status_code == unmodelled
    assert client.get("/server/ping", params={"extra": "ignored"}).status_code == httpx.codes.OK


# ---------------------------------------------------------------------------- search


def test_paging_by_1000_with_a_partial_last_page(
    immich: ImmichServer, client: httpx.Client
) -> None:
    ids = {immich.add_asset(b"same bytes") for _ in range(2 * PAGE + 500)}

    pages = [search(client, page=number, size=PAGE) for number in (1, 2, 3)]

    assert [page["nextPage"] for page in pages] == ["2", "3", None]
    assert [page["count"] for page in pages] == [PAGE, PAGE, 500]
    seen = [item["id"] for page in pages for item in page["items"]]
    assert len(seen) == len(ids) and set(seen) == ids
    taken = [item["fileCreatedAt"] for page in pages for item in page["items"]]
    assert taken == sorted(taken, reverse=True)


def test_order_asc_is_oldest_first(immich: ImmichServer, client: httpx.Client) -> None:
    old = immich.add_asset(taken_at="2001-01-01T00:00:00.000Z")
    new = immich.add_asset(taken_at="2024-01-01T00:00:00.000Z")

    assert all_ids(client, order="asc") == [old, new]
    assert all_ids(client) == [new, old]


def test_an_exact_multiple_ends_without_a_next_page(
    immich: ImmichServer, client: httpx.Client
) -> None:
    for _ in range(PAGE):
        immich.add_asset(b"x")

    assert search(client, size=PAGE)["nextPage"] is None


def test_partner_assets_are_included_others_are_not(
    immich: ImmichServer, client: httpx.Client
) -> None:
    partner = immich.add_user("Partner", partner=True)
    stranger = immich.add_user("Stranger", partner=False)
    mine, theirs = immich.add_asset(), immich.add_asset(owner_id=partner)
    immich.add_asset(owner_id=stranger)

    items = search(client)["items"]

    assert {(item["id"], item["ownerId"]) for item in items} == {
        (mine, immich.owner.id),
        (theirs, partner),
    }
    refused = client.put(f"/assets/{theirs}", json={"description": "mine now"})
    assert refused.status_code == httpx.codes.BAD_REQUEST
    assert refused.json()["message"] == "Not found or no asset.update access"


def test_trash_is_hidden_unless_with_deleted(immich: ImmichServer, client: httpx.Client) -> None:
    kept, binned, gone = immich.add_asset(), immich.add_asset(trashed=True), immich.add_asset()
    immich.hard_delete(gone)

    assert all_ids(client) == [kept]
    assert set(all_ids(client, withDeleted=True)) == {kept, binned}
    assert client.get(f"/assets/{gone}").status_code == httpx.codes.BAD_REQUEST


def test_visibility_one_per_query_default_all_but_locked(
    immich: ImmichServer, client: httpx.Client
) -> None:
    photo = immich.add_asset(live_photo=True)
    archived = immich.add_asset(visibility="archive")
    immich.add_asset(visibility="locked")
    motion = search(client, visibility="hidden")["items"][0]  # the live photo's video half

    assert all_ids(client, visibility="timeline") == [photo]
    assert all_ids(client, visibility="archive") == [archived]
    assert set(all_ids(client)) == {photo, archived, motion["id"]}
    assert motion["type"] == "VIDEO"
    assert client.get(f"/assets/{photo}").json()["livePhotoVideoId"] == motion["id"]


def test_writes_bump_updated_at_and_updated_after_finds_them(
    immich: ImmichServer, client: httpx.Client
) -> None:
    first, second = immich.add_asset(), immich.add_asset()
    newest = search(client, id=second)["items"][0]["updatedAt"]
    client.put(f"/assets/{first}", json={"description": "a dog"})

    changed = search(client, updatedAfter=newest, withExif=True)["items"]

    assert {item["id"] for item in changed} == {first, second}  # updatedAfter is inclusive
    edited = next(item for item in changed if item["id"] == first)
    assert edited["updatedAt"] > newest
    assert edited["exifInfo"]["description"] == "a dog"
    assert "exifInfo" not in search(client)["items"][0]


def test_v3_mode_pages_by_cursor(make_immich: ImmichFactory) -> None:
    server = make_immich(v3=True)
    ids = {server.add_asset(b"y") for _ in range(25)}
    seen: list[str] = []
    cursor: str | None = None
    with api(server) as http:
        while True:
            body: dict[str, Any] = {"size": 10} | ({"cursor": cursor} if cursor else {})
            assets = search(http, **body)
            seen += [item["id"] for item in assets["items"]]
            cursor = assets["nextCursor"]
            if cursor is None:
                break

    assert len(seen) == len(ids) and set(seen) == ids


def test_v2_mode_ignores_cursor_and_has_no_next_cursor(
    immich: ImmichServer, client: httpx.Client
) -> None:
    for _ in range(3):
        immich.add_asset(b"z")

    assets = search(client, size=2, cursor="anything")

    assert "nextCursor" not in assets
    assert assets["nextPage"] == "2"


# ---------------------------------------------------------------------------- assets


def test_human_updates_show_through_the_api(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()
    immich.human_update(asset_id, description="by hand", rating=5)

    info = client.get(f"/assets/{asset_id}").json()

    assert (info["exifInfo"]["description"], info["exifInfo"]["rating"]) == ("by hand", 5)


def test_edits_replace_and_are_validated(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()
    before = immich.asset(asset_id).updated_at
    rotate = {"action": "rotate", "parameters": {"angle": ANGLE}}
    mirror = {"action": "mirror", "parameters": {"axis": "horizontal"}}

    client.put(f"/assets/{asset_id}/edits", json={"edits": [mirror]})
    replaced = client.put(f"/assets/{asset_id}/edits", json={"edits": [rotate]})
    crooked = client.put(
        f"/assets/{asset_id}/edits",
        json={"edits": [{"action": "rotate", "parameters": {"angle": 45}}]},
    )

    assert [edit["action"] for edit in replaced.json()["edits"]] == ["rotate"]
    assert client.get(f"/assets/{asset_id}/edits").json()["edits"][0]["parameters"] == {"angle": 90}
    assert client.get(f"/assets/{asset_id}").json()["isEdited"] is True
    assert immich.asset(asset_id).updated_at > before
    assert crooked.status_code == httpx.codes.BAD_REQUEST
    assert client.delete(f"/assets/{asset_id}/edits").status_code == httpx.codes.NO_CONTENT
    assert immich.asset(asset_id).edits == ()


def test_tags_are_hierarchical(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()

    leaves = client.put("/tags", json={"tags": ["darkroom/score/8", "darkroom/curated"]}).json()
    tagged = client.put("/tags/assets", json={"tagIds": [leaves[0]["id"]], "assetIds": [asset_id]})
    again = client.put("/tags/assets", json={"tagIds": [leaves[0]["id"]], "assetIds": [asset_id]})

    assert immich.tags() == [
        "darkroom",
        "darkroom/curated",
        "darkroom/score",
        "darkroom/score/8",
    ]
    by_value = {tag["value"]: tag for tag in client.get("/tags").json()}
    assert leaves[0]["parentId"] == by_value["darkroom/score"]["id"]
    assert "parentId" not in by_value["darkroom"]
    assert (tagged.json(), again.json()) == ({"count": 1}, {"count": 0})
    tags = client.get(f"/assets/{asset_id}").json()["tags"]
    assert [tag["value"] for tag in tags] == ["darkroom/score/8"]


def test_metadata_is_stored_per_key(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()
    item = {"key": "darkroom", "value": {"model": "llava", "score": 7.5}}

    written = client.put(f"/assets/{asset_id}/metadata", json={"items": [item]})

    assert written.status_code == httpx.codes.OK
    assert client.get(f"/assets/{asset_id}/metadata").json()[0]["value"] == item["value"]
    assert immich.asset(asset_id).metadata == {"darkroom": item["value"]}


@pytest.mark.usefixtures("spec")
def test_metadata_values_must_be_objects(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()

    response = client.put(
        f"/assets/{asset_id}/metadata", json={"items": [{"key": "x", "value": 3}]}
    )

    assert response.json()["message"] == ["items.0.value must be an object"]


def test_albums_report_duplicates(immich: ImmichServer, client: httpx.Client) -> None:
    first, second = immich.add_asset(), immich.add_asset()
    album = client.post("/albums", json={"albumName": "darkroom review", "assetIds": [first]})

    added = client.put(f"/albums/{album.json()['id']}/assets", json={"ids": [first, second]})

    assert album.status_code == httpx.codes.CREATED
    assert added.json() == [
        {"id": first, "success": False, "error": "duplicate"},
        {"id": second, "success": True},
    ]
    assert immich.albums() == {"darkroom review": [first, second]}
    assert client.get("/albums").json()[0]["assetCount"] == 2


def test_upload_then_duplicate(
    immich: ImmichServer, client: httpx.Client, real_jpegs: dict[str, bytes]
) -> None:
    form = {
        "deviceAssetId": "sample-1",
        "deviceId": "darkroom",
        "fileCreatedAt": "2024-05-01T10:00:00.000Z",
        "fileModifiedAt": "2024-05-01T10:00:00.000Z",
    }
    data = real_jpegs["coffee"]

    created = client.post("/assets", data=form, files={"assetData": ("sample.jpg", data)})
    duplicate = client.post("/assets", data=form, files={"assetData": ("sample.jpg", data)})

    assert (created.status_code, created.json()["status"]) == (201, "created")
    assert duplicate.json() == {"id": created.json()["id"], "status": "duplicate"}
    info = client.get(f"/assets/{created.json()['id']}").json()
    assert (info["originalFileName"], info["fileCreatedAt"]) == (
        "sample.jpg",
        form["fileCreatedAt"],
    )
    assert client.get(f"/assets/{info['id']}/original").content == data


@pytest.mark.usefixtures("spec")
def test_upload_form_is_checked(client: httpx.Client) -> None:
    response = client.post(
        "/assets",
        data={"deviceAssetId": "1", "fileCreatedAt": "now", "fileModifiedAt": "now"},
        files={"assetData": ("a.jpg", b"jpeg")},
    )

    assert response.status_code == httpx.codes.BAD_REQUEST
    assert response.json()["message"] == [
        "deviceId is required",
        "fileCreatedAt must be a valid ISO 8601 date string",
        "fileModifiedAt must be a valid ISO 8601 date string",
    ]


def test_previews_are_1440_short_side_orientation_applied(
    immich: ImmichServer, client: httpx.Client
) -> None:
    big = immich.add_asset(make_jpeg("rocket", scale=4), exif_orientation=6)
    small = immich.add_asset(make_jpeg("chelsea"))

    preview = client.get(f"/assets/{big}/thumbnail", params={"size": "preview"})
    thumb = client.get(f"/assets/{big}/thumbnail", params={"size": "thumbnail"})
    unscaled = client.get(f"/assets/{small}/thumbnail", params={"size": "preview"})

    assert preview.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(preview.content)).size == (1440, 2158)  # turned upright
    assert Image.open(io.BytesIO(thumb.content)).size == (250, 375)
    assert Image.open(io.BytesIO(unscaled.content)).size == (451, 300)
    info = client.get(f"/assets/{big}").json()
    assert (info["width"], info["height"], info["exifInfo"]["orientation"]) == (1708, 2560, "6")


def test_edited_renditions_apply_the_edits(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset(make_jpeg("coffee"))  # 600 × 400
    immich.human_update(asset_id, edits=[{"action": "rotate", "parameters": {"angle": ANGLE}}])

    plain = client.get(f"/assets/{asset_id}/thumbnail", params={"size": "preview"})
    edited = client.get(
        f"/assets/{asset_id}/thumbnail", params={"size": "preview", "edited": "true"}
    )

    assert Image.open(io.BytesIO(plain.content)).size == (600, 400)
    assert Image.open(io.BytesIO(edited.content)).size == (400, 600)


def test_lazy_originals_are_made_on_first_download(
    immich: ImmichServer, client: httpx.Client
) -> None:
    made: list[bytes] = []

    def source() -> bytes:
        made.append(make_jpeg("rocket"))
        return made[-1]

    asset_id = immich.add_asset(source, checksum="lazy-checksum")
    assert search(client)["items"][0]["checksum"] == "lazy-checksum"
    assert made == []

    assert client.get(f"/assets/{asset_id}/original").content == made[0]


def test_thumbnails_wait_for_the_thumbhash(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset(thumbhash_ready=False)
    assert client.get(f"/assets/{asset_id}").json()["thumbhash"] is None
    assert client.get(f"/assets/{asset_id}/thumbnail").status_code == httpx.codes.NOT_FOUND

    immich.mark_thumbnail_ready(asset_id)

    assert client.get(f"/assets/{asset_id}").json()["thumbhash"]
    assert client.get(f"/assets/{asset_id}/thumbnail").status_code == httpx.codes.OK


# ---------------------------------------------------------------------------- faults


def test_status_faults_fire_as_configured(immich: ImmichServer, client: httpx.Client) -> None:
    immich.fail("searchAssets", 503, times=2, retry_after=3)

    statuses = [client.post("/search/metadata", json={}) for _ in range(3)]

    assert [r.status_code for r in statuses] == [503, 503, 200]
    assert statuses[0].headers["Retry-After"] == "3"
    assert immich.request_count("searchAssets") == 3
    assert [record.status for record in immich.requests] == [503, 503, 200]


def test_faults_target_method_and_template(immich: ImmichServer, client: httpx.Client) -> None:
    asset_id = immich.add_asset()
    immich.fail(("PUT", "/assets/{id}"), 429, skip=1)

    first = client.put(f"/assets/{asset_id}", json={"rating": 1})
    second = client.put(f"/assets/{asset_id}", json={"rating": 2})

    assert (first.status_code, second.status_code) == (200, 429)
    assert client.get(f"/assets/{asset_id}").status_code == httpx.codes.OK


def test_dropped_connections_and_delays(immich: ImmichServer, client: httpx.Client) -> None:
    immich.drop("pingServer")
    immich.delay("getServerVersion", 0.5, times=1)

    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/server/ping")
    with pytest.raises(httpx.ReadTimeout):
        client.get("/server/version", timeout=0.1)

    assert client.get("/server/ping").status_code == httpx.codes.OK
    assert immich.requests[0].status is None


def test_the_key_can_be_revoked_after_n_calls(immich: ImmichServer, client: httpx.Client) -> None:
    immich.revoke_key_after(2)

    statuses = [client.get("/users/me").status_code for _ in range(3)]

    assert statuses == [200, 200, 401]
    immich.restore_key()
    assert client.get("/users/me").status_code == httpx.codes.OK


# ---------------------------------------------------------------------------- scale


def test_a_100k_library_pages_quickly(immich: ImmichServer, client: httpx.Client) -> None:
    data = make_jpeg("chelsea")
    for _ in range(100_000):
        immich.add_asset(data)

    first = search(client, size=PAGE, visibility="timeline")
    last = search(client, size=PAGE, page=100, visibility="timeline")

    assert first["nextPage"] == "2" and last["nextPage"] is None
    assert last["count"] == PAGE
