"""Results back in Immich: samples, time-lapses and sheets uploaded into one album.

Every file goes up under a key naming what it is (``sample/500/<prompt key>``...); the
store's ``uploads`` table remembers each key, so nothing is uploaded twice.  A crash between
the upload and its record is harmless too: Immich recognises the same bytes (``duplicate``,
with the asset it already has), and that asset is put in the album and recorded.

Uploading is optional (``samples.upload``): ``auto`` uploads when the API key has the
``asset.upload`` permission and says once why not otherwise; ``off`` never uploads; ``on``
fails loudly when the key cannot.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from daemon.results import Results, Upload
from daemon.settings import SamplesSettings
from immich_client import ImmichClient
from immich_client.errors import ImmichTooLargeError, ImmichValidationError

log = logging.getLogger("darkroom.gallery")

# Problems with one file: it is skipped, the others go up.  Anything else (Immich down, a
# revoked key) stops the uploads; the next run continues where they stopped.
PER_FILE_ERRORS = (OSError, ImmichTooLargeError, ImmichValidationError)

UPLOAD_PERMISSION = "asset.upload"
DEVICE_ASSET_PREFIX = "darkroom-"


class UploadRefused(Exception):
    """``samples.upload = "on"`` but the API key may not upload (the message says why)."""


def uploads_enabled(settings: SamplesSettings, immich: ImmichClient) -> bool:
    """Whether results go to Immich, per ``samples.upload`` and the key's permissions."""
    if settings.upload == "off":
        return False
    lacking = immich.api_key_info().lacks([UPLOAD_PERMISSION])
    if not lacking:
        return True
    reason = f"the Immich API key lacks {UPLOAD_PERMISSION}"
    if settings.upload == "on":
        raise UploadRefused(f"samples.upload is on but {reason}")
    log.info("results are not uploaded to Immich: %s (samples.upload = auto)", reason)
    return False


@dataclass
class Gallery:
    """Uploads files into the configured album, each key once."""

    immich: ImmichClient
    results: Results
    album_name: str
    uploaded: list[str] = field(default_factory=list)
    _album_id: str | None = None

    def album_id(self) -> str:
        """The album's id, created the first time it is needed."""
        if self._album_id is None:
            owned = [a for a in self.immich.list_albums() if a.album_name == self.album_name]
            if owned:
                self._album_id = owned[0].id
            else:
                description = "What darkroom's fine-tune learned, checkpoint by checkpoint."
                self._album_id = self.immich.create_album(
                    self.album_name, description=description
                ).id
                log.info("created the Immich album %r", self.album_name)
        return self._album_id

    def put(self, key: str, path: Path, description: str) -> Upload:
        """Upload ``path`` (unless ``key`` was) with ``description``, into the album."""
        known = self.results.upload(key)
        if known is not None:
            return known
        data = path.read_bytes()
        taken_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        result = self.immich.upload_asset(
            data, path.name, taken_at=taken_at, device_asset_id=DEVICE_ASSET_PREFIX + key
        )
        self.immich.update_asset(result.id, description=description)
        album = self.album_id()
        self.immich.add_to_album(album, [result.id])
        upload = Upload(key, hashlib.sha1(data).hexdigest(), result.id, album)
        self.results.add_upload(upload)
        self.uploaded.append(key)
        log.info("uploaded %s to Immich (%s)", path.name, result.status)
        return upload

    def put_each(self, items: list[tuple[str, Path, str]]) -> int:
        """Upload every (key, path, description); how many went up now."""
        before = len(self.uploaded)
        for key, path, description in items:
            try:
                self.put(key, path, description)
            except PER_FILE_ERRORS as exc:
                log.warning("%s: not uploaded: %s", path.name, exc)
        return len(self.uploaded) - before
