"""Exceptions raised by the Immich client.

Every failure of a call surfaces as one of these, never as a raw httpx error, so callers can
tell "Immich is down, try later" from "the key was revoked, stop" from "this one asset is
bad, skip it".  Messages name the method and path, never the API key.
"""

from __future__ import annotations


class ImmichError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ImmichUnreachableError(ImmichError):
    """No answer: connection refused, DNS failure, connection dropped.

    ``request_sent`` is False when the request surely never reached Immich (so repeating
    it is always safe) and True when Immich may have acted on it.
    """

    def __init__(self, message: str, *, request_sent: bool) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class ImmichTimeoutError(ImmichUnreachableError):
    """Immich did not answer within the timeout."""


class ImmichAuthError(ImmichError):
    """401: the API key was rejected (revoked, mistyped, or for another server)."""


class ImmichForbiddenError(ImmichError):
    """403: the key lacks a permission; ``missing_permission`` names it when Immich says."""

    def __init__(self, message: str, *, missing_permission: str | None) -> None:
        super().__init__(message, status=403)
        self.missing_permission = missing_permission


class ImmichNotFoundError(ImmichError):
    """404: the asset, album or endpoint does not exist (or not for this user)."""


class ImmichValidationError(ImmichError):
    """400: Immich refused the request; ``messages`` holds what it said."""

    def __init__(self, message: str, *, messages: list[str]) -> None:
        super().__init__(message, status=400)
        self.messages = messages


class ImmichServerError(ImmichError):
    """5xx (or 429) that persisted through every retry."""


class ImmichTooLargeError(ImmichError):
    """A download is bigger than the cap it was allowed."""


class ImmichProtocolError(ImmichError):
    """Immich answered with something that is not what the API promises."""
