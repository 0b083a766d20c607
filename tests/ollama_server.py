"""A real HTTP stand-in for Ollama on 127.0.0.1, driven by darkroom's tests.

Darkroom talks to Ollama through the official ``ollama`` client, so its tests run that same
client against this server: what is exercised is the real wire format (NDJSON streaming,
``{"error": ...}`` bodies with their status codes, base64 images, JSON-schema ``format``).
What the "model" says comes from a *responder* the test supplies (:class:`AnswerQueue`,
:func:`by_image`, or any ``Callable[[ChatRequest], str | Answer | Fault]``); faults are
scripted with :meth:`OllamaServer.inject` or returned by a responder as a :class:`Fault`.

Imitated from Ollama's server (``shared/ollama/API-FACTS.md``): ``stream`` defaults to true;
``num_parallel`` slots with a FIFO queue and 503 past ``max_queue`` pending requests;
changing a load-time option (``num_ctx``, ``num_batch``, ...) reloads the model;
``num_predict`` truncates with ``done_reason: "length"``; an error before any streamed
content gets its real status, after some content an NDJSON ``{"error"}`` line under 200.
Stricter than Ollama on purpose: unknown roles and mistyped options are refused with 400;
unknown options and fields are kept in :attr:`OllamaServer.warnings` for tests to assert on.

This module holds the server itself (:class:`OllamaServer`, its :class:`Stats` and request
log); models, request and answer types, responders and body validation live in
:mod:`tests.ollama_protocol` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from tests.ollama_protocol import (
    _WORD,
    BUSY_MESSAGE,
    CANCELLED_STATUS,
    CHARS_PER_TOKEN,
    CHAT_FIELDS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODELS,
    DROP,
    HOST,
    LOAD_TIME_DEFAULTS,
    MESSAGE_FIELDS,
    NS_PER_S,
    OLLAMA_VERSION,
    OPTION_TYPES,
    POLL_S,
    PROMPT_EVAL_SHARE,
    RUNNER_CRASH_MESSAGE,
    SLOW,
    STATUS,
    TOKENS_PER_IMAGE,
    Answer,
    AnswerQueue,
    ApiError,
    ChatRequest,
    Fault,
    ModelSpec,
    Outcome,
    Responder,
    by_image,
    default_responder,
    full_name,
    keep_alive_seconds,
    parse_chat,
    schema_example,
)

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_MODELS",
    "RUNNER_CRASH_MESSAGE",
    "Answer",
    "AnswerQueue",
    "ChatRequest",
    "Fault",
    "LoggedRequest",
    "ModelSpec",
    "OllamaServer",
    "Outcome",
    "Responder",
    "Stats",
    "by_image",
    "default_responder",
    "schema_example",
]


@dataclass
class Stats:
    """What the server saw: chat calls, concurrency, loads and the options of every call."""

    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    loads: int = 0
    reloads: int = 0
    busy_rejections: int = 0
    cancelled: int = 0
    options: list[dict[str, Any]] = field(default_factory=list)

    def option_values(self, key: str) -> list[Any]:
        """The distinct values ``key`` took across calls (``None`` when it was not sent)."""
        values: list[Any] = []
        for options in self.options:
            if options.get(key) not in values:
                values.append(options.get(key))
        return values


@dataclass
class LoggedRequest:
    """One HTTP request as received, with the status it was answered with."""

    method: str
    path: str
    body: Any
    #: ``None`` if the server hung up without answering; 499 if the client hung up first.
    status: int | None = None


class _Slots:
    """``parallel`` generation slots; waiting requests are served FIFO, at most ``max_queue``."""

    def __init__(self, parallel: int, max_queue: int) -> None:
        self._cond = threading.Condition()
        self._free = parallel
        self._waiting: deque[object] = deque()
        self._max_queue = max_queue

    def acquire(self) -> bool:
        """Take a slot, waiting in line; ``False`` if the line is already full."""
        with self._cond:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            if len(self._waiting) >= self._max_queue:
                return False
            ticket = object()
            self._waiting.append(ticket)
            self._cond.wait_for(lambda: self._free > 0 and self._waiting[0] is ticket)
            self._waiting.popleft()
            self._free -= 1
            self._cond.notify_all()
            return True

    @property
    def waiting(self) -> int:
        """How many requests wait in line for a slot."""
        with self._cond:
            return len(self._waiting)

    def release(self) -> None:
        """Give a slot back and wake the line."""
        with self._cond:
            self._free += 1
            self._cond.notify_all()


class _HTTPServer(ThreadingHTTPServer):
    """The socket server, pointing back at the :class:`OllamaServer` that owns it."""

    daemon_threads = True

    def __init__(self, owner: OllamaServer) -> None:
        super().__init__((HOST, 0), _Handler)
        self.owner = owner
        self.open_sockets: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the connection so ``stop()`` can close kept-alive ones."""
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client, so a stopped server refuses like a dead Ollama."""
        for sock in list(self.open_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients that time out or hang up are part of the tests."""


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive like Ollama; chunked NDJSON for streams."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle and delayed ACKs
    # add ~40 ms to every keep-alive answer, which real servers do not.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """No per-request lines on stderr."""

    def _dispatch(self) -> None:
        owner = cast(_HTTPServer, self.server).owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.entry = owner.record(self.command, self.path, raw)
        try:
            owner.route(self, self.entry.body)
        except ApiError as error:
            self.send_json(error.status, {"error": error.message})
        except OSError:
            self.close_connection = True

    def send_json(self, status: int, payload: Any) -> None:
        """A complete JSON response."""
        data = json.dumps(payload).encode()
        self.entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def begin_stream(self) -> None:
        """Start a 200 NDJSON response in chunked transfer encoding."""
        self.entry.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def stream_line(self, payload: Any) -> None:
        """One NDJSON line as one HTTP chunk, flushed at once."""
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        """The last (empty) chunk."""
        self.wfile.write(b"0\r\n\r\n")

    def peer_gone(self) -> bool:
        """Whether the client hung up (e.g. its timeout fired) while we were generating."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)

    def drop(self) -> None:
        """Hang up without finishing the response."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


