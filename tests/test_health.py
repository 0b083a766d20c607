"""The health endpoint against a real server on 127.0.0.1 and a real store on disk.

The store figures in ``/metrics`` must be exactly what the store's own summaries say
(what ``darkroom status`` prints), latencies must be counted, ``/healthz`` must follow the
state the service sets, and the server must neither hang on a silent client nor outlive
``stop()``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.health import HealthServer
from daemon.metrics import Metrics
from daemon.store import SeenAsset, Store

CURATE = "curate"
WRITEBACK = "writeback"
REQUEST_TIMEOUT_S = 0.5
QUEUE_LIMIT = 1000
Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


IMAGE = SeenAsset(
    id="image", owner_id="owner", type="IMAGE", checksum="image=",
    updated_at="2026-11-01T00:00:00.000Z", visibility="timeline", is_trashed=False,
    original_file_name="image.jpg", thumbnail_ready=True,
)  # fmt: skip


def seen(asset_id: str, **changes: Any) -> SeenAsset:
    """An image as discovery would record it; ``changes`` override fields."""
    return IMAGE._replace(id=asset_id, checksum=f"{asset_id}=", **changes)


def fill(store: Store) -> None:
    """A small library: every asset state and stage status the endpoint reports."""
    store.upsert_assets(
        [
            seen("ready-1"),
            seen("ready-2"),
            seen("no-thumbnail", thumbnail_ready=False),  # pending, but not workable yet
            seen("in-trash", is_trashed=True),
            seen("bad-photo"),
            seen("curated"),
            seen("gone"),
            seen("clip", type="VIDEO"),  # skipped: not curated
        ]
    )
    store.mark("bad-photo", CURATE, "quarantined", error="score never validated", attempted=True)
    store.mark("curated", CURATE, "done", attempted=True)
    store.mark("curated", WRITEBACK, "pending")
    with store.transaction() as conn:
        conn.execute("UPDATE assets SET is_deleted = 1 WHERE id = 'gone'")
        store.open_review(conn, "curated", "rotation", {"votes": [90, 90, 0, 90]})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state" / "darkroom.sqlite3") as store:
        fill(store)
        yield store


@pytest.fixture
def metrics(store: Store) -> Metrics:
    return Metrics(store)


@pytest.fixture
def server(metrics: Metrics) -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, metrics, request_timeout_s=REQUEST_TIMEOUT_S)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def http(server: HealthServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5, trust_env=False) as client:
        yield client


def scrape(http: httpx.Client) -> Samples:
    """Every sample of ``/metrics``, by (sample name, labels)."""
    response = http.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_store_figures_are_the_stores_own(store: Store, http: httpx.Client) -> None:
    samples = scrape(http)
    for state, count in store.asset_counts().items():
        assert value(samples, "darkroom_assets", state=state) == count
    for stage, counts in store.stage_counts().items():
        for status, count in counts.items():
            assert value(samples, "darkroom_stage_assets", stage=stage, status=status) == count
    for stage in (CURATE, WRITEBACK):
        expected = len(store.pending(stage, QUEUE_LIMIT))
        assert value(samples, "darkroom_queue_depth", stage=stage) == expected
    assert value(samples, "darkroom_open_reviews") == store.open_reviews() == 1
    assert value(samples, "darkroom_store_up") == 1
    # The fixture's figures, spelled out: the store's summaries are not trusted blindly.
    assert value(samples, "darkroom_assets", state="known") == 8
    assert value(samples, "darkroom_assets", state="trashed") == 1
    assert value(samples, "darkroom_assets", state="deleted") == 1
    assert value(samples, "darkroom_stage_assets", stage=CURATE, status="quarantined") == 1
    assert value(samples, "darkroom_stage_assets", stage=CURATE, status="pending") == 5
    assert value(samples, "darkroom_queue_depth", stage=CURATE) == 2  # ready-1, ready-2


def test_store_is_read_at_each_scrape(store: Store, http: httpx.Client) -> None:
    before = scrape(http)
    assert value(before, "darkroom_stage_assets", stage=CURATE, status="quarantined") == 1
    store.mark("ready-1", CURATE, "quarantined", error="refused", attempted=True)
    after = scrape(http)
    assert value(after, "darkroom_stage_assets", stage=CURATE, status="quarantined") == 2
    assert value(after, "darkroom_queue_depth", stage=CURATE) == 1


def test_exposition_has_the_classic_content_type(http: httpx.Client) -> None:
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    openmetrics = http.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


def test_latencies_and_errors_are_counted(metrics: Metrics, http: httpx.Client) -> None:
    route = "/assets/{id}"
    metrics.observe_immich("GET", route, 200, 0.02)
    metrics.observe_immich("GET", route, 404, 0.03)
    metrics.observe_immich("GET", route, None, 2.0)
    metrics.observe_immich("PUT", route, None, 30.0, kind="timeout")
    metrics.observe_immich("PUT", route, 503, 0.2)
    metrics.observe_ollama("http://gpu:11434", "ok", 4.0)
    metrics.observe_ollama("http://gpu:11434", "rejected", 6.5)
    samples = scrape(http)
    get = {"method": "GET", "route": route}
    assert value(samples, "darkroom_immich_request_duration_seconds_count", **get) == 3
    assert value(samples, "darkroom_immich_request_duration_seconds_bucket", **get, le="0.05") == 2
    put = {"method": "PUT", "route": route}
    assert value(samples, "darkroom_immich_request_duration_seconds_count", **put) == 2
    errors = {"unreachable": 1, "timeout": 1, "4xx": 1, "5xx": 1}
    for kind, count in errors.items():
        assert value(samples, "darkroom_immich_errors_total", kind=kind) == count
    host = {"host": "http://gpu:11434"}
    assert value(samples, "darkroom_ollama_call_duration_seconds_count", **host) == 2
    assert value(samples, "darkroom_ollama_call_duration_seconds_bucket", **host, le="5.0") == 1
    assert value(samples, "darkroom_ollama_call_duration_seconds_sum", **host) == 10.5
    for outcome in ("ok", "rejected"):
        assert value(samples, "darkroom_ollama_calls_total", **host, outcome=outcome) == 1


def test_error_kinds_are_present_before_any_error(http: httpx.Client) -> None:
    samples = scrape(http)
    for kind in ("unreachable", "timeout", "4xx", "5xx"):
        assert value(samples, "darkroom_immich_errors_total", kind=kind) == 0


def test_healthz_reports_poll_and_queue(metrics: Metrics, http: httpx.Client) -> None:
    polled = time.time() - 12
    metrics.poll_succeeded(polled)
    metrics.set_state(True, "ok")
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "ok"
    assert body["reason"] == "ok"
    assert body["last_poll_unix"] == polled
    assert 12 <= body["seconds_since_poll"] < 60
    assert body["queue_depth"] == {CURATE: 2, WRITEBACK: 1}
    assert body["queue_total"] == 3
    assert value(scrape(http), "darkroom_last_poll_success_timestamp_seconds") == polled


def test_healthz_before_the_first_poll(http: httpx.Client) -> None:
    body = http.get("/healthz").json()
    assert body["last_poll"] is None
    assert body["seconds_since_poll"] is None


def test_healthz_turns_503_with_the_reason(metrics: Metrics, http: httpx.Client) -> None:
    reason = "Immich unreachable, backing off 40 s"
    metrics.set_state(False, reason)
    response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert response.json()["reason"] == reason
    assert value(scrape(http), "darkroom_healthy") == 0
    metrics.set_state(False, "stopped: API key rejected")
    assert http.get("/healthz").json()["reason"] == "stopped: API key rejected"
    metrics.set_state(True, "ok")
    assert http.get("/healthz").status_code == 200
    assert value(scrape(http), "darkroom_healthy") == 1


def test_unreadable_store_is_unhealthy(store: Store, http: httpx.Client) -> None:
    store.close()
    response = http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reason"].startswith("state store unreadable")
    samples = scrape(http)
    assert value(samples, "darkroom_store_up") == 0
    assert ("darkroom_assets", frozenset({("state", "known")})) not in samples


def test_other_paths_and_methods(http: httpx.Client) -> None:
    assert http.get("/").status_code == 404
    assert http.get("/healthz/extra").status_code == 404
    assert http.get("/metrics?name[]=darkroom_assets").status_code == 200  # query ignored
    head = http.head("/healthz")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    post = http.post("/healthz", content=b"{}")
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


def test_nothing_is_printed(
    http: httpx.Client, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="darkroom.health"):
        http.get("/healthz")
        http.get("/nowhere")
    assert capfd.readouterr().err == ""
    logged = [r.getMessage() for r in caplog.records if r.name == "darkroom.health"]
    assert any("GET /healthz" in message for message in logged)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "darkroom.health")


def test_silent_client_is_dropped_without_blocking_others(
    server: HealthServer, http: httpx.Client
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        assert http.get("/healthz").status_code == 200  # served while the other one waits
        started = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server after its timeout
        assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3


def test_stops_cleanly(server: HealthServer, http: httpx.Client) -> None:
    url = server.url
    assert http.get("/healthz").status_code == 200
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):  # a client still connected
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
    assert not server.running
    assert not any(t.name == "darkroom-health" for t in threading.enumerate())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2, trust_env=False)
    server.stop()  # a second stop is harmless


def test_metrics_registries_are_separate(store: Store) -> None:
    first, second = Metrics(store), Metrics(store)  # no "duplicated timeseries" error
    first.observe_ollama("http://a:11434", "ok", 1.0)
    assert second.registry.get_sample_value(
        "darkroom_ollama_calls_total", {"host": "http://a:11434", "outcome": "ok"}
    ) is None  # fmt: skip


def test_healthz_body_is_json_lines(http: httpx.Client) -> None:
    text = http.get("/healthz").text
    assert text.endswith("\n")
    assert isinstance(json.loads(text), dict)
