"""The vision adapter: one Ollama model behind the official ``ollama`` client.

Every call goes through :meth:`VisionModel.ask`, which fixes the options (so Ollama never
reloads the model between calls), turns thinking off, bounds the wait, and maps every
failure to one of the exceptions below: *unavailable* (Ollama down or busy: try the asset
again later), *rejected* (the answer did not validate: counts as a failed attempt), or
*missing* (the model is not there: stop and say how to pull it).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import ollama

from daemon.prompts import PROMPT_VERSION
from daemon.settings import OllamaSettings

log = logging.getLogger("darkroom.vision")

VISION_CAPABILITY = "vision"
HTTP_NOT_FOUND = 404
# Requests in flight per Ollama slot: one running, one waiting in Ollama's own queue.
IN_FLIGHT_PER_SLOT = 2


class VisionError(Exception):
    """A call to the vision model did not give a usable answer."""


class VisionUnavailableError(VisionError):
    """Ollama cannot answer now (down, busy, timed out): the work stays pending."""


class VisionModelMissingError(VisionError):
    """The configured model is absent or cannot see images: nothing can be curated."""


class AnswerRejectedError(VisionError):
    """The model answered, but the answer failed validation."""


# Called after every model call: (host, outcome, seconds).
VisionObserver = Callable[[str, str, float], None]
OUTCOMES: dict[type[VisionError], str] = {
    VisionError: "failed",
    VisionUnavailableError: "unavailable",
    VisionModelMissingError: "missing",
    AnswerRejectedError: "rejected",
}


@dataclass(frozen=True)
class Provenance:
    """What produced a result: enough to tell results of another model or prompt apart."""

    model: str
    digest: str
    prompt_version: int
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For the store and Immich metadata."""
        return {
            "model": self.model,
            "digest": self.digest,
            "prompt_version": self.prompt_version,
            "options": dict(self.options),
        }


def call_options(settings: OllamaSettings) -> dict[str, Any]:
    """The options sent with every call; constant, so the model is loaded once."""
    return {"temperature": settings.temperature, "seed": settings.seed, "num_ctx": settings.num_ctx}


class VisionModel:
    """The configured model on one Ollama host."""

    def __init__(
        self, settings: OllamaSettings, host: str, observer: VisionObserver | None = None
    ) -> None:
        self.settings = settings
        self.host = host
        self._observer = observer
        self._options = call_options(settings)
        self._client = ollama.Client(host=host, timeout=settings.timeout_s)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()

    def check(self) -> Provenance:
        """Confirm the model exists here and sees images; return its provenance."""
        name = self.settings.model
        try:
            shown = self._client.show(name)
            listed = self._client.list()
        except ollama.ResponseError as exc:
            if exc.status_code == HTTP_NOT_FOUND:
                raise VisionModelMissingError(
                    f"Ollama at {self.host} has no model {name!r}: run `ollama pull {name}` "
                    "there, or set ollama.model to a vision model it has"
                ) from None
            raise VisionUnavailableError(f"Ollama at {self.host}: {exc.error}") from None
        except (ConnectionError, httpx.HTTPError) as exc:
            raise VisionUnavailableError(f"Ollama at {self.host} unreachable: {exc}") from None
        capabilities = list(shown.capabilities or [])
        if VISION_CAPABILITY not in capabilities:
            raise VisionModelMissingError(
                f"model {name!r} on {self.host} cannot see images (capabilities: "
                f"{', '.join(capabilities) or 'none'}); choose a vision model such as "
                "qwen2.5vl:7b and `ollama pull` it"
            )
        digest = next((m.digest for m in listed.models if m.model == name), None) or "unknown"
        return Provenance(name, digest, PROMPT_VERSION, self._options)

    def ask(self, prompt: str, image: bytes, schema: dict[str, Any] | None = None) -> str:
        """One chat turn with one image; the answer's text, or a VisionError."""
        started = time.monotonic()
        outcome = "ok"
        try:
            return self._ask(prompt, image, schema)
        except VisionError as exc:
            outcome = OUTCOMES[type(exc)]
            raise
        finally:
            if self._observer is not None:
                self._observer(self.host, outcome, time.monotonic() - started)

    def _ask(self, prompt: str, image: bytes, schema: dict[str, Any] | None) -> str:
        try:
            response = self._client.chat(
                model=self.settings.model,
                messages=[{"role": "user", "content": prompt, "images": [image]}],
                format=schema,
                options=self._options,
                keep_alive=self.settings.keep_alive,
                think=False,
                stream=False,
            )
        except ollama.ResponseError as exc:
            if exc.status_code == HTTP_NOT_FOUND:
                raise VisionModelMissingError(f"{self.host}: {exc.error}") from None
            raise VisionUnavailableError(
                f"Ollama at {self.host} answered {exc.status_code}: {exc.error}"
            ) from None
        except (ConnectionError, httpx.HTTPError) as exc:
            kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "unreachable"
            raise VisionUnavailableError(f"Ollama at {self.host} {kind}: {exc}") from None
        log.debug("%s answered with %s tokens", self.host, response.eval_count)
        if response.done_reason == "length":
            raise AnswerRejectedError("answer cut off at the token limit")
        return response.message.content or ""


class VisionPool:
    """Every host's model, lent out to ``parallel × IN_FLIGHT_PER_SLOT`` callers at once.

    The second request per slot waits in Ollama's own queue, so a slot that frees up
    starts the next generation at once instead of idling while darkroom prepares and
    sends the next image; Ollama never holds more than one waiting request per slot.
    """

    def __init__(self, settings: OllamaSettings, observer: VisionObserver | None = None) -> None:
        self.models = [
            VisionModel(settings, str(host).rstrip("/"), observer) for host in settings.hosts
        ]
        self._free: queue.Queue[VisionModel] = queue.Queue()
        for _ in range(settings.parallel * IN_FLIGHT_PER_SLOT):
            for model in self.models:
                self._free.put(model)

    @property
    def slots(self) -> int:
        """How many calls Ollama runs at once across all hosts."""
        return len(self.models) * self.models[0].settings.parallel

    def check(self) -> Provenance:
        """Check every host; they must serve the same model digest (one provenance)."""
        found = [model.check() for model in self.models]
        digests = {p.digest for p in found}
        if len(digests) > 1:
            raise VisionModelMissingError(
                f"hosts serve different builds of {found[0].model} ({', '.join(sorted(digests))}): "
                "pull the same tag everywhere so results are comparable"
            )
        return found[0]

    @contextmanager
    def borrow(self) -> Iterator[VisionModel]:
        """A model on a host with a free slot (waits until one is free)."""
        model = self._free.get()
        try:
            yield model
        finally:
            self._free.put(model)

    def ask(self, prompt: str, image: bytes, schema: dict[str, Any] | None = None) -> str:
        """One call on whichever host has a free slot first.

        A slot is held per call, not per photo, so photos being downloaded or prepared
        never keep a model idle.
        """
        with self.borrow() as model:
            return model.ask(prompt, image, schema)

    def close(self) -> None:
        """Close every host's client."""
        for model in self.models:
            model.close()
