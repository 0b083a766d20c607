"""The Immich client against the spec-checked stand-in: every call, every failure mode."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from immich_client import (
    PERMISSIONS,
    ImmichAuthError,
    ImmichClient,
    ImmichError,
    ImmichForbiddenError,
    ImmichNotFoundError,
    ImmichServerError,
    ImmichTimeoutError,
    ImmichTooLargeError,
    ImmichUnreachableError,
    ImmichValidationError,
    RetryPolicy,
)
from immich_client.models import AssetEdit
from tests.conftest import ImmichFactory
from tests.immich_server import DEFAULT_API_KEY, ImmichServer
from tests.immich_spec import SPEC_MISSING_REASON, SPEC_PATH

FAST_RETRY = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05)


def client_for(server: ImmichServer, *, url: str | None = None, **options: object) -> ImmichClient:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("timeout_s", 5.0)
    return ImmichClient(url or server.url, server.api_key, **options)  # type: ignore[arg-type]


@pytest.fixture
def client(immich: ImmichServer) -> Iterator[ImmichClient]:
    with client_for(immich) as made:
        yield made


@pytest.mark.parametrize("suffix", ["", "/", "/api", "/api/"])
def test_base_url_with_or_without_api(immich: ImmichServer, suffix: str) -> None:
    with client_for(immich, url=immich.url + suffix) as client:
        assert client.ping()
        assert client.base_url == immich.url + "/api/"


def test_server_and_identity(client: ImmichClient, immich: ImmichServer) -> None:
    assert str(client.version()) == "2.7.5"
    assert client.version().as_tuple >= (2, 5, 0)
    assert isinstance(client.features(), dict)
    assert client.me().id == immich.owner.id
    key = client.api_key_info()
    assert key.permissions == ["all"]
    assert key.lacks(["asset.read", "asset.update"]) == []


def test_key_permissions_reported(make_immich: ImmichFactory) -> None:
    server = make_immich(permissions=["asset.read", "asset.view"])
    with client_for(server) as client:
        assert client.api_key_info().lacks(["asset.read", "asset.update", "tag.create"]) == [
            "asset.update",
            "tag.create",
        ]


def test_pagination_across_pages_of_1000(client: ImmichClient, immich: ImmichServer) -> None:
    photo = b"shared-bytes-are-fine-for-paging"
    ids = {immich.add_asset(photo + bytes([i % 256, i // 256])) for i in range(2500)}
    pages = list(client.search_pages(visibility="timeline"))
    assert [len(p.items) for p in pages] == [1000, 1000, 500]
    assert {a.id for p in pages for a in p.items} == ids
    # Two pages are read ahead, so one request past the last page is spent: 3 + 1.
    assert immich.request_count("searchAssets") == 4
    assert pages[-1].next_page is None
    immich.requests.clear()
    assert len(list(client.search_pages(visibility="archive"))) == 1
    assert immich.request_count("searchAssets") == 1  # a single page: nothing read ahead


def test_v3_cursor_pagination(make_immich: ImmichFactory) -> None:
    server = make_immich(v3=True)
    ids = {server.add_asset(b"v3-" + i.to_bytes(2, "big")) for i in range(1200)}
    with client_for(server) as client:
        pages = list(client.search_pages(page_size=500))
    assert {a.id for p in pages for a in p.items} == ids
    assert len(pages) == 3
    assert pages[0].next_cursor  # the server offered a cursor and the client followed it


def test_search_filters_and_partner_assets(client: ImmichClient, immich: ImmichServer) -> None:
    partner = immich.add_user("Partner")
    mine = immich.add_asset(b"mine")
    theirs = immich.add_asset(b"theirs", owner_id=partner)
    archived = immich.add_asset(b"archived", visibility="archive")
    trashed = immich.add_asset(b"trashed", trashed=True)
    video = immich.add_asset(b"video", type="VIDEO")
    found = {a.id: a for a in client.search_assets(visibility="timeline")}
    assert mine in found and theirs in found  # partners' photos come back too
    assert found[theirs].owner_id == partner != found[mine].owner_id
    assert archived not in found and trashed not in found
    with_trash = {a.id for a in client.search_assets(visibility="timeline", with_deleted=True)}
    assert trashed in with_trash
    assert {a.id for a in client.search_assets(visibility="archive")} == {archived}
    images = {a.id for a in client.search_assets(asset_type="IMAGE", visibility="timeline")}
    assert video not in images and mine in images


def test_updated_after(client: ImmichClient, immich: ImmichServer) -> None:
    old = immich.add_asset(b"old")
    new = immich.add_asset(b"new")
    cutoff = client.get_asset(new).updated_at  # Immich's bound is inclusive
    found = {a.id for a in client.search_assets(updated_after=cutoff, visibility="timeline")}
    assert new in found and old not in found


def test_update_description_and_rating(client: ImmichClient, immich: ImmichServer) -> None:
    asset_id = immich.add_asset(b"photo")
    updated = client.update_asset(asset_id, description="a red kite", rating=4)
    assert (updated.description, updated.rating) == ("a red kite", 4)
    assert client.update_asset(asset_id, rating=None).rating is None
    state = immich.asset(asset_id)
    assert (state.description, state.rating) == ("a red kite", None)


def test_rotation_keeps_existing_edits(client: ImmichClient, immich: ImmichServer) -> None:
    asset_id = immich.add_asset(b"photo")
    crop = AssetEdit(action="crop", parameters={"x": 1, "y": 2, "width": 30, "height": 40})
    client.put_edits(asset_id, [crop])
    result = client.add_rotation(asset_id, 90)
    assert [(e.action, e.parameters) for e in result.edits] == [
        ("crop", crop.parameters),
        ("rotate", {"angle": 90}),
    ]
    assert [e["action"] for e in immich.asset(asset_id).edits] == ["crop", "rotate"]
    client.delete_edits(asset_id)
    assert client.get_edits(asset_id).edits == []


def test_metadata_tags_albums(client: ImmichClient, immich: ImmichServer) -> None:
    asset_id = immich.add_asset(b"photo")
    client.put_metadata(asset_id, "darkroom", {"overall": 7.2, "model": "m"})
    assert {m.key: m.value for m in client.get_metadata(asset_id)} == {
        "darkroom": {"overall": 7.2, "model": "m"}
    }
    tags = client.upsert_tags(["darkroom/score/7"])
    leaf = next(t for t in tags if t.value == "darkroom/score/7")
    assert client.tag_assets([leaf.id], [asset_id]) == 1
    assert client.tag_assets([leaf.id], [asset_id]) == 0  # already tagged
    assert "darkroom/score/7" in immich.asset(asset_id).tags
    assert [t.value for t in client.get_asset(asset_id).tags] == ["darkroom/score/7"]
    album = client.create_album("darkroom · check rotation")
    assert album.id in {a.id for a in client.list_albums()}
    first, again = (client.add_to_album(album.id, [asset_id]) for _ in range(2))
    assert first[0].success and not again[0].success and again[0].error == "duplicate"
    other = immich.add_asset(b"other")
    assert [a.id for a in client.list_albums(containing=asset_id)] == [album.id]
    assert client.list_albums(containing=other) == []


def test_upload_then_duplicate(client: ImmichClient, real_jpegs: dict[str, bytes]) -> None:
    taken = datetime(2026, 11, 1, 12, tzinfo=UTC)
    created = client.upload_asset(real_jpegs["rocket"], "sample.jpg", taken_at=taken)
    assert created.status == "created"
    again = client.upload_asset(real_jpegs["rocket"], "sample.jpg", taken_at=taken)
    assert (again.status, again.id) == ("duplicate", created.id)


def test_downloads(
    client: ImmichClient, immich: ImmichServer, real_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    original = real_jpegs["astronaut"]
    asset_id = immich.add_asset(original)
    assert client.original_bytes(asset_id, max_bytes=len(original)) == original
    preview = client.thumbnail_bytes(asset_id, max_bytes=10_000_000)
    assert preview[:2] == b"\xff\xd8"  # a JPEG
    dest = tmp_path / "o" / "original.jpg"
    assert client.save_original(asset_id, dest, max_bytes=len(original)) == len(original)
    assert dest.read_bytes() == original


def test_download_over_cap_refused_and_nothing_left(
    client: ImmichClient, immich: ImmichServer, real_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    asset_id = immich.add_asset(real_jpegs["coffee"])
    with pytest.raises(ImmichTooLargeError):
        client.original_bytes(asset_id, max_bytes=1000)
    with pytest.raises(ImmichTooLargeError):
        client.save_original(asset_id, tmp_path / "big.jpg", max_bytes=1000)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file


class _EndlessStream(BaseHTTPRequestHandler):
    """Streams a body with no Content-Length, counting what it managed to send."""

    protocol_version = "HTTP/1.1"
    sent = 0
    total = 200 * 1024 * 1024
    chunk = 64 * 1024

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"x" * self.chunk
        try:
            while type(self).sent < self.total:
                self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                type(self).sent += len(block)
        except OSError:
            return

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def test_download_without_length_stops_reading_at_cap() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EndlessStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ImmichClient(f"http://127.0.0.1:{server.server_port}", "k")
        with client, pytest.raises(ImmichTooLargeError):
            client.original_bytes("any", max_bytes=1024 * 1024)
        # Socket buffers hold a few MB; the client stopped long before the 200 MB end.
        assert _EndlessStream.sent < _EndlessStream.total / 4
    finally:
        server.shutdown()
        server.server_close()


def test_retries_503_then_succeeds(immich: ImmichServer) -> None:
    waits: list[float] = []
    immich.fail("getServerVersion", 503, times=2)
    with client_for(immich, sleep=waits.append) as client:
        assert str(client.version()) == "2.7.5"
    assert immich.request_count("getServerVersion") == 3
    assert len(waits) == 2 and waits[1] > 0


def test_backoff_grows_is_bounded_and_honours_retry_after(immich: ImmichServer) -> None:
    waits: list[float] = []
    policy = RetryPolicy(max_retries=5, base_delay_s=1.0, max_delay_s=4.0)
    immich.fail("getServerVersion", 500, times=None)
    client = client_for(immich, sleep=waits.append, retry=policy)
    with client, pytest.raises(ImmichServerError, match="500"):
        client.version()
    assert immich.request_count("getServerVersion") == 6  # 1 + 5 retries, then give up
    assert all(0.5 <= w <= 1 for w in waits[:1]) and all(w <= 4 for w in waits)
    assert waits[3] >= 2  # grown: attempt 3 waits at least half of min(4, 8)
    immich.clear_faults()
    waits.clear()
    immich.fail("getServerVersion", 429, times=1, retry_after=2)
    with client_for(immich, sleep=waits.append, retry=policy) as client:
        client.version()
    assert waits == [2.0]


def test_no_retry_for_4xx(client: ImmichClient, immich: ImmichServer) -> None:
    asset_id = immich.add_asset(b"photo")
    with pytest.raises(ImmichValidationError) as caught:
        client.update_asset(asset_id, rating=7)
    assert caught.value.messages  # Immich's own words
    assert "rating" in str(caught.value)
    assert immich.request_count("updateAsset") == 1
    with pytest.raises(ImmichNotFoundError):
        client.get_asset("00000000-0000-4000-8000-000000000000")
    assert immich.request_count("getAssetInfo") == 1


def test_401_is_a_clear_error_and_not_retried(immich: ImmichServer) -> None:
    client = ImmichClient(immich.url, "wrong-key", retry=FAST_RETRY)
    with client, pytest.raises(ImmichAuthError, match="API key rejected"):
        client.me()
    assert immich.request_count() == 1
    immich.revoke_key_after(2)
    with client_for(immich) as client:
        client.me()
        client.me()
        with pytest.raises(ImmichAuthError):
            client.me()


def test_403_names_the_missing_permission(make_immich: ImmichFactory) -> None:
    server = make_immich(permissions=["asset.read"])
    asset_id = server.add_asset(b"photo")
    with client_for(server) as client, pytest.raises(ImmichForbiddenError) as caught:
        client.update_asset(asset_id, description="x")
    assert caught.value.missing_permission == "asset.update"
    assert "asset.update" in str(caught.value)


def test_timeouts_raise(immich: ImmichServer, caplog: pytest.LogCaptureFixture) -> None:
    immich.delay("getServerVersion", 1.0)
    retry = RetryPolicy(max_retries=1, base_delay_s=0.01, max_delay_s=0.01)
    client = client_for(immich, timeout_s=0.2, retry=retry)
    with client, pytest.raises(ImmichTimeoutError, match="timed out"):
        client.version()
    assert "retry 1/1" in caplog.text  # a GET may be repeated after a read timeout
    immich.delay("uploadAsset", 1.0)
    caplog.clear()
    client = client_for(immich, timeout_s=0.2, retry=retry)
    with client, pytest.raises(ImmichTimeoutError):
        client.upload_asset(b"\xff\xd8x", "x.jpg", taken_at=datetime.now(UTC))
    assert "retry" not in caplog.text  # an upload that may have landed is not repeated


def test_unreachable_server() -> None:
    client = ImmichClient("http://127.0.0.1:9", "k", retry=FAST_RETRY, sleep=lambda _: None)
    with client, pytest.raises(ImmichUnreachableError, match="cannot connect"):
        client.ping()


def test_dropped_connection_retried_only_when_safe(
    immich: ImmichServer, real_jpegs: dict[str, bytes]
) -> None:
    immich.drop("getServerVersion", times=1)
    with client_for(immich) as client:
        client.version()
        assert immich.request_count("getServerVersion") == 2
        immich.drop("uploadAsset", times=1)
        with pytest.raises(ImmichUnreachableError):
            client.upload_asset(real_jpegs["chelsea"], "c.jpg", taken_at=datetime.now(UTC))
    assert immich.request_count("uploadAsset") == 1  # a POST that may have landed: not repeated


def test_key_never_in_errors_or_logs(
    make_immich: ImmichFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_immich(permissions=["asset.read"])
    asset_id = server.add_asset(b"photo")
    errors: list[ImmichError] = []
    server.fail("getServerVersion", 503, times=None)
    server.delay("getMyUser", 1.0)
    with client_for(server, timeout_s=0.2) as client:
        for call in (
            client.version,
            client.me,
            lambda: client.update_asset(asset_id, description="x"),
            lambda: client.update_asset(asset_id, rating=9),
        ):
            with pytest.raises(ImmichError) as caught:
                call()
            errors.append(caught.value)
    with ImmichClient(server.url, DEFAULT_API_KEY + "-wrong", retry=FAST_RETRY) as bad:
        with pytest.raises(ImmichError) as caught:
            bad.me()
        errors.append(caught.value)
    text = caplog.text + "".join(f"{e!s}{e!r}" for e in errors)
    assert DEFAULT_API_KEY not in text
    assert len(errors) == 5


def test_permission_table_matches_spec() -> None:
    if SPEC_MISSING_REASON:
        pytest.skip(SPEC_MISSING_REASON)
    paths = json.loads(SPEC_PATH.read_text(encoding="utf-8"))["paths"]
    for endpoint, permission in PERMISSIONS.items():
        method, path = endpoint.split(" ", 1)
        operation = paths[path][method.lower()]
        assert operation.get("x-immich-permission") == permission, endpoint


def test_client_only_calls_listed_endpoints(client: ImmichClient, immich: ImmichServer) -> None:
    """Every request the client's methods make is in PERMISSIONS (so doctor checks it)."""
    asset_id = immich.add_asset(b"photo")
    client.ping(), client.version(), client.features(), client.api_key_info(), client.me()
    list(client.search_assets())
    client.get_asset(asset_id)
    client.update_asset(asset_id, description="d")
    client.thumbnail_bytes(asset_id, max_bytes=10**7)
    client.original_bytes(asset_id, max_bytes=10**7)
    client.add_rotation(asset_id, 180)
    client.delete_edits(asset_id)
    client.put_metadata(asset_id, "k", {"v": 1})
    client.get_metadata(asset_id)
    tag = client.upsert_tags(["a/b"])[-1]
    client.tag_assets([tag.id], [asset_id])
    album = client.create_album("x")
    client.add_to_album(album.id, [asset_id])
    client.list_albums()
    client.upload_asset(b"\xff\xd8new", "n.jpg", taken_at=datetime.now(UTC))
    used = {f"{r.method} {_template(r.path)}" for r in immich.requests}
    assert used <= set(PERMISSIONS), used - set(PERMISSIONS)


def _template(path: str) -> str:
    parts = path.removeprefix("/api").split("/")
    return "/".join("{id}" if len(p) == 36 and p.count("-") == 4 else p for p in parts)


def test_observer_sees_every_exchange(immich: ImmichServer) -> None:
    seen: list[tuple[str, str, int | None, float]] = []
    asset_id = immich.add_asset(b"photo")
    immich.fail("getAssetInfo", 503, times=1)
    with client_for(immich, observer=lambda *event: seen.append(event)) as client:
        client.get_asset(asset_id)
    assert [(m, r, s) for m, r, s, _ in seen] == [
        ("GET", "/assets/{id}", 503),
        ("GET", "/assets/{id}", 200),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)
    seen.clear()
    client = ImmichClient(
        "http://127.0.0.1:9",
        "k",
        retry=RetryPolicy(max_retries=0),
        observer=lambda *event: seen.append(event),
    )
    with client, pytest.raises(ImmichUnreachableError):
        client.ping()
    assert [(m, r, s) for m, r, s, _ in seen] == [("GET", "/server/ping", None)]
