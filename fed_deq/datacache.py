"""Generated datasets kept on disk, so that each process (the server, every Ray worker, every run of a study)
loads them in milliseconds instead of generating them again (MNIST-1D: 1.2 s for 4,000 samples, 3.4 s for 20,000).

A dataset is stored as one ``.npz`` file in the cache folder, named by a hash of everything that determines it:
the generator's name and version and every generation parameter. Files are written to a temporary name and
renamed into place (``results.write_atomic``), so concurrent processes never read half a file; a file that
cannot be read, or lacks an array, is generated and written again. The folder is ``$FED_DEQ_CACHE_DIR``, or
``~/.cache/fed-deq`` when that is unset. A folder that cannot be written only costs the speed-up: the arrays
are generated and returned as before. Processes that need the same missing file at the same time take turns
(``generation_lock``): one generates it, the others then read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fed_deq.results import write_atomic

CACHE_DIR_ENV = "FED_DEQ_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/fed-deq")
#: Bumped whenever what a cached file holds changes meaning: old files are then simply never read again.
FORMAT_VERSION = 1
#: What a damaged or foreign file raises when read: any of these means "generate it again".
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def cache_dir() -> Path:
    """The cache folder: ``$FED_DEQ_CACHE_DIR`` if set (and not empty), else ``~/.cache/fed-deq``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def package_version(distribution: str) -> str:
    """The installed version of ``distribution``, for a cache key: a new release may generate other data."""
    from importlib.metadata import version

    return version(distribution)


def cache_key(kind: str, params: Mapping) -> str:
    """A hex digest naming the dataset ``kind`` generated with ``params`` (JSON-serialisable values)."""
    text = json.dumps({"format": FORMAT_VERSION, "kind": kind, "params": params}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cache_path(kind: str, params: Mapping) -> Path:
    """Where the dataset ``kind`` with ``params`` is (or would be) stored."""
    return cache_dir() / f"{kind}-{cache_key(kind, params)}.npz"


def cached_arrays(kind: str, params: Mapping, generate: Callable[[], Mapping[str, np.ndarray]],
                  names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of dataset ``kind`` with ``params``: read from the cache, or generated and stored.

    ``generate()`` must return a mapping with at least the arrays ``names``; the same ``params`` must always
    generate the same arrays, since which of the two paths runs depends on what is on disk.
    """
    path = cache_path(kind, params)
    found = read_arrays(path, names)
    if found is not None:
        return found
    with generation_lock(path):
        found = read_arrays(path, names)  # another process may have written it while this one waited
        if found is not None:
            return found
        generated = generate()
        arrays = {name: np.asarray(generated[name]) for name in names}
        store_arrays(path, arrays)
    return arrays


@contextmanager
def generation_lock(path: Path) -> Iterator[None]:
    """Inside the block, this process alone generates the file ``path`` (among processes that ask the same).

    A simulation's server and its client actors start together and all need the dataset: without the lock
    each generated it (100,000 MNIST-1D samples: about 30 s of CPU each, three at once on two cores); with it
    the first generates and the others wait, then read its file. The lock is an exclusive ``flock`` on
    ``path`` + ``.lock``, released by the kernel if the process dies. Where locking is unavailable (no fcntl,
    a folder that cannot be written) the block runs unlocked: each process generates, as before.
    """
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115 - closed in the finally below
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing the file releases the lock


def cached_parts(kind: str, params: Mapping, generate: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """A tuple of 1-D arrays (e.g. the sample indices of each partition), cached like ``cached_arrays``: stored
    as their concatenation and their lengths, returned as views of one array."""

    def packed() -> dict[str, np.ndarray]:
        parts = generate()
        return {"values": np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64),
                "sizes": np.array([len(p) for p in parts], dtype=np.int64)}

    arrays = cached_arrays(kind, params, packed, ("values", "sizes"))
    return tuple(np.split(arrays["values"], np.cumsum(arrays["sizes"])[:-1]))


def digest(data: bytes) -> str:
    """A short hex digest of ``data``, to stand for a large input (such as a label array) in ``params``."""
    return hashlib.sha256(data).hexdigest()[:32]


def read_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``names`` stored in ``path``; None if the file is absent, unreadable or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in names}
    except FileNotFoundError:
        return None
    except _UNREADABLE:  # damaged (e.g. a disk filled up mid-write by another tool): the caller regenerates
        return None


def store_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically; False (with a warning) if the cache folder cannot be written."""
    try:
        write_atomic(path, lambda handle: np.savez(handle, **arrays))
    except OSError as exc:
        warnings.warn(f"dataset cache not written ({path.parent}: {exc.strerror or exc}); "
                      f"set {CACHE_DIR_ENV} to a writable folder to keep generated datasets", stacklevel=2)
        return False
    return True
