"""Prepared data stages kept between runs, in the worker's memory and (opt-in) on disk.

A study trains many model families on the same data: every family's run of seed *i* prepares
the same data stages. :func:`mosaicd.training.execution.prepare_data` asks this cache first. An
entry is keyed by everything that determines what the data stages return (:func:`key`): each
stage's class (the SHA-256 of the class file the run executed, and the class name), its section,
the values its constructor takes from other sections, the run's seed and device, the
``deterministic`` setting and the torch and Python versions.

What an entry holds: the (train, test) pair the last stage returned, the run_info the stages'
``info()`` added, and the random generators' state preparing left behind (torch, numpy, Python
random, CUDA). A hit restores that state and hands the run *fresh objects* rebuilt from the
entry's bytes (its own tensors, loaders, samplers and generators, as they were right after
preparing): a cached run computes exactly the numbers of the same run with the cache off.

Entries are serialized with torch.save. Classes and functions defined in the user's class files
(loaded under per-run module names, dropped after the run) and lambdas are kept by reference in
the memory entry, which is why such an entry never goes to disk.

- Memory: per worker process, bounded by ``[MONITOR] data_cache_mb`` (0: off), least recently
  used first out.
- Disk (opt-in: a data stage class says ``cache_on_disk = True``): one file per entry in
  ``[MONITOR] cache_dir``, bounded by ``cache_size_mb``, least recently used (mtime) first out.
  An entry is written to a temporary file, fsynced, then renamed into place, so a reader sees a
  whole entry or none; a temporary file left by a dead writer is never read and is removed.
- A data stage class says ``cacheable = False`` to never be cached (its output depends on
  something the key does not see: the run id, a file that changes, the time).

Imported by workers only (imports torch).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import pickle
import platform
import stat
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# The class attributes a data stage sets to change how it is cached (docs/performance.md).
CACHEABLE = "cacheable"  # False: never cached (default True)
ON_DISK = "cache_on_disk"  # True: also kept in [MONITOR] cache_dir (default False)

DEFAULT_MEMORY_MB = 512.0
DEFAULT_DISK_MB = 2048.0
ENTRY_SUFFIX = ".entry"
TMP_PREFIX = ".tmp-"
# A temporary file older than this is a dead writer's even if its pid was reused.
STALE_TMP_S = 3600.0
_MB = 2**20


@dataclass(frozen=True)
class Settings:
    """The cache settings of a run ([MONITOR] data_cache_mb, cache_dir, cache_size_mb)."""

    memory_mb: float = DEFAULT_MEMORY_MB
    cache_dir: str | None = None
    disk_mb: float = DEFAULT_DISK_MB

    @property
    def enabled(self) -> bool:
        return self.memory_mb > 0 or bool(self.cache_dir)

    @classmethod
    def of(cls, given: Mapping[str, Any] | None) -> Settings:
        """From a RunSpec's "data_cache" (absent: the defaults, memory only)."""
        if not given:
            return cls()
        return cls(
            memory_mb=float(given.get("data_cache_mb", DEFAULT_MEMORY_MB)),
            cache_dir=given.get("cache_dir") or None,
            disk_mb=float(given.get("cache_size_mb", DEFAULT_DISK_MB)),
        )


@dataclass
class Prepared:
    """What preparing the data stages produced, as a run consumes it."""

    train: Any
    test: Any
    run_info: dict[str, Any]  # the whole run_info after preparing
    rng: dict[str, Any]  # execution.rng_states() right after preparing
    validation: Any = None  # the validation loader, when the data stage gives one


@dataclass
class Stats:
    """The worker's cache figures, sent with each run's provenance."""

    hits: int = 0  # memory and disk
    disk_hits: int = 0
    misses: int = 0
    # The last run's outcome: "memory", "disk", "miss", or "off" (cache off or uncacheable).
    last: str = "off"

    def record(self, outcome: str) -> None:
        self.last = outcome
        if outcome in ("memory", "disk"):
            self.hits += 1
            self.disk_hits += outcome == "disk"
        elif outcome == "miss":
            self.misses += 1


