"""``darkroom status``: what the state database says, for a person to read."""

from __future__ import annotations

from daemon.settings import Settings
from daemon.store import Store

MAX_PROBLEMS = 20


def render_status(settings: Settings) -> str:
    """Counts of assets, of each stage's statuses, and of open reviews."""
    path = settings.paths.database
    if not path.exists():
        return f"no state yet: {path} does not exist (darkroom has not run here)"
    with Store(path) as store:
        assets = store.asset_counts()
        stages = store.stage_counts()
        reviews = store.open_reviews()
        problems = store.problems(MAX_PROBLEMS)
    lines = [
        f"state: {path}",
        f"assets: {assets['known']} known, {assets['trashed']} in trash, "
        f"{assets['deleted']} deleted in Immich",
    ]
    if not stages:
        lines.append("stages: nothing processed yet")
    for stage, counts in stages.items():
        parts = ", ".join(f"{count} {status}" for status, count in counts.items())
        lines.append(f"{stage}: {parts}")
    lines.append(f"review queue: {reviews} open")
    if problems:
        lines.append("why assets were skipped, quarantined or failed:")
    for stage, status, reason, count in problems:
        lines.append(f"  {count:>5} {stage} {status}: {reason or 'no reason recorded'}")
    return "\n".join(lines)
