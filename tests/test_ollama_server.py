"""The Ollama stand-in, exercised through the official ``ollama`` client and plain httpx.

These pin both the stand-in's behaviour and what the 0.6 client does with it (which
exception, which ``status_code``), since darkroom's vision adapter relies on the latter.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from PIL import Image
from skimage import data

from tests.ollama_server import (
    BUSY_MESSAGE,
    Answer,
    AnswerQueue,
    ChatRequest,
    Fault,
    OllamaServer,
    by_image,
    schema_example,
)

VISION = "qwen2.5vl:7b"
THINKER = "qwen3-vl:8b"
TEXT_ONLY = "llama3.2:3b"
TIMEOUT_S = 5.0
SHORT_TIMEOUT_S = 0.2
LATENCY_S = 0.05
SHA256_HEX_LENGTH = 64
SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "focus": {"type": "integer", "minimum": 1, "maximum": 10},
        "exposure": {"type": "number", "minimum": 0, "maximum": 1},
        "description": {"type": "string", "minLength": 3},
    },
    "required": ["focus", "exposure", "description"],
}
SCORE = {"focus": 7, "exposure": 0.5, "description": "An astronaut in a suit."}


def _jpeg(array: Any = None) -> bytes:
    """A real photograph (scikit-image's astronaut by default) as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut() if array is None else array).save(buffer, "JPEG")
    return buffer.getvalue()


def _ask(image: bytes | None = None, text: str = "Rate this photo.") -> list[dict[str, Any]]:
    """One user message, with an image if given."""
    message: dict[str, Any] = {"role": "user", "content": text}
    return [message | {"images": [image]}] if image else [message]


@pytest.fixture
def server() -> Iterator[OllamaServer]:
    with OllamaServer() as running:
        yield running


@pytest.fixture
def client(server: OllamaServer) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=TIMEOUT_S)


def _in_threads(count: int, call: Callable[[], Any]) -> list[Any]:
    """Run ``call`` in ``count`` threads at once; results or raised exceptions, in order."""
    results: list[Any] = [None] * count

    def run(slot: int) -> None:
        try:
            results[slot] = call()
        except Exception as error:
            results[slot] = error

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    return results


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def test_version_tags_and_show(server: OllamaServer, client: ollama.Client) -> None:
    assert httpx.get(f"{server.url}/api/version").json() == {"version": "0.33.0"}
    tags = httpx.get(f"{server.url}/api/tags").json()["models"]
    assert {tag["name"] for tag in tags} == {VISION, THINKER, TEXT_ONLY}
    listed = {model.model: model for model in client.list().models}
    assert len(listed[VISION].digest or "") == SHA256_HEX_LENGTH
    assert listed[VISION].details is not None
    assert listed[VISION].details.parameter_size == "8.3B"
    assert "vision" in (client.show(VISION).capabilities or [])
    assert "vision" not in (client.show(TEXT_ONLY).capabilities or [])
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope:1b")
    assert (caught.value.status_code, caught.value.error) == (404, "model 'nope:1b' not found")


def test_chat_with_image_and_schema(server: OllamaServer, client: ollama.Client) -> None:
    server.responder = AnswerQueue(Answer.json(SCORE))
    jpeg = _jpeg()
    options = {"temperature": 0, "seed": 42, "num_ctx": 8192}
    response = client.chat(VISION, _ask(jpeg), format=SCORE_SCHEMA, options=options)
    assert json.loads(response.message.content or "") == SCORE
    assert (response.done, response.done_reason, response.model) == (True, "stop", VISION)
    assert response.eval_count and response.prompt_eval_count
    assert response.total_duration and response.total_duration > 0
    (seen,) = server.chats
    assert seen.images == [jpeg] and seen.image().size == (512, 512)
    assert seen.schema == SCORE_SCHEMA and seen.prompt == "Rate this photo."
    assert dict(seen.options) == options and seen.stream is False
    logged = server.requests[-1]
    assert (logged.method, logged.path, logged.status) == ("POST", "/api/chat", 200)
    assert logged.body["format"] == SCORE_SCHEMA and logged.body["stream"] is False


