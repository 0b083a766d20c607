"""The Ollama protocol as the stand-in server in :mod:`tests.ollama_server` speaks it.

Holds the installed models (:class:`ModelSpec`, :data:`DEFAULT_MODELS`), the request and
answer types (:class:`ChatRequest`, :class:`Answer`, :class:`Fault`), the responders that
decide what the "model" says (:class:`AnswerQueue`, :func:`by_image`,
:func:`default_responder`, :func:`schema_example`), the constants and messages copied from
Ollama, and the validation of ``/api/chat`` bodies (:func:`parse_chat`), which raises
:class:`ApiError` with Ollama's status and message. Nothing here opens a socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from PIL import Image, UnidentifiedImageError

OLLAMA_VERSION = "0.33.0"
HOST = "127.0.0.1"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_CRASH_MESSAGE = "llama runner process has terminated: exit status 2"
DEFAULT_MAX_QUEUE = 512
DEFAULT_KEEP_ALIVE_S = 300.0
#: How often a generation checks for a hung-up client, and the server for ``stop()``.
POLL_S = 0.01
CANCELLED_STATUS = 499
NS_PER_S = 1_000_000_000
GIB = 1 << 30
CHARS_PER_TOKEN = 4
TOKENS_PER_IMAGE = 576
PROMPT_EVAL_SHARE = 0.2
ROLES = frozenset({"system", "user", "assistant", "tool"})
THINK_LEVELS = frozenset({"low", "medium", "high"})
CHAT_FIELDS = frozenset(
    {"model", "messages", "format", "options", "stream", "think", "keep_alive", "tools"}
    | {"logprobs", "top_logprobs", "truncate", "shift"}
)
MESSAGE_FIELDS = frozenset({"role", "content", "images", "thinking", "tool_calls", "tool_name"})
#: Options the runner is started with: a change between requests reloads the model.
LOAD_TIME_DEFAULTS: Mapping[str, Any] = {
    "num_ctx": 4096,
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "num_thread": 0,
    "use_mmap": True,
}
_INT, _NUM, _BOOL, _STRS = "integer", "float32", "boolean", "array"
OPTION_TYPES: Mapping[str, str] = {
    **dict.fromkeys(("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread"), _INT),
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n"), _INT),
    **dict.fromkeys(("temperature", "top_p", "min_p", "typical_p", "repeat_penalty"), _NUM),
    **dict.fromkeys(("presence_penalty", "frequency_penalty"), _NUM),
    **dict.fromkeys(("use_mmap", "numa", "penalize_newline"), _BOOL),
    "stop": _STRS,
}
_DURATION = re.compile(r"-?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+|0")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_WORD = re.compile(r"\S+\s*|\s+")


class ApiError(Exception):
    """An error Ollama answers with ``status`` and the body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ModelSpec:
    """One installed model, as ``/api/tags``, ``/api/show`` and ``/api/ps`` describe it."""

    name: str
    family: str
    parameter_size: str
    capabilities: tuple[str, ...] = ("completion", "vision")
    quantization_level: str = "Q4_K_M"
    size: int = 6 * GIB
    context_length: int = 32768

    @property
    def digest(self) -> str:
        """A stable sha256 hex digest (what darkroom records as provenance)."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def thinking(self) -> bool:
        """Whether the model separates reasoning from content (``think``)."""
        return "thinking" in self.capabilities

    def details(self) -> dict[str, Any]:
        """The ``details`` object shared by tags, show and ps."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def tag(self, modified_at: str) -> dict[str, Any]:
        """This model's entry in ``GET /api/tags``."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def show(self, modified_at: str) -> dict[str, Any]:
        """The ``POST /api/show`` answer; ``model_info`` is required by the 0.6 client."""
        info = {"general.architecture": self.family, "general.basename": self.name}
        info[f"{self.family}.context_length"] = self.context_length
        return {
            "license": "",
            "modelfile": f"FROM {self.name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": self.details(),
            "model_info": info,
            "capabilities": list(self.capabilities),
            "modified_at": modified_at,
        }


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("qwen2.5vl:7b", "qwen25vl", "8.3B"),
    ModelSpec("qwen3-vl:8b", "qwen3vl", "8.8B", ("completion", "vision", "thinking", "tools")),
    ModelSpec("llama3.2:3b", "llama", "3.2B", ("completion", "tools"), size=2 * GIB),
)


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat request, images decoded to bytes."""

    role: str
    content: str = ""
    images: tuple[bytes, ...] = ()
    thinking: str = ""


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``POST /api/chat`` as the responder sees it."""

    model: str
    spec: ModelSpec
    messages: tuple[ChatMessage, ...]
    format: str | dict[str, Any] | None
    options: Mapping[str, Any]
    stream: bool
    think: bool | str | None
    keep_alive: float | str | None
    #: 0-based number of this ``/api/chat`` request, refused ones included.
    index: int
    body: Mapping[str, Any] = field(repr=False)

    @property
    def images(self) -> list[bytes]:
        """Every image of every message, in order."""
        return [image for message in self.messages for image in message.images]

    @property
    def prompt(self) -> str:
        """The content of the last user message ("" if there is none)."""
        users = [message.content for message in self.messages if message.role == "user"]
        return users[-1] if users else ""

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema asked for in ``format``, if any."""
        return self.format if isinstance(self.format, dict) else None

    @property
    def thinking_enabled(self) -> bool:
        """Ollama turns thinking on by default for thinking models; ``think: false`` stops it."""
        return self.spec.thinking and self.think is not False

    def image(self, index: int = 0) -> Image.Image:
        """The ``index``-th image opened with Pillow (fully loaded)."""
        opened = Image.open(io.BytesIO(self.images[index]))
        opened.load()
        return opened


