"""Every random draw of a run, derived from the scenario seed and the name of what is drawn."""

from __future__ import annotations

import hashlib

import numpy as np


def rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator for one named draw, derived from the scenario seed with numpy's SeedSequence.

    Keys are stable ints or strings (round number, partition id, a name). They are hashed with a
    length-prefixed encoding first, because SeedSequence pads short entropy with zeros and splits big
    ints into 32-bit words: ``SeedSequence([s, 3])`` equals ``SeedSequence([s, 3, 0])``, which would make
    ``rng(s, "x", 0)`` and ``rng(s, "x")`` the same stream.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    digest = hashlib.sha256()
    for key in keys:
        digest.update(_encode_key(key))
    words = np.frombuffer(digest.digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(w) for w in words)]))


def _encode_key(key: int | str) -> bytes:
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"rng keys must be ints or strings, got {key!r}")
    if isinstance(key, (int, np.integer)):
        tag, text = b"i", str(int(key))
    elif isinstance(key, str):
        tag, text = b"s", key
    else:
        raise TypeError(f"rng keys must be ints or strings, got {type(key).__name__} {key!r}")
    data = text.encode("utf-8")
    return tag + len(data).to_bytes(8, "little") + data