@dataclass
class _Entry:
    blob: bytes
    refs: list[Any] = field(default_factory=list)


# -- serialization ----------------------------------------------------------------------------

# The objects held by reference while an entry is being loaded (see _by_reference).
_loading: list[Any] = []


def _held(index: int) -> Any:
    return _loading[index]


def _by_reference(obj: Any) -> bool:
    """A class or function pickle could not find again by name: defined in a user class file
    (its module is dropped after the run) or local (a lambda, a closure)."""
    if not isinstance(obj, (type, types.FunctionType)):
        return False
    module = getattr(obj, "__module__", "") or ""
    qualname = getattr(obj, "__qualname__", "") or ""
    return module.startswith("mosaic_user_") or "<" in qualname or module not in sys.modules


class TooLarge(Exception):
    """The entry would exceed every budget it could be kept in."""


class _Capped(io.BytesIO):
    """A buffer that refuses to grow past `cap` bytes: serializing a dataset far larger than
    the budgets stops there instead of holding a second copy of it in memory."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.overflowed = False

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > self.cap:
            # torch's zip writer turns this into its own RuntimeError; dumps says why.
            self.overflowed = True
            raise TooLarge(f"more than {self.cap / _MB:.1f} MiB")
        return super().write(data)


def _save_config() -> Any:
    """torch's serialization settings (torch >= 2.6), or None."""
    serialization = getattr(torch.utils, "serialization", None)
    return getattr(getattr(serialization, "config", None), "save", None)


def dumps(payload: Any, cap: int | None = None, crc: bool = True) -> _Entry:
    """The payload's bytes (torch.save), with the classes and functions of _by_reference held
    aside. Raises what pickling raises for an object that cannot be kept, and TooLarge past
    `cap` bytes. Without `crc` (an entry that stays in memory) the zip writer skips its
    checksums, most of its time."""
    refs: list[Any] = []

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if _by_reference(obj):
                refs.append(obj)
                return _held, (len(refs) - 1,)
            return NotImplemented

    module = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle)})
    module.Pickler = Pickler
    buffer = io.BytesIO() if cap is None else _Capped(cap)
    config = _save_config()
    saved_crc = getattr(config, "compute_crc32", True)
    try:
        if config is not None:
            config.compute_crc32 = crc
        torch.save(payload, buffer, pickle_module=module)
    except Exception:
        if isinstance(buffer, _Capped) and buffer.overflowed:
            raise TooLarge(f"more than {buffer.cap / _MB:.1f} MiB") from None
        raise
    finally:
        if config is not None:
            config.compute_crc32 = saved_crc
    return _Entry(buffer.getvalue(), refs)


def loads(entry: _Entry) -> Any:
    """Fresh objects from an entry's bytes (nothing shared with the entry but its refs)."""
    _loading[:] = entry.refs
    try:
        return torch.load(io.BytesIO(entry.blob), weights_only=False, map_location=None)
    finally:
        _loading.clear()


