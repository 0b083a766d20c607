"""The files-on-disk layer of the training cache: shard files, their names, and lock files.

Split out of :mod:`trainer.cache` so the index logic (SQLite rows, generations, samples) and
the byte-level file handling can be read and reviewed apart.  Nothing here knows about the
index: it writes a shard atomically (``shards/tmp-*.partial``, fsync, rename to
``NNNNNNNN-<sha256[:16]>.safetensors``, fsync the folder), hashes files, parses sequence
numbers out of shard names, reads tensors back through a bounded cache of ``safe_open``
handles, and takes ``flock`` locks.  :class:`CacheError` lives here, at the bottom of the
dependency chain, because these helpers raise it; :mod:`trainer.cache` re-exports it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CACHE_FORMAT = 1  # stamped into every shard's metadata and the index's PRAGMA user_version
SHARD_SUFFIX = ".safetensors"
PARTIAL_PREFIX = "tmp-"
PARTIAL_SUFFIX = ".partial"
MIB = 1024 * 1024
OPEN_SHARD_HANDLES = 32  # safe_open handles kept per reader (each is an mmap, cheap)
HASH_CHUNK_BYTES = 4 * MIB
SEQUENCE_DIGITS = 8
NAME_HASH_CHARS = 16
HEADER_DTYPES: dict[str, str] = {"F16": "float16", "BF16": "bfloat16"}  # safetensors header


class CacheError(Exception):
    """The cache is missing, newer than this code, busy, damaged, or was asked the impossible."""


@dataclass(frozen=True)
class ShardFile:
    """A shard renamed into place: its name, file size, tensor payload size and sha256."""

    name: str
    bytes: int
    payload: int
    sha256: str


class FileLock:
    """An fcntl.flock on a lock file; released on :meth:`release` or when the process dies."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self, *, shared: bool, wait: bool) -> bool:
        """Take the lock; with ``wait=False`` return False instead of blocking."""
        if self._fd is not None:
            raise CacheError(f"{self._path.name} is already held by this cache object")
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (no-op when not held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """sha256 hex and size of a file, optionally fsyncing it first."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_shard(
    shards: Path, sequence: int, tensors: dict[str, torch.Tensor], *, mode: int
) -> ShardFile:
    """Write tensors as one shard atomically: partial file, fsync, rename, fsync folder.

    ``mode``: the index file's permissions (safetensors creates files 0600 whatever the
    umask; a shard must be readable by whoever can read the index)."""
    partial = shards / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
    try:
        save_file(tensors, partial, metadata={"darkroom_cache_format": str(CACHE_FORMAT)})
        os.chmod(partial, mode)
        digest, size = hash_file(partial, sync=True)
        name = f"{sequence:0{SEQUENCE_DIGITS}d}-{digest[:NAME_HASH_CHARS]}{SHARD_SUFFIX}"
        os.replace(partial, shards / name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(shards)
    payload = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    return ShardFile(name=name, bytes=size, payload=payload, sha256=digest)


def shard_sequence(name: str) -> int | None:
    """The sequence number at the front of a shard file name, None for other files."""
    head = name[:SEQUENCE_DIGITS]
    return int(head) if name.endswith(SHARD_SUFFIX) and head.isdigit() else None


class ShardReader:
    """Reads tensors from shards through safe_open handles kept in a bounded LRU."""

    def __init__(self, shards: Path, *, capacity: int = OPEN_SHARD_HANDLES) -> None:
        self.shards = shards
        self.capacity = capacity
        self._handles: OrderedDict[str, object] = OrderedDict()

    def tensor(self, shard: str, name: str) -> torch.Tensor:
        """Tensor ``name`` of shard ``shard`` (CacheError if the shard or tensor is gone)."""
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._open(shard)
        else:
            self._handles.move_to_end(shard)
        try:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except SafetensorError as error:
            raise CacheError(f"shard {shard} has no readable tensor {name}: {error}") from error

    def _open(self, shard: str) -> object:
        try:
            handle = safe_open(str(self.shards / shard), framework="pt", device="cpu")
        except (OSError, SafetensorError) as error:
            raise CacheError(f"cannot open shard {shard}: {error}") from error
        self._handles[shard] = handle
        while len(self._handles) > self.capacity:
            self._handles.popitem(last=False)
        return handle

    def forget(self, shards: Iterable[str] | None = None) -> None:
        """Close the handles of some shards (all when None), e.g. before deleting files."""
        if shards is None:
            self._handles.clear()
            return
        for shard in shards:
            self._handles.pop(shard, None)