def test_chat_streaming(server: OllamaServer, client: ollama.Client) -> None:
    server.responder = AnswerQueue(Answer.json(SCORE))
    parts = list(client.chat(VISION, _ask(_jpeg()), format=SCORE_SCHEMA, stream=True))
    assert len(parts) > 2
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert json.loads("".join(part.message.content or "" for part in parts)) == SCORE
    assert parts[-1].done_reason == "stop" and parts[-1].eval_duration is not None


def test_stream_defaults_to_true_on_the_wire(server: OllamaServer) -> None:
    body = {"model": VISION, "messages": _ask(text="hi")}
    streamed = httpx.post(f"{server.url}/api/chat", json=body)
    assert streamed.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
    whole = httpx.post(f"{server.url}/api/chat", json=body | {"stream": False}).json()
    assert whole["message"] == {"role": "assistant", "content": "A photograph."}
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(whole[key], int)


def test_default_responder_satisfies_the_schema(client: ollama.Client) -> None:
    schema = {
        "$defs": {"Score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
        "type": "object",
        "properties": {
            "focus": {"$ref": "#/$defs/Score"},
            "orientation": {"enum": [0, 90, 180, 270]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        },
        "required": ["focus", "orientation", "tags"],
    }
    content = client.chat(VISION, _ask(_jpeg()), format=schema).message.content or ""
    jsonschema.validate(json.loads(content), schema)
    assert schema_example(SCORE_SCHEMA) == {"focus": 5, "exposure": 0.5, "description": "xxx"}


def test_by_image_answers_from_the_picture(server: OllamaServer, client: ollama.Client) -> None:
    def orientation(image: Image.Image, request: ChatRequest) -> Answer:
        return Answer.json({"landscape": image.width > image.height, "model": request.model})

    server.responder = by_image(orientation)
    wide = _jpeg(data.astronaut()[:256])
    tall = _jpeg(data.astronaut()[:, :256])
    for image, landscape in ((wide, True), (tall, False)):
        content = client.chat(VISION, _ask(image), format="json").message.content or ""
        assert json.loads(content) == {"landscape": landscape, "model": VISION}


def test_missing_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("llava:13b", _ask(text="hi"))
    assert (caught.value.status_code, caught.value.error) == (404, "model 'llava:13b' not found")
    stream = client.chat("llava:13b", _ask(text="hi"), stream=True)
    with pytest.raises(ollama.ResponseError) as streamed:
        next(iter(stream))
    assert streamed.value.status_code == 404


def test_injected_busy_then_recovers(server: OllamaServer, client: ollama.Client) -> None:
    server.inject(Fault.busy(), times=2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(VISION, _ask(text="hi"))
        assert (caught.value.status_code, caught.value.error) == (503, BUSY_MESSAGE)
    assert client.chat(VISION, _ask(text="hi")).done
    assert [entry.status for entry in server.requests] == [503, 503, 200]


def test_queue_past_max_queue_is_503() -> None:
    with OllamaServer(num_parallel=1, max_queue=1, latency=0.5) as server:
        client = ollama.Client(host=server.url, timeout=TIMEOUT_S)
        first = threading.Thread(target=client.chat, args=(VISION, _ask(text="a")))
        first.start()
        _wait_until(lambda: server.stats.in_flight == 1)
        second = threading.Thread(target=client.chat, args=(VISION, _ask(text="b")))
        second.start()
        _wait_until(lambda: server.pending == 1)
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(VISION, _ask(text="c"))
        first.join(TIMEOUT_S)
        second.join(TIMEOUT_S)
    assert (caught.value.status_code, caught.value.error) == (503, BUSY_MESSAGE)
    assert server.stats.busy_rejections == 1 and server.stats.calls == 2


def test_queued_requests_are_served_in_arrival_order() -> None:
    with OllamaServer(num_parallel=1, latency=LATENCY_S) as server:
        client = ollama.Client(host=server.url, timeout=TIMEOUT_S)
        threads = []
        for position, text in enumerate("abcd"):
            thread = threading.Thread(target=client.chat, args=(VISION, _ask(text=text)))
            thread.start()
            threads.append(thread)
            arrived = position + 1  # served or queued, before the next one starts
            _wait_until(lambda n=arrived: server.stats.calls + server.pending == n)
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert [chat.prompt for chat in server.chats] == list("abcd")
    assert server.stats.max_in_flight == 1


def test_server_error_is_500(server: OllamaServer, client: ollama.Client) -> None:
    server.inject(Fault.server_error("out of memory"))
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(VISION, _ask(text="hi"))
    assert (caught.value.status_code, caught.value.error) == (500, "out of memory")
    server.responder = AnswerQueue(Fault.server_error("{model} crashed", status=502), "fine")
    with pytest.raises(ollama.ResponseError) as scripted:
        client.chat(VISION, _ask(text="hi"))
    assert (scripted.value.status_code, scripted.value.error) == (502, f"{VISION} crashed")
    assert client.chat(VISION, _ask(text="hi")).message.content == "fine"


def test_error_mid_stream(server: OllamaServer, client: ollama.Client) -> None:
    server.inject(Fault.stream_error("runner crashed", partial='{"focus": '), times=2)
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as caught:
        for part in client.chat(VISION, _ask(text="hi"), stream=True):
            received.append(part.message.content or "")
    assert received == ['{"focus": ']
    # The 0.6 client gives an error inside a 200 stream the status code -1.
    assert (caught.value.status_code, caught.value.error) == (-1, "runner crashed")
    assert server.requests[-1].status == 200
    with pytest.raises(ollama.ResponseError) as whole:
        client.chat(VISION, _ask(text="hi"))
    assert (whole.value.status_code, whole.value.error) == (500, "runner crashed")


def test_slow_answer_times_out_and_frees_the_slot(server: OllamaServer) -> None:
    server.inject(Fault.slow(TIMEOUT_S))
    impatient = ollama.Client(host=server.url, timeout=SHORT_TIMEOUT_S)
    with pytest.raises(httpx.TimeoutException):
        impatient.chat(VISION, _ask(text="hi"))
    started = time.monotonic()
    assert ollama.Client(host=server.url, timeout=TIMEOUT_S).chat(VISION, _ask(text="hi")).done
    assert time.monotonic() - started < TIMEOUT_S / 2
    _wait_until(lambda: server.stats.cancelled == 1)
    assert server.requests[0].status == 499


def test_dropped_connection(server: OllamaServer, client: ollama.Client) -> None:
    server.inject(Fault.drop())
    with pytest.raises(httpx.RemoteProtocolError):
        client.chat(VISION, _ask(text="hi"))
    server.inject(Fault.drop(partial="half an answ"))
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        for part in client.chat(VISION, _ask(text="hi"), stream=True):
            received.append(part.message.content or "")
    assert received == ["half an answ"]
    assert client.chat(VISION, _ask(text="hi")).done


@pytest.mark.parametrize("parallel", [1, 2])
def test_parallelism_is_bounded_by_num_parallel(parallel: int) -> None:
    calls, latency, messages = 6, 2 * LATENCY_S, _ask(_jpeg())
    with OllamaServer(num_parallel=parallel, latency=latency) as server:
        client = ollama.Client(host=server.url, timeout=TIMEOUT_S)
        started = time.monotonic()
        results = _in_threads(calls, lambda: client.chat(VISION, messages))
        elapsed = time.monotonic() - started
    assert all(isinstance(result, ollama.ChatResponse) for result in results)
    assert server.stats.calls == calls and server.stats.max_in_flight == parallel
    assert elapsed >= calls / parallel * latency


def test_reloads_counted_when_load_time_options_change(
    server: OllamaServer, client: ollama.Client
) -> None:
    steady = {"num_ctx": 8192, "temperature": 0.0, "seed": 7}
    for options in (steady, steady, steady | {"temperature": 0.3}):
        client.chat(VISION, _ask(text="hi"), options=options)
    assert (server.stats.loads, server.stats.reloads) == (1, 0)
    client.chat(VISION, _ask(text="hi"), options=steady | {"num_ctx": 4096})
    client.chat(VISION, _ask(text="hi"))  # default num_ctx 4096: no change
    client.chat(VISION, _ask(text="hi"), options={"num_batch": 256})
    stats = server.stats
    assert (stats.loads, stats.reloads) == (1, 2)
    assert stats.option_values("num_ctx") == [8192, 4096, None]
    assert stats.option_values("seed") == [7, None]
    assert client.ps().models[0].context_length == 4096


def test_body_validation(server: OllamaServer) -> None:
    def post(body: dict[str, Any]) -> tuple[int, str]:
        answer = httpx.post(f"{server.url}/api/chat", json=body | {"stream": False})
        return answer.status_code, answer.json().get("error", "")

    ask = {"model": VISION, "messages": _ask(text="hi")}
    assert post({"messages": ask["messages"]}) == (400, "model is required")
    assert post(ask | {"messages": [{"role": "robot", "content": "x"}]})[0] == 400
    bad_image = [{"role": "user", "content": "x", "images": ["not base64!"]}]
    assert post(ask | {"messages": bad_image}) == (400, "illegal base64 data at input byte 3")
    assert post(ask | {"format": "xml"})[1].startswith("invalid format:")
    assert post(ask | {"format": {"type": 12}}) == (500, "invalid JSON schema in format")
    assert post(ask | {"options": {"num_ctx": "big"}}) == (
        500,
        'option "num_ctx" must be of type integer',
    )
    assert post(ask | {"keep_alive": "300"})[0] == 400
    assert post(ask | {"options": {"temprature": 0.1}, "keep_alive": "10m"})[0] == 200
    assert server.warnings == ["call 7: unknown option 'temprature'"]


def test_thinking(client: ollama.Client, server: OllamaServer) -> None:
    server.responder = lambda _request: Answer("{}", thinking="Let me look at the sky.")
    assert client.chat(THINKER, _ask(text="hi")).message.thinking == "Let me look at the sky."
    assert client.chat(THINKER, _ask(text="hi"), think=False).message.thinking is None
    assert client.chat(VISION, _ask(text="hi")).message.thinking is None
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(VISION, _ask(text="hi"), think=True)
    assert caught.value.status_code == 400
    assert caught.value.error == f'"{VISION}" does not support thinking'


def test_num_predict_truncates(server: OllamaServer, client: ollama.Client) -> None:
    server.responder = AnswerQueue(Answer.json(SCORE))
    response = client.chat(VISION, _ask(text="hi"), options={"num_predict": 2})
    assert response.done_reason == "length" and response.message.content == '{"focus"'


def test_load_unload_and_exhausted_queue(server: OllamaServer, client: ollama.Client) -> None:
    assert client.chat(VISION, []).done_reason == "load"
    assert [model.model for model in client.ps().models] == [VISION]
    assert client.chat(VISION, [], keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    server.responder = AnswerQueue()
    with pytest.raises(ollama.ResponseError, match="no scripted answer left"):
        client.chat(VISION, _ask(text="hi"))


def test_stopped_server_refuses_connections() -> None:
    server = OllamaServer().start()
    client = ollama.Client(host=server.url, timeout=TIMEOUT_S)
    assert client.chat(VISION, _ask(text="hi")).done
    server.stop()
    # Non-streaming calls wrap the refusal in the built-in ConnectionError ...
    with pytest.raises(ConnectionError):
        client.chat(VISION, _ask(text="hi"))
    # ... streaming calls do not: httpx.ConnectError escapes, on the first next().
    with pytest.raises(httpx.ConnectError):
        next(iter(client.chat(VISION, _ask(text="hi"), stream=True)))
