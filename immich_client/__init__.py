"""A typed client for the parts of the Immich API that darkroom uses.

Imports nothing else of darkroom's, so it can be used and tested on its own.
"""

from __future__ import annotations

from immich_client.client import PERMISSIONS, ImmichClient
from immich_client.errors import (
    ImmichAuthError,
    ImmichError,
    ImmichForbiddenError,
    ImmichNotFoundError,
    ImmichProtocolError,
    ImmichServerError,
    ImmichTimeoutError,
    ImmichTooLargeError,
    ImmichUnreachableError,
    ImmichValidationError,
)
from immich_client.transport import RetryPolicy, normalize_base_url

__all__ = [
    "PERMISSIONS",
    "ImmichAuthError",
    "ImmichClient",
    "ImmichError",
    "ImmichForbiddenError",
    "ImmichNotFoundError",
    "ImmichProtocolError",
    "ImmichServerError",
    "ImmichTimeoutError",
    "ImmichTooLargeError",
    "ImmichUnreachableError",
    "ImmichValidationError",
    "RetryPolicy",
    "normalize_base_url",
]
