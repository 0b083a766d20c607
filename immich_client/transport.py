"""One door for every HTTP call to Immich: auth, timeouts, retries, error mapping.

``Transport.request`` is the only place that touches httpx.  It retries, with exponential
backoff and jitter, only what may succeed on a second try: connection failures, 429 and
5xx (for calls that are safe to repeat).  Every 4xx is final and becomes a typed
exception from :mod:`immich_client.errors`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from immich_client.errors import (
    ImmichAuthError,
    ImmichError,
    ImmichForbiddenError,
    ImmichNotFoundError,
    ImmichServerError,
    ImmichTimeoutError,
    ImmichUnreachableError,
    ImmichValidationError,
)

log = logging.getLogger("darkroom.immich")

API_KEY_HEADER = "x-api-key"
API_PREFIX = "/api"
USER_AGENT = "darkroom"
MISSING_PERMISSION_PREFIX = "Missing required permission: "
# Immich answers 400 (not 404) for an id that does not exist or is not the user's.
NOT_FOUND_PREFIX = "Not found or no "
# Only this much of an error body is read: enough for Immich's JSON message.
ERROR_BODY_LIMIT = 64 * 1024
HTTP_TOO_MANY_REQUESTS = 429
HTTP_SERVER_ERROR = 500
RETRYABLE_STATUSES = frozenset({HTTP_TOO_MANY_REQUESTS, 502, 503, 504, HTTP_SERVER_ERROR})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: ``base * 2**attempt``, capped, with jitter."""

    max_retries: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        # "Equal jitter": never less than half the ceiling, so retries still back off.
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


# Called after every HTTP exchange: (method, route template, status or None, seconds).
Observer = Callable[[str, str, int | None, float], None]
_ID_SEGMENT = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?=/|$)")


def route_of(path: str) -> str:
    """``assets/6f1c…/edits`` → ``/assets/{id}/edits``: ids out, for metrics labels."""
    return _ID_SEGMENT.sub("/{id}", "/" + path.lstrip("/"))


def normalize_base_url(url: str) -> str:
    """``https://host``, ``https://host/`` and ``https://host/api`` all mean the same server."""
    root = url.rstrip("/")
    if root.endswith(API_PREFIX):
        root = root[: -len(API_PREFIX)]
    return root + API_PREFIX + "/"


class Transport:
    """A pooled httpx client bound to one Immich server and one API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        retry: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        http_transport: httpx.BaseTransport | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._observer = observer
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={API_KEY_HEADER: api_key, "user-agent": USER_AGENT},
            timeout=httpx.Timeout(timeout_s),
            transport=http_transport,
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one call (``path`` relative to /api), retrying what may be retried.

        With ``stream=True`` the caller must close the returned response.
        ``idempotent`` overrides the method's default (a read-only POST such as search
        may be repeated safely).
        """
        repeatable = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        what = f"{method} {API_PREFIX}/{path.lstrip('/')}"
        attempt = 0
        while True:
            try:
                response = self._send_once(method, path, stream=stream, what=what, **kwargs)
            except ImmichUnreachableError as exc:
                if not self._may_retry(attempt, exc, repeatable):
                    raise
                self._pause(attempt, str(exc), None)
            else:
                if response.status_code < httpx.codes.BAD_REQUEST:
                    return response
                error = _error_for(response, what)
                if not (repeatable and response.status_code in RETRYABLE_STATUSES):
                    raise error
                if attempt >= self._retry.max_retries:
                    raise error
                self._pause(attempt, str(error), _retry_after(response))
            attempt += 1

    def _send_once(
        self, method: str, path: str, *, stream: bool, what: str, **kwargs: Any
    ) -> httpx.Response:
        request = self._http.build_request(method, path.lstrip("/"), **kwargs)
        started = time.monotonic()
        status: int | None = None
        try:
            response = self._http.send(request, stream=stream)
            status = response.status_code
        except httpx.ConnectTimeout:
            message = f"{what}: timed out connecting to Immich"
            raise ImmichTimeoutError(message, request_sent=False) from None
        except httpx.TimeoutException:
            message = f"{what}: timed out waiting for Immich's answer"
            raise ImmichTimeoutError(message, request_sent=True) from None
        except httpx.ConnectError as exc:
            message = f"{what}: cannot connect to Immich ({exc})"
            raise ImmichUnreachableError(message, request_sent=False) from None
        except httpx.TransportError as exc:
            message = f"{what}: connection to Immich failed ({exc})"
            raise ImmichUnreachableError(message, request_sent=True) from None
        finally:
            if self._observer is not None:
                self._observer(method, route_of(path), status, time.monotonic() - started)
        if stream and response.status_code >= httpx.codes.BAD_REQUEST:
            try:
                response.read()
            finally:
                response.close()
        return response

    def _may_retry(self, attempt: int, exc: ImmichUnreachableError, repeatable: bool) -> bool:
        if attempt >= self._retry.max_retries:
            return False
        # Once the request may have reached Immich, repeat only what is safe to repeat.
        return repeatable or not exc.request_sent

    def _pause(self, attempt: int, reason: str, retry_after: float | None) -> None:
        delay = self._retry.delay(attempt, self._rng, retry_after)
        log.warning(
            "%s; retry %d/%d in %.1fs",
            reason,
            attempt + 1,
            self._retry.max_retries,
            delay,
        )
        self._sleep(delay)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _messages(response: httpx.Response) -> list[str]:
    """Immich's error text: ``{"message": "..." | ["...", ...], "error": "..."}``."""
    try:
        body = response.json()
    except ValueError:
        text = response.text[:ERROR_BODY_LIMIT].strip()
        return [text] if text else []
    if not isinstance(body, Mapping):
        return [str(body)]
    message = body.get("message", body.get("error"))
    if isinstance(message, list):
        return [str(item) for item in message]
    return [str(message)] if message is not None else []


def _error_for(response: httpx.Response, what: str) -> ImmichError:
    """Map a failed response to the typed exception that says what to do about it."""
    status = response.status_code
    messages = _messages(response)
    said = "; ".join(messages) or response.reason_phrase
    if status == httpx.codes.UNAUTHORIZED:
        return ImmichAuthError(
            f"{what}: API key rejected by Immich ({said}); check immich.api_key", status=status
        )
    if status == httpx.codes.FORBIDDEN:
        missing = next(
            (
                m[len(MISSING_PERMISSION_PREFIX) :]
                for m in messages
                if m.startswith(MISSING_PERMISSION_PREFIX)
            ),
            None,
        )
        hint = f"; the API key needs the permission {missing}" if missing else ""
        return ImmichForbiddenError(f"{what}: forbidden ({said}){hint}", missing_permission=missing)
    if status == httpx.codes.NOT_FOUND or any(m.startswith(NOT_FOUND_PREFIX) for m in messages):
        return ImmichNotFoundError(f"{what}: not found ({said})", status=status)
    if status == httpx.codes.BAD_REQUEST:
        return ImmichValidationError(
            f"{what}: Immich refused the request: {said}", messages=messages
        )
    if status >= HTTP_SERVER_ERROR or status == HTTP_TOO_MANY_REQUESTS:
        return ImmichServerError(f"{what}: Immich answered {status} ({said})", status=status)
    return ImmichError(f"{what}: unexpected status {status} ({said})", status=status)