class OllamaServer:
    """The stand-in: ``with OllamaServer(responder) as server: Client(host=server.url)``."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        models: Iterable[ModelSpec] = DEFAULT_MODELS,
        num_parallel: int = 1,
        max_queue: int = DEFAULT_MAX_QUEUE,
        latency: float = 0.0,
        load_latency: float = 0.0,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.models = {spec.name: spec for spec in models}
        self.latency = latency
        self.load_latency = load_latency
        self.warnings: list[str] = []
        self._slots = _Slots(num_parallel, max_queue)
        self._lock = threading.Lock()
        self._stats = Stats()
        self._log: list[LoggedRequest] = []
        self._chats: list[ChatRequest] = []
        self._faults: deque[Fault] = deque()
        self._loaded: dict[str, tuple[dict[str, Any], float]] = {}
        self._counter = itertools.count()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._modified_at = (datetime.now(UTC) - timedelta(days=1)).isoformat()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("OllamaServer is not started")
        return f"http://{HOST}:{self._httpd.server_address[1]}"

    def start(self) -> OllamaServer:
        """Listen on a free port and serve from a background thread."""
        self._stopping.clear()
        self._httpd = _HTTPServer(self)
        serve = functools.partial(self._httpd.serve_forever, poll_interval=POLL_S)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving; sleeping generations wake up and hang up."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()

    def __enter__(self) -> OllamaServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Make the next ``times`` chat calls fail with ``fault`` (or be slow)."""
        with self._lock:
            self._faults.extend([fault] * times)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._lock:
            return copy.deepcopy(self._stats)

    @property
    def pending(self) -> int:
        """Chat requests waiting for a slot right now."""
        return self._slots.waiting

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every HTTP request so far, in arrival order."""
        with self._lock:
            return list(self._log)

    @property
    def chats(self) -> list[ChatRequest]:
        """Every chat request that reached the responder, in order."""
        with self._lock:
            return list(self._chats)

    def record(self, method: str, target: str, raw: bytes) -> LoggedRequest:
        """Log a request; its body is parsed JSON, or the raw text if it is not JSON."""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        entry = LoggedRequest(method, target.split("?")[0], body)
        with self._lock:
            self._log.append(entry)
        return entry

    def route(self, reply: _Handler, body: Any) -> None:
        """Answer one request (``ApiError`` becomes an error response)."""
        method, path = reply.command, reply.entry.path
        if method == "GET" and path == "/api/version":
            reply.send_json(200, {"version": OLLAMA_VERSION})
        elif method == "GET" and path == "/api/tags":
            tags = [spec.tag(self._modified_at) for spec in self.models.values()]
            reply.send_json(200, {"models": tags})
        elif method == "GET" and path == "/api/ps":
            reply.send_json(200, {"models": self._running()})
        elif method == "POST" and path == "/api/show":
            reply.send_json(200, self._show(body))
        elif method == "POST" and path == "/api/chat":
            self._chat(reply, body)
        else:
            raise ApiError(404, "404 page not found")

    def _show(self, body: Any) -> dict[str, Any]:
        """``/api/show`` for a known model, 404 otherwise."""
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not name:
            raise ApiError(400, "model is required")
        spec = self.models.get(full_name(name))
        if spec is None:
            raise ApiError(404, f"model '{name}' not found")
        return spec.show(self._modified_at)

    def _running(self) -> list[dict[str, Any]]:
        """``/api/ps``: the loaded models, with the context they were loaded with."""
        with self._lock:
            loaded = dict(self._loaded)
        return [
            self.models[name].tag(self._modified_at)
            | {"expires_at": datetime.fromtimestamp(expires, UTC).isoformat()}
            | {"size_vram": self.models[name].size, "context_length": options["num_ctx"]}
            for name, (options, expires) in loaded.items()
            if name in self.models
        ]

    def _chat(self, reply: _Handler, body: Any) -> None:
        """Validate, take a slot (or 503), account loads, then generate."""
        request = parse_chat(body, self.models, next(self._counter))
        self._warn_unknown(request)
        fault = self._next_fault()
        if fault is not None and fault.kind == STATUS:
            raise ApiError(fault.status, fault.message.replace("{model}", request.model))
        if not request.messages:
            reply.send_json(200, self._load_only(request))
            return
        if not self._slots.acquire():
            with self._lock:
                self._stats.busy_rejections += 1
            raise ApiError(503, BUSY_MESSAGE)
        try:
            started = time.monotonic()
            load_s = self._enter(request)
            outcome, delay = self._outcome(request, fault)
            self._generate(reply, request, outcome, delay + load_s, started)
        finally:
            self._leave(request)
            self._slots.release()

    def _warn_unknown(self, request: ChatRequest) -> None:
        """Record fields and options Ollama would ignore (a likely typo in darkroom)."""
        unknown = [f"field {key!r}" for key in request.body if key not in CHAT_FIELDS]
        unknown += [f"option {key!r}" for key in request.options if key not in OPTION_TYPES]
        for message in request.body.get("messages") or []:
            unknown += [f"message field {key!r}" for key in message if key not in MESSAGE_FIELDS]
        with self._lock:
            self.warnings.extend(f"call {request.index}: unknown {item}" for item in unknown)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _load_only(self, request: ChatRequest) -> dict[str, Any]:
        """No messages: Ollama just loads (or with ``keep_alive: 0`` unloads) the model."""
        unload = keep_alive_seconds(request.keep_alive) == 0
        with self._lock:
            if unload:
                self._loaded.pop(request.spec.name, None)
            else:
                self._load(request)
        reason = "unload" if unload else "load"
        return _response(request, {"role": "assistant", "content": ""}) | {"done_reason": reason}

    def _enter(self, request: ChatRequest) -> float:
        """Count the call; return the seconds spent (re)loading the model for it."""
        with self._lock:
            stats = self._stats
            stats.calls += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            stats.options.append(dict(request.options))
            self._chats.append(request)
            return self.load_latency if self._load(request) else 0.0

    def _load(self, request: ChatRequest) -> bool:
        """Make the model resident with the request's load-time options (lock held)."""
        wanted = {key: request.options.get(key, d) for key, d in LOAD_TIME_DEFAULTS.items()}
        current = self._loaded.get(request.spec.name)
        keep = keep_alive_seconds(request.keep_alive)
        expires = time.time() + (keep if keep >= 0 else 365 * 24 * 3600.0)
        self._loaded[request.spec.name] = (wanted, expires)
        if current is None:
            self._stats.loads += 1
        elif current[0] != wanted:
            self._stats.reloads += 1
        return current is None or current[0] != wanted

    def _leave(self, request: ChatRequest) -> None:
        with self._lock:
            self._stats.in_flight -= 1
            if keep_alive_seconds(request.keep_alive) == 0:
                self._loaded.pop(request.spec.name, None)

    def _outcome(self, request: ChatRequest, fault: Fault | None) -> tuple[Answer | Fault, float]:
        """The answer (or fault) for this call and how long generating it takes."""
        if fault is not None and fault.kind != SLOW:
            return fault, self.latency
        delay = fault.delay if fault is not None else self.latency
        try:
            result = self.responder(request)
        except Exception as error:  # a broken responder is a test bug: make it loud
            return Fault.server_error(f"stand-in responder raised {error!r}"), delay
        if isinstance(result, Fault) and result.kind == SLOW:
            delay, result = result.delay, default_responder(request)
        answer = Answer(result) if isinstance(result, str) else result
        if isinstance(answer, Answer) and answer.delay is not None:
            delay = answer.delay
        return answer, delay

    def _generate(
        self,
        reply: _Handler,
        request: ChatRequest,
        outcome: Answer | Fault,
        delay: float,
        t0: float,
    ) -> None:
        """Spend ``delay`` in the slot, then answer whole or as an NDJSON stream."""
        if not self._wait(reply, delay):
            reply.entry.status = CANCELLED_STATUS
            with self._lock:
                self._stats.cancelled += 1
            reply.drop()
            return
        if isinstance(outcome, Fault):
            self._fail(reply, request, outcome)
            return
        answer = _truncate(outcome, request.options.get("num_predict"))
        thinking = answer.thinking if request.thinking_enabled else ""
        final = _response(request, {"role": "assistant", "content": ""}) | _metrics(
            request, answer, thinking, delay, time.monotonic() - t0
        )
        if not request.stream:
            final["message"] = _message(answer.content, thinking)
            reply.send_json(200, final)
            return
        reply.begin_stream()
        for piece in _WORD.findall(thinking):
            reply.stream_line(_response(request, _message("", piece), done=False))
        for piece in _WORD.findall(answer.content):
            reply.stream_line(_response(request, _message(piece, ""), done=False))
        reply.stream_line(final)
        reply.end_stream()

    def _wait(self, reply: _Handler, seconds: float) -> bool:
        """Generate for ``seconds``; ``False`` if the client hung up or the server stops,
        which like Ollama's request cancellation frees the slot at once."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, POLL_S)) or reply.peer_gone():
                return False
        return not self._stopping.is_set()

    def _fail(self, reply: _Handler, request: ChatRequest, fault: Fault) -> None:
        """Apply a fault: an error status, an error line mid-stream, or a hang-up."""
        message = fault.message.replace("{model}", request.model)
        if fault.kind == DROP and not (request.stream and fault.partial):
            reply.drop()
        elif fault.kind == STATUS or not (request.stream and fault.partial):
            reply.send_json(fault.status, {"error": message})
        else:
            reply.begin_stream()
            reply.stream_line(_response(request, _message(fault.partial, ""), done=False))
            if fault.kind == DROP:
                reply.drop()
                return
            reply.stream_line({"error": message})
            reply.end_stream()


def _message(content: str, thinking: str) -> dict[str, Any]:
    """An assistant message; ``thinking`` only when there is some, as Ollama omits it."""
    return {"role": "assistant", "content": content} | ({"thinking": thinking} if thinking else {})


def _response(request: ChatRequest, message: dict[str, Any], done: bool = True) -> dict[str, Any]:
    """The fields every chat response object carries."""
    created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {"model": request.model, "created_at": created, "message": message, "done": done}


def _metrics(
    request: ChatRequest, answer: Answer, thinking: str, delay: float, total: float
) -> dict[str, Any]:
    """``done_reason``, token counts and durations in nanoseconds, as in Ollama's last object."""
    text = sum(len(message.content) for message in request.messages)
    return {
        "done_reason": answer.done_reason,
        "total_duration": int(total * NS_PER_S),
        "load_duration": int(max(0.0, total - delay) * NS_PER_S),
        "prompt_eval_count": text // CHARS_PER_TOKEN + TOKENS_PER_IMAGE * len(request.images),
        "prompt_eval_duration": int(delay * PROMPT_EVAL_SHARE * NS_PER_S),
        "eval_count": max(1, len(answer.content + thinking) // CHARS_PER_TOKEN),
        "eval_duration": int(delay * (1 - PROMPT_EVAL_SHARE) * NS_PER_S),
    }


def _truncate(answer: Answer, num_predict: Any) -> Answer:
    """Cut the content at ``num_predict`` tokens, as the runner does (``done_reason: length``)."""
    if not isinstance(num_predict, int | float) or num_predict < 0:
        return answer
    limit = int(num_predict) * CHARS_PER_TOKEN
    if len(answer.content) <= limit:
        return answer
    return Answer(answer.content[:limit], answer.thinking, "length", answer.delay)
