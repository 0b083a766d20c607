"""A stand-in Immich server for darkroom's tests: real HTTP on 127.0.0.1, held to Immich's
real OpenAPI spec.

Every request is matched to its spec operation and checked (JSON or multipart body, query
and path parameters); what the real server would refuse gets its 400, 401, 403 or 404 in
Immich's error shape. Every response the stand-in produces is checked too: one that does not
match the spec is a bug in the stand-in and lands in :attr:`ImmichServer.spec_violations`
(the ``immich`` fixture fails the test on it). Faults (statuses, delays, dropped
connections, a revoked key, corrupted responses) are injected per operation, and
:attr:`ImmichServer.requests` logs every request. State lives in :mod:`tests.immich_library`,
spec checks in :mod:`tests.immich_spec`. This module holds the HTTP server and the request
pipeline; the endpoints are in :mod:`tests.immich_endpoints` (the search in
:mod:`tests.immich_search`), fault injection and library set-up for tests in
:mod:`tests.immich_controls`, and the shared request types in :mod:`tests.immich_routes`.
Names that moved out of this module are re-exported here (see ``__all__``).

Where the real behaviour was uncertain (checked against Immich's source where possible):

- a missing ``x-api-key`` is 401 "Authentication required", a wrong one "Invalid API key";
  a key without the operation's ``x-immich-permission`` is 403 "Missing required
  permission: <perm>"; ``GET /api-keys/me`` needs no permission (``permission: false``).
- search with no ``visibility`` returns everything but ``locked`` (the API-key default of
  Immich's search service), so the hidden video half of a live photo shows up; trash only
  with ``withDeleted``; own and partners' assets; ordered by fileCreatedAt (``order``,
  default desc), ties by id; ``total`` and ``count`` are both the page's length, as in
  Immich; ``nextPage`` is a string and null when no asset is left; ``exifInfo`` (with the
  description and rating) only with ``withExif: true``. Filters the stand-in does not model
  answer 501 rather than being ignored silently.
- v3 mode also takes ``cursor`` and answers ``nextCursor`` (opaque: the last item's sort
  key); the 2.7.5 spec has no ``cursor``, so it is taken out before the body is checked.
- unknown body properties are ignored (Immich strips them), so ``orientation`` in
  ``PUT /assets/{id}`` is accepted and does nothing. ``rating`` 0 is stored as null, -1 kept
  (deprecated "rejected"), fractions refused.
- every write to an asset (update, edits, metadata, tags, album membership, trash) bumps
  its ``updatedAt``; timestamps never repeat.
- ``size=thumbnail`` is WEBP (Immich's default format), ``preview`` JPEG; ``fullsize`` of an
  unedited JPEG is the original file (Immich redirects there), ``original`` is a 400; edits
  are applied only with ``edited=true`` (the spec's default is false); before thumbnails
  exist (``thumbhash`` null) the endpoint answers 404.
- edits: rotation must be 0/90/180/270, one edit per action (mirror may repeat with other
  axes), crops inside the image, images only.
"""

from __future__ import annotations

import copy
import json
import secrets
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests import immich_library as lib
from tests.immich_controls import (
    MIME_BY_TYPE,
    UNSET,
    VIDEO_BYTES,
    AssetState,
    Fault,
    _FaultControls,
    _LibraryControls,
    _Unset,
)
from tests.immich_endpoints import (
    DEFAULT_THUMBNAIL_SIZE,
    EDIT_PARAMETERS,
    RENDITIONS,
    ROTATION_ANGLES,
    SERVER_FEATURES,
    _Endpoints,
)
from tests.immich_library import Library, User
from tests.immich_routes import (
    ROUTES,
    ApiError,
    Call,
    FaultTarget,
    Reply,
    RequestRecord,
    Route,
)
from tests.immich_search import (
    BASE64_SHA1_LENGTH,
    DEFAULT_PAGE_SIZE,
    EMPTY_ALBUM_RESULTS,
    UNMODELLED_SEARCH_FIELDS,
)
from tests.immich_spec import (
    BINARY_PLACEHOLDER,
    DEFAULT_RESPONSE_SAMPLE,
    JSON_TYPE,
    MULTIPART_TYPE,
    ImmichSpec,
    SpecOperation,
    coerce_text,
    load_spec,
)

