"""Training checkpoints: written atomically, verified on load, pruned by a retention policy.

A run's ``output_dir`` holds::

    checkpoints/
      step-00000500/
        transformer/            diffusers format (save_pretrained, safetensors): loadable by
                                PixArtTransformer2DModel.from_pretrained and, with the base
                                model's other parts, by PixArtSigmaPipeline
        training_state.pt       optimizer, LR schedule, EMA, sampler position, step, RNG states,
                                cache generation, extra (torch.save of plain containers only)
        config.json             the TrainConfig snapshot (TrainConfig.to_json())
        manifest.json           every other file with size and sha256; step, cache_generation,
                                created_at, milestone; written last
      latest                    one line naming the newest complete checkpoint ("step-00000500")

Why each step of writing: everything goes into ``checkpoints/.tmp-step-XXXXXXXX/``; every file
is fsynced (while hashing it for the manifest), then the folder is renamed into place and the
parent fsynced, and only then is ``latest`` replaced (temp file, fsync, ``os.replace``).  A
crash at any moment therefore leaves either no new folder (a ``.tmp-*`` leftover, ignored and
removed by the next save) or a complete one, and ``latest`` always names a complete checkpoint.
Old checkpoints are deleted only after the new one is complete: the last ``keep_last`` plus
every step divisible by ``milestone_every`` (milestones are kept forever), never the one
``latest`` names; non-milestones newer than the new step are from a replaced history.
A full disk (ENOSPC, EFBIG, EDQUOT) is predicted from the free space before writing when it
can be, else caught while writing: the temp folder is removed, the previous checkpoint and
``latest`` are untouched, and :class:`CheckpointError` says so.

Reading: ``latest`` first, then the other folders newest first; a checkpoint whose manifest
is missing or unreadable, or whose files do not match it, is skipped (logged) in favour of the
next.  Sizes are cheap to check; hashes mean reading every byte (about 1-2 s for the 1.2 GB
bf16 transformer, more for big optimizer states), so :func:`list_checkpoints` and retention
check sizes only, while :func:`latest_checkpoint` and :func:`load_checkpoint` verify the
hashes of the checkpoint they pick.  :func:`load_latest` does both with a single hashing pass.

``training_state.pt`` is loaded with ``torch.load(weights_only=True)``, which never runs
pickled code; :func:`save_checkpoint` therefore refuses (TypeError, before writing anything)
a state holding anything but tensors, dtypes, devices and builtin containers and scalars.
Only the main process of a distributed run should save, with the unwrapped transformer.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import stat
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.progress_file import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    STEP_NAME,
    step_folder,
)
from trainer.shards import fsync_dir, hash_file

if TYPE_CHECKING:
    from diffusers import ModelMixin

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "CheckpointInfo",
    "TrainingState",
    "capture_rng",
    "check_fits",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_weights",
    "read_config",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger("darkroom.checkpoints")

LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"  # every folder or file starting so is unfinished or being discarded
ASIDE_PREFIX = f"{TMP_PREFIX}old-"  # a same-step checkpoint moved aside while replaced
DROP_PREFIX = f"{TMP_PREFIX}drop-"  # a pruned checkpoint, renamed before its deletion
TRANSFORMER_DIR = "transformer"
WEIGHTS_SUFFIX = ".safetensors"
STATE_NAME = "training_state.pt"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = 1
REQUIRED_FILES = (STATE_NAME, CONFIG_NAME, f"{TRANSFORMER_DIR}/config.json")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
RUST_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports an errno
FREE_SPACE_HEADROOM = 16 * 1024 * 1024  # bytes beyond the tensors: configs, pickle framing

# Types torch.load(weights_only=True) accepts back; checked exactly (numpy.float64 is a float
# subclass that would pickle as a numpy object and fail to load).
PLAIN_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)
PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set, torch.Size)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
MPS = "mps"  # one Apple GPU, whose RNG API has no *_all variant


class CheckpointError(Exception):
    """A checkpoint could not be written, or one on disk is incomplete or corrupt."""


@dataclass
class TrainingState:
    """Everything besides the weights that exact continuation needs.

    ``optimizer``/``schedule``/``sampler``/``ema`` are the ``state_dict()`` of those objects,
    ``rng`` is :func:`capture_rng`, ``cache_generation`` the cache generation trained on, and
    ``extra`` free for the loop (loss history, ...), all made of plain types (see module doc).
    """

    step: int
    optimizer: dict
    schedule: dict
    sampler: dict
    ema: dict | None
    rng: dict
    cache_generation: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """One ``step-*`` folder: its step, whether it is a milestone, and whether it is valid
    (manifest readable and files matching it; ``problem`` says why not)."""

    step: int
    path: Path
    milestone: bool
    valid: bool
    problem: str | None = None


def checkpoint_name(step: int) -> str:
    """The folder name of a step's checkpoint, zero-padded so names sort by step."""
    return step_folder(step)


