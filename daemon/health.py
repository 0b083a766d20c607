"""The health endpoint: ``/healthz`` for systemd, a load balancer or a person, ``/metrics``
for Prometheus.

A stdlib ``ThreadingHTTPServer`` on its own daemon thread (so it never holds up the
service's shutdown), bound to 127.0.0.1 unless configured otherwise: nothing here needs
to leave the machine.  Every connection has a socket timeout, so a client that connects
and says nothing cannot hold a thread for ever, and nothing is printed to stderr: the
request log and any error go to the ``darkroom.health`` logger.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from daemon.metrics import Metrics

log = logging.getLogger("darkroom.health")

DEFAULT_HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 5.0  # a stuck or slow client is dropped after this long
SHUTDOWN_POLL_S = 0.25  # how often serve_forever looks for a stop request
STOP_JOIN_S = 5.0
HEALTHZ_PATH = "/healthz"
METRICS_PATH = "/metrics"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
ALLOWED_METHODS = "GET, HEAD"

Response = tuple[HTTPStatus, str, bytes]


def _iso(unix: float) -> str:
    """A unix time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _json(status: HTTPStatus, body: dict[str, Any]) -> Response:
    return status, JSON_TYPE, (json.dumps(body, sort_keys=True) + "\n").encode()


def healthz_response(metrics: Metrics, now: float | None = None) -> Response:
    """200 with the figures when the daemon is working, 503 with the reason when not.

    An unreadable state store is unhealthy too: nothing can be tracked without it.
    """
    now = time.time() if now is None else now
    state = metrics.state
    last_poll = metrics.last_poll
    body: dict[str, Any] = {
        "status": "ok" if state.ok else "unhealthy",
        "reason": state.reason,
        "since": _iso(state.since),
        "last_poll": None if last_poll is None else _iso(last_poll),
        "last_poll_unix": last_poll,
        "seconds_since_poll": None if last_poll is None else round(now - last_poll, 1),
    }
    ok = state.ok
    try:
        depth = metrics.queue_depth()
    except (sqlite3.Error, ValueError) as exc:  # ValueError: the store is closed
        ok = False
        body.update(status="unhealthy", reason=f"state store unreadable: {exc}")
        depth = None
    body["queue_depth"] = depth
    body["queue_total"] = None if depth is None else sum(depth.values())
    return _json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)


def metrics_response(metrics: Metrics, accept: str | None) -> Response:
    """The registry in the exposition format the scraper asked for (``Accept``).

    Without a preference that is the classic text format, ``generate_latest``'s output
    under its content type (``text/plain; version=0.0.4``); OpenMetrics when asked.
    """
    encoder, content_type = choose_encoder(accept or "")
    return HTTPStatus.OK, content_type, encoder(metrics.registry)


def not_found_response() -> Response:
    """The answer for any path but the two served."""
    return HTTPStatus.NOT_FOUND, TEXT_TYPE, b"not found: try /healthz or /metrics\n"


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying the metrics and the per-connection timeout for handlers."""

    daemon_threads = True  # a request in flight never blocks the process from exiting

    def __init__(self, address: tuple[str, int], metrics: Metrics, timeout_s: float) -> None:
        self.metrics = metrics
        self.request_timeout_s = timeout_s
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection (a client gone mid-answer) instead of printing it."""
        log.debug("health: connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    """The same, on an IPv6 address."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Answers GET and HEAD on ``/healthz`` and ``/metrics``; 404 elsewhere, 405 otherwise."""

    server: _Server
    server_version = "darkroom-health"
    sys_version = ""

    def setup(self) -> None:
        """Put the timeout on the connection's socket before anything is read."""
        self.timeout = self.server.request_timeout_s
        super().setup()

    def do_GET(self) -> None:
        self._answer(self._route(), with_body=True)

    def do_HEAD(self) -> None:
        self._answer(self._route(), with_body=False)

    def _not_allowed(self) -> None:
        status, content_type, body = HTTPStatus.METHOD_NOT_ALLOWED, TEXT_TYPE, b"GET or HEAD\n"
        self._answer((status, content_type, body), with_body=True, allow=True)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def _route(self) -> Response:
        """Build the response for the path; a failure becomes a 500 and a logged error."""
        routes: dict[str, Callable[[], Response]] = {
            HEALTHZ_PATH: lambda: healthz_response(self.server.metrics),
            METRICS_PATH: lambda: metrics_response(self.server.metrics, self.headers["Accept"]),
        }
        build = routes.get(urlsplit(self.path).path, not_found_response)
        try:
            return build()
        except Exception:  # the endpoint must answer, whatever broke behind it
            log.exception("health: answering %s failed", self.path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, TEXT_TYPE, b"internal error\n"

    def _answer(self, response: Response, *, with_body: bool, allow: bool = False) -> None:
        status, content_type, body = response
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", ALLOWED_METHODS)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Route the request log to the logger at DEBUG, never to stderr."""
        log.debug("health: %s " + format, self.address_string(), *args)


class HealthServer:
    """The endpoint's life cycle: ``start()`` binds and serves, ``stop()`` ends it.

    ``port`` 0 picks a free port (for tests); ``url`` says where it landed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.host = host or DEFAULT_HOST  # never "" (which would mean every interface)
        self.port = port
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        """Bind (an OSError when the port is taken) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the health server is already running")
        server_class = _Server6 if ":" in self.host else _Server
        self._server = server_class((self.host, self.port), self.metrics, self.request_timeout_s)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_S},
            name="darkroom-health",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound server (the real port when 0 was asked)."""
        if self._server is None:
            raise RuntimeError("the health server is not running")
        host, port = self._server.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"http://{shown}:{port}"

    @property
    def running(self) -> bool:
        """Whether the serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or before ``start``."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(STOP_JOIN_S)
        self._server = self._thread = None

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
