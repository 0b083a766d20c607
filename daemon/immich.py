"""Builds the Immich client from settings: the one place the API key leaves ``Settings``."""

from __future__ import annotations

from daemon.settings import Settings, SettingsError
from immich_client import PERMISSIONS, ImmichClient, RetryPolicy
from immich_client.transport import Observer

# Permissions darkroom can work without, and what is lost without each.
OPTIONAL_PERMISSIONS: dict[str, str] = {
    "asset.upload": "generated samples and time-lapses cannot be uploaded to Immich",
    "asset.edit.delete": "darkroom rotations can be undone only while other edits remain",
}
NEEDED_PERMISSIONS: tuple[str, ...] = tuple(
    sorted({p for p in PERMISSIONS.values() if p} - set(OPTIONAL_PERMISSIONS))
)


def open_immich(settings: Settings, observer: Observer | None = None) -> ImmichClient:
    """A client for the configured server; SettingsError when URL or key is missing."""
    immich = settings.immich
    if immich.url is None or immich.api_key is None:
        missing = [n for n, v in (("url", immich.url), ("api_key", immich.api_key)) if v is None]
        raise SettingsError(
            "Immich is not configured: set "
            + " and ".join(f"immich.{name}" for name in missing)
            + " (see README, Configuration)"
        )
    return ImmichClient(
        str(immich.url),
        immich.api_key.get_secret_value(),
        timeout_s=immich.timeout_s,
        retry=RetryPolicy(max_retries=immich.max_retries),
        observer=observer,
    )