def _step_of(name: str) -> int | None:
    """The step a folder name stands for, or None for anything else."""
    match = STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _is_milestone(step: int, milestone_every: int) -> bool:
    """Whether a step is kept forever (``milestone_every`` <= 0 disables milestones)."""
    return milestone_every > 0 and step > 0 and step % milestone_every == 0


# --- saving --------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: Path,
    step: int,
    transformer: ModelMixin,
    state: TrainingState,
    config: dict,
    *,
    keep_last: int,
    milestone_every: int,
) -> Path:
    """Write a complete checkpoint for ``step``, point ``latest`` at it, prune old ones.

    Returns the checkpoint folder.  Raises :class:`CheckpointError` when it could not be
    written (disk full included): the temp folder is gone and the previous checkpoint and
    ``latest`` are as they were.  TypeError/ValueError for arguments that could never work.
    """
    if state.step != step:
        raise ValueError(f"state.step is {state.step} but the checkpoint is for step {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last})")
    payload = {item.name: getattr(state, item.name) for item in fields(state)}
    state_bytes = _plain_bytes(payload, "state")
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    manifest = {
        "step": step,
        "cache_generation": state.cache_generation,
        "milestone": _is_milestone(step, milestone_every),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        _ensure_space(root, final.name, state_bytes + _module_bytes(transformer))
        _write_contents(tmp, transformer, payload, config_text, manifest)
        _publish(root, tmp, final)
    except (OSError, SafetensorError, RuntimeError) as error:
        _remove_tree(tmp)
        raise _write_error(error, root, final.name) from error
    except BaseException:
        _remove_tree(tmp)
        raise
    log.info("checkpoint %s written", final)
    _apply_retention(root, step, keep_last, milestone_every)
    return final


def _plain_bytes(value: object, where: str) -> int:
    """Tensor bytes inside ``value``; TypeError naming the first non-plain thing found."""
    kind = type(value)
    if kind in PLAIN_TENSORS:
        return value.numel() * value.element_size()  # type: ignore[attr-defined]
    if kind in PLAIN_SCALARS:
        return 0
    if kind in (dict, OrderedDict):
        total = 0
        for key, item in value.items():  # type: ignore[attr-defined]
            total += _plain_bytes(key, f"{where} key {key!r}")
            total += _plain_bytes(item, f"{where}[{key!r}]")
        return total
    if kind in PLAIN_CONTAINERS:
        return sum(_plain_bytes(item, f"{where}[{i}]") for i, item in enumerate(value))  # type: ignore[arg-type]
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint's training state may"
        " hold only tensors, dtypes, devices and builtin containers/scalars (it is loaded"
        " back with torch.load(weights_only=True))"
    )


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's saved tensors (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _ensure_space(root: Path, name: str, tensor_bytes: int) -> None:
    """Fail before writing when the free space clearly cannot hold the checkpoint."""
    needed = tensor_bytes + FREE_SPACE_HEADROOM
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"disk full: checkpoint {name} needs about {needed / 1e9:.2f} GB but only"
            f" {free / 1e9:.2f} GB is free in {root}; nothing was written, the previous"
            f" checkpoint and {LATEST_NAME!r} are unchanged"
        )


