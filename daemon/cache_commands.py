"""``darkroom encode`` and ``darkroom cache gc|verify|stats``: the training cache by hand.

These need the ``train`` extra (torch); without it they say so instead of failing on an
import deep inside.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import TYPE_CHECKING

from daemon.settings import Settings

if TYPE_CHECKING:  # torch is optional: the cache module is imported only when used
    from trainer.cache import Cache, CacheStats
    from trainer.cache_upkeep import GcReport, VerifyReport

BYTES_PER_MB = 1024 * 1024

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: the train extra is not installed
TRAIN_EXTRA_HINT = (
    "needs the training extra (torch, diffusers, transformers): "
    "pip install 'immich-darkroom[train]'"
)


def train_extra_missing(command: str) -> bool:
    """Print why ``command`` cannot run when torch is absent; True then."""
    if importlib.util.find_spec("torch") is not None:
        return False
    print(f"darkroom {command}: {TRAIN_EXTRA_HINT}", file=sys.stderr)
    return True


def cmd_encode(settings: Settings, args: argparse.Namespace) -> int:
    """Put new curated photos and captions into the training cache."""
    if train_extra_missing("encode"):
        return EXIT_UNAVAILABLE
    from daemon.encode import run_encode

    summary = run_encode(settings, bar=args.progress)
    report = summary.report
    print(
        f"{summary.examined} examined, {summary.wanted} wanted, {summary.thinned} thinned; "
        f"{len(report.encoded)} photos and {report.texts_encoded} captions encoded, "
        f"{len(report.reused)} already cached, {len(report.skipped)} refused, "
        f"{len(report.failed)} not fetched; {summary.retired} retired"
    )
    return EXIT_OK


def cmd_cache(settings: Settings, args: argparse.Namespace) -> int:
    """Look after the training cache: gc, verify, stats."""
    if train_extra_missing(f"cache {args.action}"):
        return EXIT_UNAVAILABLE
    from trainer.cache import Cache, CacheError

    try:
        cache = Cache.open(settings.paths.cache_dir)
    except CacheError as exc:
        print(f"darkroom cache: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with cache:
        if args.action == "gc":
            return _gc(settings, cache)
        if args.action == "verify":
            report = cache.verify(deep=not args.quick)
            print(format_verify(report))
            return EXIT_OK if report.ok else EXIT_FAILED
        print(format_stats(cache.stats()))
    return EXIT_OK


def format_stats(stats: CacheStats) -> str:
    """The cache's size, human-readable."""
    buckets = ", ".join(f"{name} {count}" for name, count in sorted(stats.by_bucket.items()))
    return (
        f"samples={stats.samples} (latents {stats.latents}, caption embeddings {stats.texts})\n"
        f"shards={stats.shards}, {stats.bytes / BYTES_PER_MB:.1f} MB on disk\n"
        f"by bucket: {buckets or 'none'}"
    )


def format_verify(report: VerifyReport) -> str:
    """Problems first, then notes, then the verdict."""
    lines = [f"problem: {problem}" for problem in report.problems]
    lines += [f"note: {note}" for note in report.notes]
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    lines.append(
        f"{verdict}: {report.shards} shards, {report.entries} entries, {report.samples} samples"
    )
    return "\n".join(lines)


def format_gc(report: GcReport) -> str:
    """What gc freed."""
    freed = (report.bytes_before - report.bytes_after) / BYTES_PER_MB
    lines = [
        f"dropped {report.latents_dropped} latents and {report.texts_dropped} caption "
        f"embeddings; rewrote {report.shards_rewritten} shards, removed {report.files_removed} "
        f"files ({report.orphans_removed} orphans); freed {freed:.1f} MB"
    ]
    if report.readers_active:
        lines.append("a trainer is reading the cache: no file was touched, run gc again later")
    return "\n".join(lines + report.notes)


def _gc(settings: Settings, cache: Cache) -> int:
    """Retire samples the store no longer wants, then collect what nothing uses."""
    from daemon.store import Store
    from daemon.training_set import TrainingSet

    if settings.paths.database.exists():
        with Store(settings.paths.database) as store:
            wanted, _ = TrainingSet(store).wanted(thin_duplicates=settings.cache.thin_duplicates)
        keep = {candidate.asset_id for candidate in wanted}
        retired = cache.retire_all_except(keep)
        print(f"{retired} sample(s) retired (photo deleted, replaced or no longer wanted)")
    print(format_gc(cache.gc()))
    return EXIT_OK


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``encode`` and ``cache`` on the main parser."""
    encode = commands.add_parser("encode", help=(cmd_encode.__doc__ or "").splitlines()[0])
    encode.set_defaults(func=cmd_encode)
    encode.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal; log lines otherwise)",
    )
    cache = commands.add_parser("cache", help=(cmd_cache.__doc__ or "").splitlines()[0])
    cache.set_defaults(func=cmd_cache)
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("gc", help="retire unwanted samples and free what nothing uses")
    verify = actions.add_parser("verify", help="check every entry and shard")
    verify.add_argument("--quick", action="store_true", help="skip re-hashing the shards")
    actions.add_parser("stats", help="samples, entries, shards and bytes")
