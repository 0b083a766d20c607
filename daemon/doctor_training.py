"""The doctor's checks of the training side: the device training will use, and the cache.

Both need the ``train`` extra; without it they say so (a warning: the daemon curates
without it) rather than failing on an import.
"""

from __future__ import annotations

import importlib.util

from daemon.doctor_types import Check, Outcome
from daemon.settings import Settings

BYTES_PER_GB = 1024**3
NO_TRAIN_EXTRA = "the train extra is not installed: no encoding or training here"


def _torch_missing(name: str) -> Check | None:
    if importlib.util.find_spec("torch") is None:
        return Check(name, Outcome.WARN, NO_TRAIN_EXTRA)
    return None


def check_training_device(settings: Settings) -> Check:
    """The device ``darkroom train`` would pick, and its memory on a GPU."""
    if (missing := _torch_missing("device")) is not None:
        return missing
    import torch

    from trainer.devices import DeviceUnavailableError, pick_device

    try:
        device = pick_device(settings.train.device)
    except DeviceUnavailableError as exc:
        return Check("device", Outcome.FAIL, str(exc))
    if device.type == "cpu":
        return Check("device", Outcome.WARN, "no GPU found: training would run on the CPU")
    detail = str(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        detail += f" ({properties.name}, {properties.total_memory / BYTES_PER_GB:.1f} GB)"
    return Check("device", Outcome.OK, f"training runs on {detail}")


def check_cache(settings: Settings) -> Check:
    """The training cache opens and every entry's shard, header, shape and dtype check out
    (without re-hashing the shards: ``darkroom cache verify`` does that).
    """
    if (missing := _torch_missing("cache")) is not None:
        return missing
    from trainer.cache import INDEX_NAME, Cache, CacheError

    root = settings.paths.cache_dir
    if not (root / INDEX_NAME).exists():
        return Check("cache", Outcome.WARN, f"no cache in {root} yet: darkroom encode makes it")
    try:
        with Cache.open(root) as cache:
            report = cache.verify(deep=False)
    except CacheError as exc:
        return Check("cache", Outcome.FAIL, str(exc))
    if not report.ok:
        return Check(
            "cache", Outcome.FAIL, f"{len(report.problems)} problem(s): {report.problems[0]}"
        )
    return Check(
        "cache",
        Outcome.OK,
        f"{report.samples} samples, {report.entries} entries in {report.shards} shards",
    )
