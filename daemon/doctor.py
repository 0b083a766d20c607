"""``darkroom doctor``: check that everything darkroom needs is in place, and say what is not.

Each check is a small function returning a :class:`Check`; :data:`CHECKS` lists them in the
order they are reported.  A failed check makes the command exit non-zero.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from daemon.doctor_training import check_cache, check_training_device
from daemon.doctor_types import Check, Outcome
from daemon.immich import NEEDED_PERMISSIONS, OPTIONAL_PERMISSIONS, open_immich
from daemon.settings import Settings, SettingsError
from daemon.store import SCHEMA_VERSION, Store, StoreError
from daemon.vision import VisionError, VisionPool
from immich_client import ImmichError


def check_config(settings: Settings) -> Check:
    """The settings built; the Immich URL and key are present (never shown)."""
    missing = [
        name
        for name, value in (
            ("immich.url", settings.immich.url),
            ("immich.api_key", settings.immich.api_key),
        )
        if value is None
    ]
    if missing:
        return Check("config", Outcome.FAIL, f"not set: {', '.join(missing)}")
    return Check("config", Outcome.OK, f"Immich at {settings.immich.url}, API key set")


def _writable_dir(path: Path) -> str | None:
    """None when ``path`` exists (or can be made) and takes a file; else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def check_state_dir(settings: Settings) -> Check:
    """The state directory exists and is writable."""
    problem = _writable_dir(settings.paths.state_dir)
    if problem:
        return Check("state dir", Outcome.FAIL, f"not writable: {problem}")
    return Check("state dir", Outcome.OK, f"{settings.paths.state_dir} is writable")


def check_database(settings: Settings) -> Check:
    """The state database opens (and is migrated) with this darkroom's schema."""
    path = settings.paths.database
    if not os.access(path.parent, os.W_OK):
        return Check("database", Outcome.FAIL, f"{path.parent} is not writable")
    try:
        with Store(path) as store:
            version = store.schema_version
    except (StoreError, OSError) as exc:
        return Check("database", Outcome.FAIL, str(exc))
    return Check("database", Outcome.OK, f"{path} at schema {version}/{SCHEMA_VERSION}")


def check_immich(settings: Settings) -> Check:
    """Immich answers, its version is supported, and the key has every needed permission."""
    try:
        with open_immich(settings) as client:
            version = client.version()
            key = client.api_key_info()
            user = client.me() if "user.read" not in key.lacks(["user.read"]) else None
    except SettingsError as exc:
        return Check("immich", Outcome.FAIL, str(exc))
    except ImmichError as exc:
        return Check("immich", Outcome.FAIL, str(exc))
    detail = f"Immich {version} at {settings.immich.url}, key {key.name!r}"
    if user is not None:
        detail += f" of {user.email}"
    if version.as_tuple < MIN_IMMICH_VERSION:
        minimum = ".".join(map(str, MIN_IMMICH_VERSION))
        return Check("immich", Outcome.FAIL, f"{detail}: darkroom needs Immich {minimum} or newer")
    missing = key.lacks(list(NEEDED_PERMISSIONS))
    if missing:
        return Check("immich", Outcome.FAIL, f"{detail}; key lacks: {', '.join(missing)}")
    lacking_optional = key.lacks(list(OPTIONAL_PERMISSIONS))
    if lacking_optional:
        losses = "; ".join(f"{p} ({OPTIONAL_PERMISSIONS[p]})" for p in lacking_optional)
        return Check("immich", Outcome.WARN, f"{detail}; key lacks optional: {losses}")
    return Check("immich", Outcome.OK, f"{detail}; all permissions present")


def check_vision(settings: Settings) -> Check:
    """Every Ollama host has the vision model, and it can see images."""
    pool = VisionPool(settings.ollama)
    try:
        provenance = pool.check()
    except VisionError as exc:
        return Check("vision", Outcome.FAIL, str(exc))
    finally:
        pool.close()
    hosts = ", ".join(model.host for model in pool.models)
    return Check(
        "vision",
        Outcome.OK,
        f"{provenance.model} ({provenance.digest[:12]}) sees images on {hosts}",
    )


CHECKS: tuple[Callable[[Settings], Check], ...] = (
    check_config,
    check_state_dir,
    check_database,
    check_immich,
    check_vision,
    check_training_device,
    check_cache,
)

# The edits API (rotation as a non-destructive edit) arrived in Immich 2.5.
MIN_IMMICH_VERSION = (2, 5, 0)


def run_checks(settings: Settings) -> list[Check]:
    """Run every check in order."""
    return [check(settings) for check in CHECKS]


def format_report(checks: list[Check]) -> str:
    """The report a person reads."""
    width = max(len(check.name) for check in checks)
    lines = [f"[{c.outcome.value:>4}] {c.name:<{width}}  {c.detail}" for c in checks]
    return "\n".join(lines)
