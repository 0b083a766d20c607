"""The vision adapter against the Ollama stand-in: checks, options, every failure mode."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from daemon.settings import OllamaSettings
from daemon.vision import (
    AnswerRejectedError,
    VisionModel,
    VisionModelMissingError,
    VisionPool,
    VisionUnavailableError,
)
from tests.immich_library import make_jpeg
from tests.ollama_server import DEFAULT_MODELS, Answer, Fault, OllamaServer

IMAGE = make_jpeg("chelsea")


@pytest.fixture
def ollama() -> Iterator[OllamaServer]:
    with OllamaServer(lambda _request: "A cat.", num_parallel=2) as server:
        yield server


def settings(*hosts: str, **options: object) -> OllamaSettings:
    return OllamaSettings(hosts=list(hosts), **options)  # type: ignore[arg-type]


def model(server: OllamaServer, **options: object) -> VisionModel:
    return VisionModel(settings(server.url, **options), server.url)


def test_check_reports_provenance(ollama: OllamaServer) -> None:
    provenance = model(ollama).check()
    expected = next(spec for spec in DEFAULT_MODELS if spec.name == "qwen2.5vl:7b")
    assert provenance.digest == expected.digest
    assert provenance.options == {"temperature": 0.0, "seed": 42, "num_ctx": 8192}


def test_check_names_missing_and_blind_models(ollama: OllamaServer) -> None:
    with pytest.raises(VisionModelMissingError, match=r"`ollama pull llava:13b`"):
        model(ollama, model="llava:13b").check()
    with pytest.raises(VisionModelMissingError, match="cannot see images"):
        model(ollama, model="llama3.2:3b").check()


def test_ask_sends_fixed_options_and_no_thinking(ollama: OllamaServer) -> None:
    vision = model(ollama, keep_alive="10m")
    for _ in range(3):
        assert vision.ask("Describe.", IMAGE) == "A cat."
    chat = ollama.chats[-1]
    assert chat.think is False and chat.keep_alive == "10m"
    assert chat.images == [IMAGE]
    assert ollama.stats.reloads == 0


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.busy(), "503"),
        (Fault.server_error(), "500"),
        (Fault.stream_error(), "500"),
        (Fault.drop(), "unreachable"),
        (Fault.slow(2.0), "timed out"),
    ],
)
def test_failures_mean_unavailable(ollama: OllamaServer, fault: Fault, message: str) -> None:
    ollama.inject(fault)
    with pytest.raises(VisionUnavailableError, match=message):
        model(ollama, timeout_s=0.5).ask("Describe.", IMAGE)


def test_model_removed_while_running(ollama: OllamaServer) -> None:
    ollama.inject(Fault.not_found())
    with pytest.raises(VisionModelMissingError):
        model(ollama).ask("Describe.", IMAGE)


def test_unreachable_host() -> None:
    with pytest.raises(VisionUnavailableError, match="unreachable"):
        VisionModel(settings("http://127.0.0.1:9"), "http://127.0.0.1:9").ask("x", IMAGE)
    with pytest.raises(VisionUnavailableError):
        VisionModel(settings("http://127.0.0.1:9"), "http://127.0.0.1:9").check()


def test_cut_off_answer_is_rejected(ollama: OllamaServer) -> None:
    ollama.responder = lambda _request: Answer("A cat sitting", done_reason="length")
    with pytest.raises(AnswerRejectedError, match="cut off"):
        model(ollama).ask("Describe.", IMAGE)


def test_pool_spreads_calls_and_bounds_parallelism() -> None:
    with (
        OllamaServer(lambda _r: "ok", num_parallel=2, max_queue=4, latency=0.05) as one,
        OllamaServer(lambda _r: "ok", num_parallel=2, max_queue=4, latency=0.05) as two,
    ):
        pool = VisionPool(settings(one.url, two.url, parallel=2))
        assert pool.slots == 4
        assert pool.check().model == "qwen2.5vl:7b"
        threads = [threading.Thread(target=lambda: pool.ask("x", IMAGE)) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pool.close()
        assert one.stats.calls + two.stats.calls == 16
        assert one.stats.calls >= 4 and two.stats.calls >= 4
        # Every slot was kept busy, and no host was sent more than it would queue.
        assert one.stats.max_in_flight == 2 and two.stats.max_in_flight == 2
        assert one.stats.busy_rejections == 0 and two.stats.busy_rejections == 0


def test_observer_counts_outcomes(ollama: OllamaServer) -> None:
    seen: list[tuple[str, str, float]] = []
    vision = VisionModel(settings(ollama.url), ollama.url, lambda *event: seen.append(event))
    vision.ask("Describe.", IMAGE)
    ollama.inject(Fault.busy())
    with pytest.raises(VisionUnavailableError):
        vision.ask("Describe.", IMAGE)
    ollama.responder = lambda _request: Answer("cut", done_reason="length")
    with pytest.raises(AnswerRejectedError):
        vision.ask("Describe.", IMAGE)
    assert [(host, outcome) for host, outcome, _ in seen] == [
        (ollama.url, "ok"),
        (ollama.url, "unavailable"),
        (ollama.url, "rejected"),
    ]