def _write_contents(
    tmp: Path, transformer: ModelMixin, payload: dict, config_text: str, manifest: dict
) -> None:
    """Fill the temp folder: weights, state, config; fsync them; manifest last."""
    _remove_tree(tmp)  # a leftover of the same name from a crash
    tmp.mkdir()
    transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
    with (tmp / STATE_NAME).open("wb") as handle:  # a handle keeps the OSError as context
        torch.save(payload, handle)
    (tmp / CONFIG_NAME).write_text(config_text)
    mode = stat.S_IMODE((tmp / CONFIG_NAME).stat().st_mode)  # what the umask gives
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        os.chmod(path, mode)  # safetensors writes 0600 whatever the umask
        digest, size = hash_file(path, sync=True)
        files[path.relative_to(tmp).as_posix()] = {"size": size, "sha256": digest}
    manifest = {
        "format": CHECKPOINT_FORMAT,
        **manifest,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    _write_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    fsync_dir(tmp / TRANSFORMER_DIR)
    fsync_dir(tmp)


def _write_synced(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished folder into place, then point ``latest`` at it.

    A same-step checkpoint already there (one being redone) is moved aside first and put
    back if ``latest`` cannot be written, so a failure leaves the previous state."""
    aside = root / f"{ASIDE_PREFIX}{final.name}"
    replacing = final.exists()
    if replacing:
        _remove_tree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(root)
    pointer = root / f"{TMP_PREFIX}{LATEST_NAME}"
    try:
        _write_synced(pointer, final.name + "\n")
    except OSError:
        pointer.unlink(missing_ok=True)
        os.rename(final, tmp)  # removed by the caller's clean-up
        if replacing:
            os.rename(aside, final)
        fsync_dir(root)
        raise
    os.replace(pointer, root / LATEST_NAME)
    fsync_dir(root)
    if replacing:
        _remove_tree(aside)


def _write_error(error: BaseException, root: Path, name: str) -> CheckpointError:
    """A clear CheckpointError for a failed write, saying whether the disk was full."""
    previous = _pointer_target(root)
    kept = f"the previous checkpoint ({previous or 'none'}) and {LATEST_NAME!r} are unchanged"
    code = _disk_full_errno(error)
    if code is not None:
        reason = f"disk full ({errno.errorcode.get(code, code)}: {os.strerror(code)})"
        return CheckpointError(f"{reason} while writing checkpoint {name} in {root}; {kept}")
    return CheckpointError(f"could not write checkpoint {name} in {root}: {error}; {kept}")


def _disk_full_errno(error: BaseException) -> int | None:
    """The disk-full errno behind an error, looking through chained exceptions and Rust
    ``os error N`` messages (safetensors), or None when the disk was not the problem."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        match = RUST_OS_ERROR.search(str(current))
        code = code if code is not None else (int(match.group(1)) if match else None)
        if code in DISK_FULL_ERRNOS:
            return code
        current = current.__cause__ or current.__context__
    return None


def _remove_tree(path: Path) -> None:
    """Delete a folder if present (no error when it is already gone)."""
    shutil.rmtree(path, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove ``.tmp-*`` leftovers of interrupted saves and prunes; put back a checkpoint
    that was moved aside for replacement when the crash left no replacement in its place."""
    for path in root.iterdir():
        if not path.name.startswith(TMP_PREFIX):
            continue
        original = root / path.name.removeprefix(ASIDE_PREFIX)
        if path.name.startswith(ASIDE_PREFIX) and not original.exists():
            os.rename(path, original)
            log.warning("restored checkpoint %s moved aside by an interrupted save", original)
        elif path.is_dir():
            _remove_tree(path)
            log.info("removed leftover %s of an interrupted save", path)
        else:
            path.unlink(missing_ok=True)
    fsync_dir(root)


def _apply_retention(root: Path, step: int, keep_last: int, milestone_every: int) -> None:
    """Delete checkpoints beyond the last ``keep_last`` valid ones up to the new ``step``,
    except milestones and the one ``latest`` names.

    Non-milestone checkpoints NEWER than ``step`` are deleted too: the run resumed from an
    older one (they were corrupt, or a crash came between their rename and the move of
    ``latest``), so they belong to a history this run has replaced.  Failures are only
    logged: the new checkpoint is complete regardless."""
    infos = list_checkpoints(root.parent)
    current = [info for info in infos if info.valid and info.step <= step]
    keep = {info.step for info in current[-keep_last:]}
    keep |= {i.step for i in infos if i.milestone or _is_milestone(i.step, milestone_every)}
    target = _pointer_target(root)
    for info in infos:
        if info.step in keep or info.path.name == target:
            continue
        doomed = root / f"{DROP_PREFIX}{info.path.name}"
        try:
            os.rename(info.path, doomed)  # a step-* folder is complete or absent, never half
            shutil.rmtree(doomed)
        except OSError as error:
            log.warning("could not delete old checkpoint %s: %s", info.path, error)
        else:
            log.info("deleted old checkpoint %s", info.path)
    try:
        fsync_dir(root)
    except OSError as error:
        log.warning("could not sync %s after pruning: %s", root, error)


# --- finding and verifying -----------------------------------------------------------------


def _pointer_target(root: Path) -> str | None:
    """The folder name ``latest`` names, or None when it is missing or not a step name."""
    try:
        name = (root / LATEST_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _step_of(name) is not None else None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint, after checking every file's size (and sha256
    with ``hashes``); CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no {MANIFEST_NAME} (incomplete checkpoint)") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable {MANIFEST_NAME}: {error}") from error
    files = _manifest_files(path, manifest)
    for relative, entry in files.items():
        _check_file(path, relative, entry, hashes=hashes)
    return manifest


def _manifest_files(path: Path, manifest: object) -> dict[str, dict]:
    """The manifest's file table after checking its shape, format and step."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: {MANIFEST_NAME} has no file table")
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    if manifest.get("step") != _step_of(path.name):
        raise CheckpointError(f"{path}: manifest is for step {manifest.get('step')!r}")
    files: dict[str, dict] = manifest["files"]
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(_is_weights_file(name) for name in files):
        missing.append(f"{TRANSFORMER_DIR}/*{WEIGHTS_SUFFIX}")
    if missing:
        raise CheckpointError(f"{path}: manifest lacks {', '.join(missing)}")
    return files


def _is_weights_file(relative: str) -> bool:
    """Whether a manifest entry is one of the transformer's safetensors files."""
    return relative.startswith(f"{TRANSFORMER_DIR}/") and relative.endswith(WEIGHTS_SUFFIX)


def _check_file(root: Path, relative: str, entry: object, *, hashes: bool) -> None:
    """Check one manifest entry against the file on disk."""
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts or not isinstance(entry, dict):
        raise CheckpointError(f"{root}: bad manifest entry {relative!r}")
    path = root / relative
    try:
        size = path.stat().st_size
    except OSError as error:
        raise CheckpointError(f"{root}: {relative} is missing ({error.strerror})") from error
    if size != entry.get("size"):
        expected = entry.get("size")
        raise CheckpointError(f"{root}: {relative} has {size} bytes, manifest says {expected}")
    if hashes:
        digest, _ = hash_file(path)
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{root}: {relative} does not match its sha256 (corrupt)")


def list_checkpoints(output_dir: Path, *, hashes: bool = False) -> list[CheckpointInfo]:
    """Every ``step-*`` checkpoint folder of a run, by ascending step, checked by size (and
    by sha256 with ``hashes``).  ``.tmp-*`` leftovers are not checkpoints and are skipped."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    infos = []
    for path in root.iterdir():
        step = _step_of(path.name)
        if step is None or not path.is_dir():
            continue
        try:
            manifest = verify_checkpoint(path, hashes=hashes)
        except CheckpointError as error:
            infos.append(CheckpointInfo(step, path, False, False, str(error)))
        else:
            infos.append(CheckpointInfo(step, path, bool(manifest.get("milestone")), True))
    return sorted(infos, key=lambda info: info.step)


def _candidates(output_dir: Path) -> list[Path]:
    """Checkpoint folders in the order to try them: ``latest``'s target, then newest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    folders = sorted(
        (p for p in root.iterdir() if _step_of(p.name) is not None and p.is_dir()),
        key=lambda p: _step_of(p.name) or 0,
        reverse=True,
    )
    target = _pointer_target(root)
    if target is None:
        if folders:
            log.warning(
                "%s: no usable %r pointer, trying the newest checkpoints", root, LATEST_NAME
            )
        return folders
    first = root / target
    if first not in folders:
        log.warning("%s: %r names %s, which does not exist", root, LATEST_NAME, target)
        return folders
    return [first, *(p for p in folders if p != first)]


def latest_checkpoint(output_dir: Path, *, hashes: bool = True) -> Path | None:
    """The checkpoint to resume from: ``latest``'s target if valid, else the newest valid one
    (each skipped one logged); None when there is none.  Verifies sha256s unless told not to
    (then :func:`load_checkpoint` can skip verifying with ``verify=False``)."""
    for path in _candidates(output_dir):
        try:
            verify_checkpoint(path, hashes=hashes)
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
            continue
        return path
    return None


# --- loading -------------------------------------------------------------------------------


def load_checkpoint(
    path: Path, transformer: torch.nn.Module, *, verify: bool = True, map_location: str = "cpu"
) -> TrainingState:
    """Load a checkpoint's weights into ``transformer`` (bitwise, in place, so optimizer
    parameter references stay valid) and return its training state (tensors on
    ``map_location``; ``optimizer.load_state_dict`` moves them to the parameters' device).

    The module must match exactly (names, shapes, dtypes) and is left untouched when
    anything is wrong: CheckpointError.  ``verify`` re-checks the manifest's hashes first.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path, hashes=True)
    state = _load_state(path, map_location)
    weights = load_weights(path / TRANSFORMER_DIR)
    check_fits(path, transformer, weights)
    transformer.load_state_dict(weights, strict=True)
    return state


def _load_state(path: Path, map_location: str) -> TrainingState:
    """training_state.pt as a TrainingState, loaded without running pickled code."""
    try:
        payload = torch.load(path / STATE_NAME, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:  # UnpicklingError is a RuntimeError here
        raise CheckpointError(f"{path}: cannot load {STATE_NAME}: {error}") from error
    names = [item.name for item in fields(TrainingState)]
    if not isinstance(payload, dict) or any(name not in payload for name in names):
        raise CheckpointError(f"{path}: {STATE_NAME} is not a training state")
    return TrainingState(**{name: payload[name] for name in names})


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model folder's safetensors files (one or several shards)."""
    weights: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")):
            weights.update(load_file(file, device="cpu"))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{folder}: cannot read the weights: {error}") from error
    if not weights:
        raise CheckpointError(f"{folder}: no {WEIGHTS_SUFFIX} weights")
    return weights


def check_fits(
    path: Path,
    module: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    exact_dtype: bool = True,
) -> None:
    """CheckpointError unless the saved tensors have the module's names and shapes, and (with
    ``exact_dtype``, for resuming: no silent casts) its dtypes; sampling casts on purpose."""
    expected = module.state_dict()
    if expected.keys() != weights.keys():
        missing = sorted(expected.keys() - weights.keys())[:3]
        unexpected = sorted(weights.keys() - expected.keys())[:3]
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    for name, tensor in expected.items():
        saved = weights[name]
        if saved.shape != tensor.shape or (exact_dtype and saved.dtype != tensor.dtype):
            raise CheckpointError(
                f"{path}: {name} was saved as {saved.dtype} {tuple(saved.shape)} but the model"
                f" has {tensor.dtype} {tuple(tensor.shape)} (a different preset or model?)"
            )


def load_latest(
    output_dir: Path, transformer: torch.nn.Module, *, map_location: str = "cpu"
) -> tuple[Path, TrainingState] | None:
    """Resume: load the checkpoint :func:`latest_checkpoint` would pick, hashing it once;
    a candidate that fails to verify or load is skipped for the next.  None when none."""
    for path in _candidates(output_dir):
        try:
            return path, load_checkpoint(path, transformer, map_location=map_location)
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
    return None


def read_config(path: Path) -> dict:
    """The TrainConfig snapshot stored in a checkpoint (``TrainConfig.from_json`` input)."""
    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable {CONFIG_NAME}: {error}") from error


# --- global RNG states ---------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU and any accelerators) as plain types.

    Training randomness comes from per-step generators (see trainer.config.step_generator);
    these are saved for anything else.  numpy's key becomes a list of ints, python's state
    a list, so the dict loads back with ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    for kind, module in _accelerators().items():
        states[kind] = module.get_rng_state_all()
    if torch.backends.mps.is_available():
        states[MPS] = [torch.mps.get_rng_state()]
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured; accelerator states whose devices are
    not present now are skipped with a warning."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = dict(states["numpy"])
    key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    numpy_state["state"] = {**numpy_state["state"], "key": key}
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    present = _accelerators()
    for kind in sorted(set(states) - {"python", "numpy", "torch"}):
        module = present.get(kind)
        if kind == MPS and torch.backends.mps.is_available():
            torch.mps.set_rng_state(states[MPS][0])
        elif module is not None and module.device_count() == len(states[kind]):
            module.set_rng_state_all(states[kind])
        else:
            log.warning("not restoring %s RNG states: those devices are not present", kind)


def _accelerators() -> dict[str, Any]:
    """The torch device modules with per-device ``*_rng_state_all`` that are usable now."""
    found: dict[str, Any] = {}
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found["xpu"] = xpu
    return found