@dataclass(frozen=True)
class Answer:
    """What the model says: content, optional reasoning, and how generation ended."""

    content: str
    thinking: str = ""
    done_reason: str = "stop"
    delay: float | None = None

    @classmethod
    def json(cls, value: Any, **kwargs: Any) -> Answer:
        """An answer whose content is ``value`` serialized as JSON."""
        return cls(json.dumps(value), **kwargs)


STATUS, STREAM_ERROR, DROP, SLOW = "status", "stream_error", "drop", "slow"


@dataclass(frozen=True)
class Fault:
    """Something going wrong instead of (or before) an answer. ``{model}`` in a message is
    replaced by the requested model name."""

    kind: str
    status: int = 500
    message: str = ""
    partial: str = ""
    delay: float = 0.0

    @classmethod
    def busy(cls) -> Fault:
        """503 with Ollama's exact queue-full message."""
        return cls(STATUS, 503, BUSY_MESSAGE)

    @classmethod
    def not_found(cls) -> Fault:
        """404 as for a model that is not (or no longer) pulled."""
        return cls(STATUS, 404, "model '{model}' not found")

    @classmethod
    def server_error(cls, message: str = RUNNER_CRASH_MESSAGE, status: int = 500) -> Fault:
        """An HTTP error with ``{"error": message}``."""
        return cls(STATUS, status, message)

    @classmethod
    def stream_error(cls, message: str = RUNNER_CRASH_MESSAGE, partial: str = '{"desc') -> Fault:
        """Stream ``partial`` then an NDJSON error line under 200 (500 if not streaming)."""
        return cls(STREAM_ERROR, 500, message, partial)

    @classmethod
    def drop(cls, partial: str = "") -> Fault:
        """Close the connection, after streaming ``partial`` if it is not empty."""
        return cls(DROP, partial=partial)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Generation takes ``seconds`` (holding a slot), then the responder answers."""
        return cls(SLOW, delay=seconds)


Outcome = str | Answer | Fault
Responder = Callable[[ChatRequest], Outcome]


class AnswerQueue:
    """A responder handing out scripted outcomes one call at a time, in order."""

    def __init__(self, *outcomes: Outcome) -> None:
        self._outcomes: deque[Outcome] = deque(outcomes)
        self._lock = threading.Lock()

    def push(self, *outcomes: Outcome) -> None:
        """Append outcomes for later calls."""
        with self._lock:
            self._outcomes.extend(outcomes)

    def __len__(self) -> int:
        return len(self._outcomes)

    def __call__(self, request: ChatRequest) -> Outcome:
        with self._lock:
            if self._outcomes:
                return self._outcomes.popleft()
        return Fault.server_error(f"stand-in: no scripted answer left for call {request.index}")


def by_image(answer: Callable[[Image.Image, ChatRequest], Outcome]) -> Responder:
    """A responder answering from the request's first image, e.g. by how it is rotated."""

    def respond(request: ChatRequest) -> Outcome:
        if not request.images:
            return Fault.server_error("stand-in: by_image responder got no image")
        return answer(request.image(0), request)

    return respond


def default_responder(request: ChatRequest) -> Outcome:
    """A well-behaved model: a minimal valid instance of the schema, ``{}``, or a sentence."""
    if request.schema is not None:
        return Answer.json(schema_example(request.schema))
    return "{}" if request.format == "json" else "A photograph."


def schema_example(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """A small value valid against ``schema`` (numbers at the middle of their bounds)."""
    root = schema if root is None else root
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_example(target, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return schema_example(schema[key][0], root)
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: schema_example(sub, root) for name, sub in properties.items()}
    if kind == "array":
        count = max(1, schema.get("minItems", 0))
        return [schema_example(schema.get("items", {}), root) for _ in range(count)]
    if kind in ("integer", "number"):
        return _middle(schema, integer=kind == "integer")
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 0))
    return True if kind == "boolean" else None