# -- the key ----------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def constructor_inputs(cls: type, module: dict[str, Any], pipeline: list[dict[str, Any]]) -> Any:
    """The values the class's constructor may take from the other sections of the pipeline
    (execution.construct looks a parameter up in run_info, its own section, then the others):
    a model section's parameter that a data stage takes is part of what it prepares."""
    try:
        names = [
            name
            for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return None
    taken: dict[str, Any] = {}
    for other in pipeline:
        if other is module:
            continue
        for name in names:
            if name in other and name not in taken:
                taken[name] = other[name]
    return taken


def key(
    classes: list[type],
    modules: list[dict[str, Any]],
    pipeline: list[dict[str, Any]],
    sources: Mapping[str, bytes],
    seed: int,
    device: str,
    deterministic: bool,
) -> str:
    """The entry's key: a SHA-256 over everything that determines what the stages return."""
    parts: list[Any] = [
        "mosaic-data-cache-1",
        torch.__version__,
        platform.python_version(),
        seed,
        device,
        deterministic,
    ]
    for cls, module in zip(classes, modules):
        source = sources.get(module["path_to_class"], b"")
        parts.append(
            [
                hashlib.sha256(source).hexdigest(),
                cls.__qualname__,
                _json(module),
                _json(constructor_inputs(cls, module, pipeline)),
            ]
        )
    return hashlib.sha256(_json(parts).encode()).hexdigest()


def cacheable(classes: list[type]) -> bool:
    return all(getattr(cls, CACHEABLE, True) is not False for cls in classes)


def wants_disk(classes: list[type]) -> bool:
    return any(getattr(cls, ON_DISK, False) is True for cls in classes)


# -- memory -----------------------------------------------------------------------------------


class MemoryCache:
    """Entries by key, least recently used first, within a byte budget."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    def get(self, name: str) -> _Entry | None:
        entry = self.entries.get(name)
        if entry is not None:
            self.entries.move_to_end(name)
        return entry

    def put(self, name: str, entry: _Entry, budget: int) -> bool:
        """Keep the entry unless it alone exceeds the budget; evict the oldest to fit."""
        self.discard(name)
        if len(entry.blob) > budget:
            self.shrink(budget)
            return False
        self.entries[name] = entry
        self.bytes += len(entry.blob)
        self.shrink(budget)
        return True

    def discard(self, name: str) -> None:
        old = self.entries.pop(name, None)
        if old is not None:
            self.bytes -= len(old.blob)

    def shrink(self, budget: int) -> None:
        while self.bytes > budget and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= len(old.blob)


# -- disk -------------------------------------------------------------------------------------


class DiskCache:
    """Entries as files of one directory, shared by the owner's workers.

    Written whole or not at all (temporary file, fsync, rename); only files named
    ``<key>.entry``, owned by this user, are read. The directory is made private (0700): an
    entry is unpickled, so only its owner may be able to put one there.
    """

    def __init__(self, directory: str, budget: int) -> None:
        self.directory = directory
        self.budget = budget

    def _ready(self) -> bool:
        """Whether the directory exists (made if needed), is a directory of ours and is not
        writable by others. A directory that cannot be used is no cache, never a failed run."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            info = os.lstat(self.directory)
        except OSError:
            return False
        return (
            stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        )

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + ENTRY_SUFFIX)

    def get(self, name: str) -> bytes | None:
        if not self._ready():
            return None
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                return None
            with os.fdopen(os.dup(fd), "rb") as fh:
                blob = fh.read()
            os.utime(fd)  # recently used: the last to be evicted
        except OSError:
            return None
        finally:
            os.close(fd)
        return blob

    def put(self, name: str, blob: bytes) -> bool:
        """Write the entry atomically, then evict down to the budget. False when it is not
        kept (too large, or the disk is full: the cache is an optimisation, never a failure)."""
        if len(blob) > self.budget or not self._ready():
            return False
        try:
            # Another worker wrote it meanwhile (the same key: the same bytes): mark it used.
            os.utime(self.path(name), follow_symlinks=False)
            return True
        except OSError:
            pass
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{name}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path(name))
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        self.evict()
        return True

    def discard(self, name: str) -> None:
        try:
            os.unlink(self.path(name))
        except OSError:
            pass

    def evict(self) -> None:
        """Remove dead writers' temporary files, then the least recently used entries until
        the directory holds at most the budget (other workers may evict at the same time: a
        file already gone is fine)."""
        entries: list[tuple[float, int, str]] = []
        total = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        now = time.time()
        for file_name in names:
            path = os.path.join(self.directory, file_name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if file_name.startswith(TMP_PREFIX):
                if _dead_writer(file_name, now - info.st_mtime):
                    _unlink(path)
                    continue
                total += info.st_size  # a write in progress counts against the budget too
            elif file_name.endswith(ENTRY_SUFFIX) and stat.S_ISREG(info.st_mode):
                entries.append((info.st_mtime, info.st_size, path))
                total += info.st_size
        for _, size, path in sorted(entries):
            if total <= self.budget:
                break
            _unlink(path)
            total -= size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _dead_writer(file_name: str, age: float) -> bool:
    """Whether a temporary file's writer (the pid that ends its name) is gone."""
    if age > STALE_TMP_S:
        return True
    try:
        pid = int(file_name.rsplit(".", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


# -- the worker's cache -----------------------------------------------------------------------

memory = MemoryCache()
stats = Stats()
# Set in a run forked by its worker (--isolation process): its memory cache dies with it.
in_forked_run = False


def _memory_budget(settings: Settings) -> int:
    return 0 if in_forked_run else int(settings.memory_mb * _MB)


def lookup(name: str, settings: Settings) -> tuple[Prepared | None, str]:
    """A fresh copy of the entry, and where it came from ("memory", "disk"), or (None, "miss")."""
    budget = _memory_budget(settings)
    memory.shrink(budget)  # a submission with a smaller budget than the last one's
    entry = memory.get(name) if budget > 0 else None
    if entry is not None:
        try:
            return _prepared(loads(entry), name), "memory"
        except Exception:  # noqa: BLE001 -- a bad entry is a miss, never a failed run
            memory.discard(name)
    if settings.cache_dir:
        disk = DiskCache(settings.cache_dir, int(settings.disk_mb * _MB))
        blob = disk.get(name)
        if blob is not None:
            try:
                prepared = _prepared(loads(_Entry(blob)), name)
            except Exception:  # noqa: BLE001 -- unreadable: drop it, prepare again
                disk.discard(name)
            else:
                if budget > 0:
                    memory.put(name, _Entry(blob), budget)
                return prepared, "disk"
    return None, "miss"


def _prepared(payload: Any, name: str) -> Prepared:
    if not isinstance(payload, dict) or payload.get("key") != name:
        raise ValueError("not this key's entry")
    return Prepared(
        payload["train"],
        payload["test"],
        payload["run_info"],
        payload["rng"],
        payload.get("validation"),
    )


def store(name: str, prepared: Prepared, settings: Settings, on_disk: bool) -> str | None:
    """Keep what a run prepared (call it before the run uses it: loaders and generators are
    kept as they are now). Returns a line for the run's log when it could not be kept."""
    budget = _memory_budget(settings)
    if budget <= 0 and not (on_disk and settings.cache_dir):
        return None
    payload = {
        "key": name,
        "train": prepared.train,
        "test": prepared.test,
        "validation": prepared.validation,
        "run_info": prepared.run_info,
        "rng": prepared.rng,
    }
    disk_budget = int(settings.disk_mb * _MB) if on_disk and settings.cache_dir else 0
    try:
        entry = dumps(payload, cap=max(budget, disk_budget), crc=disk_budget > 0)
    except TooLarge as exc:
        return f"[mosaic] data cache: the prepared data is not kept: {exc} (data_cache_mb)"
    except Exception as exc:  # noqa: BLE001 -- an object pickle cannot keep (a file, a lock)
        what = f"{type(exc).__name__}: {exc}"
        return f"[mosaic] data cache: the prepared data cannot be kept ({what})"
    notes = []
    if budget > 0 and not memory.put(name, entry, budget):
        notes.append(f"larger ({len(entry.blob) / _MB:.1f} MiB) than data_cache_mb")
    if on_disk and settings.cache_dir:
        if entry.refs:
            held = ", ".join(sorted({getattr(r, "__qualname__", "?") for r in entry.refs}))
            notes.append(f"not written to cache_dir: it refers to {held}, defined in a class file")
        elif not DiskCache(settings.cache_dir, disk_budget).put(name, entry.blob):
            notes.append("not written to cache_dir (too large for cache_size_mb, or no space)")
    return f"[mosaic] data cache: {'; '.join(notes)}" if notes else None


def figures() -> dict[str, Any]:
    """The worker's cache figures for the daemon (protocol: the provenance's "data_cache")."""
    return {
        "outcome": stats.last,
        "hits": stats.hits,
        "disk_hits": stats.disk_hits,
        "misses": stats.misses,
        "entries": len(memory.entries),
        "bytes": memory.bytes,
    }