__all__ = [
    "API_PREFIX", "BASE64_SHA1_LENGTH", "DEFAULT_API_KEY", "DEFAULT_PAGE_SIZE",
    "DEFAULT_PERMISSIONS", "DEFAULT_THUMBNAIL_SIZE", "EDIT_PARAMETERS", "EMPTY_ALBUM_RESULTS",
    "HOST", "JSON_SEPARATORS", "MIME_BY_TYPE", "PERMISSION_ALL", "POLL_SECONDS", "RENDITIONS",
    "ROTATION_ANGLES", "ROUTES", "SERVER_FEATURES", "UNMODELLED_SEARCH_FIELDS", "UNSET",
    "VERSION_2", "VERSION_3", "VIDEO_BYTES", "ApiError", "AssetState", "Call", "Fault",
    "FaultTarget", "ImmichServer", "Reply", "RequestRecord", "Route",
]  # fmt: skip

DEFAULT_API_KEY = "darkroom-test-api-key"
DEFAULT_PERMISSIONS = ("all",)
PERMISSION_ALL = "all"
VERSION_2 = (2, 7, 5)
VERSION_3 = (3, 0, 0)
API_PREFIX = "/api"
HOST = "127.0.0.1"
POLL_SECONDS = 0.02  # how fast stop() is noticed
JSON_SEPARATORS = (",", ":")  # compact, like Immich


class _Dropped(Exception):
    """Raised to close the connection without answering (an injected fault)."""


#: Literal templates first, so ``/tags/assets`` is never taken for ``/tags/{id}``.
_ROUTES_LITERAL_FIRST = sorted(ROUTES, key=lambda route: route.template.count("{"))


class _HttpServer(ThreadingHTTPServer):
    """The stdlib threaded server, pointing back at the stand-in that owns it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: ImmichServer) -> None:
        super().__init__((HOST, 0), _Handler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hung up first (e.g. it timed out on a delay fault)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to :meth:`ImmichServer.handle`; keeps connections alive."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle and delayed ACKs
    # add ~40 ms to every keep-alive answer, which real servers do not.
    disable_nagle_algorithm = True
    server: _HttpServer

    def do_GET(self) -> None:
        """Serve any method the same way."""
        self.server.owner.handle(self)

    do_PUT = do_POST = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: :attr:`ImmichServer.requests` is the log."""


def _error_body(status: int, message: str | list[str]) -> dict[str, Any]:
    """Immich's error shape, with a fresh correlation id."""
    return {
        "message": message,
        "error": HTTPStatus(status).phrase,
        "statusCode": status,
        "correlationId": secrets.token_hex(6),
    }