def _middle(schema: Mapping[str, Any], *, integer: bool) -> float:
    """The middle of a numeric schema's bounds (exclusive bounds nudged inwards)."""
    step = 1 if integer else 0.5
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + step)
    low = low if "minimum" in schema or "exclusiveMinimum" in schema else None
    high = schema.get("maximum", schema.get("exclusiveMaximum", 0) - step)
    high = high if "maximum" in schema or "exclusiveMaximum" in schema else None
    bounds = [bound for bound in (low, high) if bound is not None]
    value = sum(bounds) / len(bounds) if bounds else 0
    return int(value) if integer else value


def parse_chat(body: Any, models: Mapping[str, ModelSpec], index: int) -> ChatRequest:
    """Validate a chat body the way Ollama does (a little stricter); raise :class:`ApiError`."""
    if body is None:
        raise ApiError(400, "missing request body")
    if not isinstance(body, dict):
        raise ApiError(400, "json: cannot unmarshal into Go value of type api.ChatRequest")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    spec = models.get(full_name(model))
    if spec is None:
        raise ApiError(404, f"model '{model}' not found")
    raw_messages = body.get("messages") or []
    if not isinstance(raw_messages, list):
        raise ApiError(400, "messages must be an array")
    think = body.get("think")
    if think is not None and not isinstance(think, bool) and think not in THINK_LEVELS:
        raise ApiError(400, f"invalid think value: {json.dumps(think)}")
    if think not in (None, False) and not spec.thinking:
        raise ApiError(400, f'"{model}" does not support thinking')
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean")
    return ChatRequest(
        model=model,
        spec=spec,
        messages=tuple(_parse_message(raw, i) for i, raw in enumerate(raw_messages)),
        format=_check_format(body.get("format")),
        options=_check_options(body.get("options")),
        stream=stream is not False,
        think=think,
        keep_alive=_check_keep_alive(body.get("keep_alive")),
        index=index,
        body=body,
    )


def full_name(model: str) -> str:
    """``llava`` means ``llava:latest`` to Ollama."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def _parse_message(raw: Any, position: int) -> ChatMessage:
    """One message: a known role, string content, a list of base64 images."""
    where = f"messages[{position}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"{where} must be an object")
    if raw.get("role") not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {sorted(ROLES)}, not {raw.get('role')!r}")
    content, images = raw.get("content") or "", raw.get("images") or []
    if not isinstance(content, str) or not isinstance(images, list):
        raise ApiError(400, f"{where}: content must be a string and images an array")
    decoded = tuple(_decode_image(item, f"{where}.images") for item in images)
    return ChatMessage(raw["role"], content, decoded, raw.get("thinking") or "")


def _decode_image(item: Any, where: str) -> bytes:
    """Base64 to bytes like Go's ``[]byte`` JSON decoding, then check it is an image."""
    if not isinstance(item, str):
        raise ApiError(400, f"{where} must hold base64 strings")
    try:
        data = base64.b64decode(item, validate=True)
    except binascii.Error:
        bad = re.search(r"[^A-Za-z0-9+/=]", item)
        at = bad.start() if bad else len(item)
        raise ApiError(400, f"illegal base64 data at input byte {at}") from None
    try:
        Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError(500, "failed to process inputs: image: unknown format") from None
    return data


def _check_format(value: Any) -> str | dict[str, Any] | None:
    """``"json"``, a JSON schema object, or nothing; the runner refuses anything else."""
    if value in (None, ""):
        return None
    if value == "json":
        return value
    if not isinstance(value, dict):
        quoted = json.dumps(json.dumps(value))
        raise ApiError(
            500, f'invalid format: {quoted}; expected "json" or a valid JSON Schema object'
        )
    try:
        validator_for(value).check_schema(value)
    except SchemaError:
        raise ApiError(500, "invalid JSON schema in format") from None
    return value


def _check_options(options: Any) -> dict[str, Any]:
    """Options by name and type (a mistyped one fails loading: 500); unknown names pass,
    as Ollama only logs a warning."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    for key, value in options.items():
        kind = OPTION_TYPES.get(key)
        if kind is not None and not _has_type(value, kind):
            raise ApiError(500, f'option "{key}" must be of type {kind}')
    return dict(options)


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value fits an option type (Go accepts 3.0 for an integer)."""
    if kind == _BOOL or isinstance(value, bool):
        return kind == _BOOL and isinstance(value, bool)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind == _INT:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)


def _check_keep_alive(value: Any) -> float | str | None:
    """Seconds as a number, or a Go duration string (``"5m"``, ``"-1"`` is not one)."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and _DURATION.fullmatch(value):
        return value
    raise ApiError(400, f"time: invalid duration {json.dumps(value)}")


def keep_alive_seconds(value: float | str | None) -> float:
    """How long a model stays loaded after a request (negative: forever)."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, int | float):
        return float(int(value))  # Go truncates to whole seconds: 0.5 unloads at once
    total = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))
    return -total if value.startswith("-") else total