class ImmichServer(_FaultControls, _LibraryControls):
    """The stand-in server. Start it (or use it as a context manager) and point a client at
    :attr:`url` (clients append ``/api``).
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        permissions: tuple[str, ...] | list[str] = DEFAULT_PERMISSIONS,
        owner_id: str | None = None,
        owner_email: str = "owner@example.com",
        owner_name: str = "Owner",
        v3: bool = False,
        version: tuple[int, int, int] | None = None,
        spec: ImmichSpec | _Unset | None = UNSET,
        response_sample: int | None = DEFAULT_RESPONSE_SAMPLE,
        thumbnails_ready_on_upload: bool = True,
    ) -> None:
        self.api_key = api_key
        self.permissions = list(permissions)
        self.v3 = v3
        self.version = version or (VERSION_3 if v3 else VERSION_2)
        self.spec: ImmichSpec | None = load_spec() if isinstance(spec, _Unset) else spec
        self.response_sample = response_sample
        self.thumbnails_ready_on_upload = thumbnails_ready_on_upload
        owner = User(owner_id or lib.new_id(), owner_email, owner_name)
        self.library = Library(owner)
        self.key_id = lib.new_id()
        self.key_created_ms = lib.now_ms()
        self.requests: list[RequestRecord] = []
        self.spec_violations: list[str] = []
        self.crashes: list[str] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._key_budget: int | None = None
        self._stopping = threading.Event()
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._file_counter = 0
        self._handlers: dict[str, Callable[[Call], Reply]] = _Endpoints(self).table()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/api``)."""
        if self._http is None:
            raise RuntimeError("the stand-in Immich server is not started")
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ImmichServer:
        """Listen on a free port of 127.0.0.1 and serve in a background thread."""
        self._stopping.clear()
        self._http = _HttpServer(self)
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            args=(POLL_SECONDS,),
            name="immich-stand-in",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (sleeping faults are woken up)."""
        self._stopping.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join()
        self._http = self._thread = None

    def __enter__(self) -> ImmichServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ request pipeline

    def handle(self, http: BaseHTTPRequestHandler) -> None:
        """Serve one request: route, faults, auth, checks, endpoint, response check."""
        url = urlsplit(http.path)
        body = http.rfile.read(int(http.headers.get("Content-Length") or 0))
        record = RequestRecord(
            http.command, url.path, dict(parse_qsl(url.query, keep_blank_values=True))
        )
        try:
            reply = self._process(http, url.path, body, record)
        except _Dropped:
            self._log(record)
            http.close_connection = True
            http.connection.shutdown(socket.SHUT_RDWR)
            return
        record.status = reply.status
        self._log(record)
        self._send(http, reply)

    def _process(
        self, http: BaseHTTPRequestHandler, path: str, body: bytes, record: RequestRecord
    ) -> Reply:
        """Run the pipeline; an :class:`ApiError` anywhere becomes an error reply."""
        try:
            route, params = self._route(http.command, path)
            record.operation_id = route.operation_id
            self._inject(route)
            user = self._authenticate(route, http.headers.get("x-api-key"))
            call = self._parse(
                route, user, params, record.query, http.headers.get("Content-Type", ""), body
            )
            reply = self._handlers[route.operation_id](call)
            return self._checked(route, self._corrupted(route, reply))
        except ApiError as error:
            return Reply(
                error.status, _error_body(error.status, error.message), headers=error.headers
            )
        except _Dropped:
            raise
        except Exception:  # a crash of the stand-in: answer like Nest, remember it
            with self._lock:
                self.crashes.append(traceback.format_exc())
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            return Reply(status, _error_body(status, "Internal server error"))

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route serving ``path``; 404 for unknown paths, 501 for spec-only ones."""
        relative = path.removeprefix(API_PREFIX) if path.startswith(API_PREFIX + "/") else None
        if relative is not None:
            for route in _ROUTES_LITERAL_FIRST:
                found = route.regex.match(relative)
                if route.method == method and found:
                    return route, found.groupdict()
            if self.spec is not None and self.spec.match(method, relative) is not None:
                raise ApiError(
                    HTTPStatus.NOT_IMPLEMENTED, f"{method} {path} is not modelled by the stand-in"
                )
        raise ApiError(HTTPStatus.NOT_FOUND, f"Cannot {method} {path}")

    def _inject(self, route: Route) -> None:
        """Apply injected faults: drop the connection, sleep, or answer an error status."""
        if self._take_fault(route, "drop"):
            raise _Dropped
        delay = self._take_fault(route, "delay")
        if delay:
            self._stopping.wait(delay.seconds)
        failure = self._take_fault(route, "status")
        if failure:
            headers = (
                {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
            )
            raise ApiError(failure.status, HTTPStatus(failure.status).phrase, headers)

    def _take_fault(self, route: Route, kind: str) -> Fault | None:
        """The first fault of ``kind`` that applies to ``route`` now, consumed."""
        with self._lock:
            return next((fault for fault in self.faults if fault.take(route, kind)), None)

    def _authenticate(self, route: Route, key: str | None) -> User:
        """Check the API key and the operation's permission (401 / 403 like Immich)."""
        if route.public:
            return self.owner
        if not key:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "Authentication required")
        with self._lock:
            if key != self.api_key or self._key_budget == 0:
                raise ApiError(HTTPStatus.UNAUTHORIZED, "Invalid API key")
            if self._key_budget is not None:
                self._key_budget -= 1
        granted = PERMISSION_ALL in self.permissions or route.permission in self.permissions
        if route.permission is not None and not granted:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Missing required permission: {route.permission}")
        return self.owner

    def _spec_operation(self, route: Route) -> SpecOperation | None:
        """The spec's operation for ``route`` (a stand-in route missing from it is a bug)."""
        if self.spec is None:
            return None
        op = self.spec.operation(route.method, route.template)
        if op is None:
            self._violation(f"{route.method} {route.template} is not in the spec")
        return op

    def _parse(
        self,
        route: Route,
        user: User,
        params: dict[str, str],
        raw_query: dict[str, str],
        content_type: str,
        raw: bytes,
    ) -> Call:
        """Decode the body and check path, query and body against the spec (400 if bad)."""
        media_type = content_type.split(";")[0].strip().lower()
        body, files = _decode_body(media_type, content_type, raw)
        call = Call(route, user, params, dict(raw_query), body, files)
        op = self._spec_operation(route)
        if op is None:
            return call
        if call.body is None and JSON_TYPE in op.body_types:
            call.body, media_type = {}, JSON_TYPE  # Nest parses a missing JSON body as {}
        errors = self.spec.check_path(op, params)  # type: ignore[union-attr]
        call.query, query_errors = self.spec.check_query(op, raw_query)  # type: ignore[union-attr]
        errors += query_errors + self._check_body(op, media_type, call)
        if errors:
            raise ApiError(HTTPStatus.BAD_REQUEST, errors)
        return call

    def _check_body(self, op: SpecOperation, media_type: str, call: Call) -> list[str]:
        """Body errors; multipart fields are typed first, v3's ``cursor`` is let through."""
        assert self.spec is not None
        body = call.body
        if media_type == MULTIPART_TYPE and op.body_types:
            types = self.spec.body_property_types(op, MULTIPART_TYPE)
            body = {name: coerce_text(value, types.get(name)) for name, value in body.items()}
            body.update(dict.fromkeys(call.files, BINARY_PLACEHOLDER))
            call.body = body
        if self.v3 and isinstance(body, dict) and "cursor" in body:
            body = {key: value for key, value in body.items() if key != "cursor"}
            if not isinstance(call.body["cursor"], str):
                return ["cursor must be a string"]
        if body is None and not op.body_types:
            return []
        return self.spec.check_body(op, media_type, body)

    def _corrupted(self, route: Route, reply: Reply) -> Reply:
        """Apply an injected ``corrupt`` fault to a successful JSON reply."""
        fault = self._take_fault(route, "corrupt") if reply.content_type == JSON_TYPE else None
        if fault is not None and fault.mutate is not None:
            reply.body = fault.mutate(copy.deepcopy(reply.body))
        return reply

    def _checked(self, route: Route, reply: Reply) -> Reply:
        """Check a reply against the spec; a mismatch is recorded as a stand-in bug."""
        op = self._spec_operation(route)
        if op is not None and self.spec is not None:
            for problem in self.spec.check_response(
                op, reply.status, reply.content_type, reply.body, self.response_sample
            ):
                self._violation(problem)
        return reply

    def _violation(self, problem: str) -> None:
        """Record a response (or route) that does not match the spec."""
        with self._lock:
            self.spec_violations.append(problem)

    def _log(self, record: RequestRecord) -> None:
        """Append to :attr:`requests`."""
        with self._lock:
            self.requests.append(record)

    @staticmethod
    def _send(http: BaseHTTPRequestHandler, reply: Reply) -> None:
        """Write the reply with a Content-Length (keep-alive)."""
        if isinstance(reply.body, bytes):
            payload = reply.body
        elif reply.body is None:
            payload = b""
        else:
            payload = json.dumps(reply.body, separators=JSON_SEPARATORS).encode()
        http.send_response(reply.status)
        if payload or reply.body is not None:
            http.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            http.send_header(name, value)
        http.send_header("Content-Length", str(len(payload)))
        http.end_headers()
        http.wfile.write(payload)


def _decode_body(
    media_type: str, content_type: str, raw: bytes
) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """JSON → value; multipart → (fields, files); nothing → None. Bad JSON is a 400."""
    if not raw:
        return None, {}
    if media_type == MULTIPART_TYPE:
        return _parse_multipart(content_type, raw)
    try:
        return json.loads(raw), {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"Unexpected token in JSON: {error}") from error


def _parse_multipart(
    content_type: str, raw: bytes
) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Split a multipart/form-data body into text fields and (filename, bytes) files."""
    message = BytesParser(policy=HTTP_POLICY).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = (part.get_filename() or "", payload)
        else:
            fields[str(name)] = payload.decode()
    return fields, files
