"""Federated partitions of a training set: which sample indices each client holds (``PARTITION_KINDS``).

Built with flwr-datasets partitioners, or computed directly where that gives the very same partitions (IID).
Partition lists are memoised per process (``functools.lru_cache``) and kept on disk (fed_deq/datacache.py): a
Flower client process looks its partition up every round, and the server looks up every partition of the
fleet once. Returned arrays are read-only.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fed_deq import datacache
from fed_deq.errors import InputError
from fed_deq.seeding import rng


def check_seed(seed) -> int:
    """``seed`` as an int; InputError unless it is an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: must be an integer >= 0, got {seed!r}")
    return int(seed)


def partition(
    labels,
    num_partitions: int,
    *,
    kind: str,
    seed: int,
    alpha: float | None = None,
    classes_per_client: int | None = None,
    min_partition_size: int = 0,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_partitions`` disjoint index arrays.

    ``kind``: ``"iid"`` (seeded shuffle, balanced sizes), ``"dirichlet"`` (per-class Dirichlet(α) shares,
    every partition gets ≥ ``min_partition_size`` samples) or ``"pathological"`` (each partition holds
    ``classes_per_client`` classes, assigned round-robin). Built with flwr-datasets partitioners; the
    same arguments always give the same partitions (memoised). Returned arrays are read-only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"partition: labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise InputError(f"fleet.num_clients: must be an integer, got {num_partitions!r}")
    if not 1 <= num_partitions <= labels.size:
        raise InputError(f"fleet.num_clients: must be in [1, {labels.size}] (training samples), got {num_partitions}")
    seed = check_seed(seed)
    key = _labels_key(labels)
    options = _partition_options(kind, alpha, classes_per_client, min_partition_size, key)
    return list(_partition_cached(key, int(num_partitions), kind, seed, *options))


def _partition_options(kind, alpha, classes_per_client, min_partition_size, labels_key: bytes) -> tuple:
    """Validate the options ``kind`` uses and drop the others, so equivalent calls share a cache entry."""
    if kind not in PARTITION_KINDS:
        raise InputError(f"dataset.partition.kind: unknown {kind!r}; valid: {', '.join(PARTITION_KINDS)}")
    return PARTITION_KINDS[kind].options(alpha, classes_per_client, min_partition_size, labels_key)


#: Memo: read-only label arrays already turned into a partition-cache key, id -> (weak reference, key).
_LABEL_KEYS: dict[int, tuple[weakref.ref, bytes]] = {}


def _labels_key(labels: np.ndarray) -> bytes:
    """The labels as int64 bytes, the key of the partition memo.

    Remembered for a read-only array that owns its data (a dataset's labels, which nothing can change): the
    server looks up each of 10,000 partitions with the same labels, and copying and hashing 80,000 labels
    for every lookup cost 0.8 ms each.
    """
    if labels.flags.writeable or not labels.flags.owndata:
        return labels.astype(np.int64).tobytes()
    known = _LABEL_KEYS.get(id(labels))
    if known is not None and known[0]() is labels:
        return known[1]
    if len(_LABEL_KEYS) >= 8:
        _LABEL_KEYS.clear()
    key = labels.astype(np.int64).tobytes()
    _LABEL_KEYS[id(labels)] = (weakref.ref(labels), key)
    return key


@functools.lru_cache(maxsize=8)
def _count_classes(labels_key: bytes) -> int:
    return int(np.unique(np.frombuffer(labels_key, dtype=np.int64)).size)


@functools.lru_cache(maxsize=8)
def _partition_cached(labels_bytes: bytes, num_partitions: int, kind: str, seed: int,
                      alpha: float | None, classes_per_client: int | None,
                      min_partition_size: int) -> tuple[np.ndarray, ...]:
    # Kept on disk too: a process that finds them there never imports the datasets library (seconds).
    params = {"labels": datacache.digest(labels_bytes), "num_partitions": num_partitions, "kind": kind,
              "seed": seed, "alpha": alpha, "classes_per_client": classes_per_client,
              "min_partition_size": min_partition_size, "flwr-datasets": datacache.package_version("flwr-datasets")}
    make = functools.partial(_make_partitions, labels_bytes, num_partitions, kind, seed, alpha, classes_per_client,
                             min_partition_size)
    parts = datacache.cached_parts("partition", params, make)
    for part in parts:
        part.setflags(write=False)
    return parts


def _make_partitions(labels_bytes: bytes, num_partitions: int, kind: str, seed: int, alpha: float | None,
                     classes_per_client: int | None, min_partition_size: int) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    split = PARTITION_KINDS[kind].split
    if split is not None:  # the same partitions computed directly: no datasets import (seconds per process)
        return split(num_partitions, labels.size, seed=seed)
    import datasets
    from flwr_datasets import partitioner as partitioners

    partitioner_seed = int(rng(seed, "data", "partitioner").integers(2**31))
    partitioner, order = PARTITION_KINDS[kind].partitioner(
        partitioners, num_partitions, labels.size, seed=seed, partitioner_seed=partitioner_seed, alpha=alpha,
        classes_per_client=classes_per_client, min_partition_size=min_partition_size)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    try:
        return _load_partitions(partitioner, order, num_partitions)
    except ValueError as exc:
        raise InputError(f"dataset.partition: {kind} partitioning failed: {str(exc).splitlines()[0]}") from exc


def _load_partitions(partitioner, order: np.ndarray, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Every partition's sample indices (``order`` at the rows the partitioner assigns).

    flwr-datasets hands out one partition per ``load_partition`` call, a ``Dataset.select`` of about 1 ms:
    10 s for 10,000 partitions. Its Dirichlet and pathological partitioners compute every partition's rows
    on the first call, so they are read from that map (flwr-datasets 0.6's ``_partition_id_to_indices``) in
    one go; a partitioner without such a map is asked partition by partition.
    """
    first = np.asarray(partitioner.load_partition(0)["index"], dtype=np.int64)
    rows = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(rows, dict) or sorted(rows) != list(range(num_partitions)):
        return (first, *(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                         for i in range(1, num_partitions)))
    return tuple(order[np.asarray(rows[i], dtype=np.int64)] for i in range(num_partitions))


@dataclass(frozen=True)
class PartitionKind:
    """A split of the training set.

    ``options(alpha, classes_per_client, min_partition_size, labels_key)`` (the labels as int64 bytes) checks
    and keeps the options it uses; ``partitioner(flwr_datasets.partitioner, num_partitions, size, *, seed,
    partitioner_seed, **options)`` returns the partitioner and the sample order it is fed in; ``split(
    num_partitions, size, *, seed)``, when given, computes the very same partitions without flwr-datasets.
    """

    options: Callable[..., tuple]
    partitioner: Callable[..., tuple]
    split: Callable[..., tuple[np.ndarray, ...]] | None = None


def _iid_options(*_) -> tuple:
    return (None, None, 0)


def _dirichlet_options(alpha, classes_per_client, min_partition_size, labels_key) -> tuple:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"dataset.partition.alpha: must be a number > 0 for dirichlet, got {alpha!r}")
    if isinstance(min_partition_size, bool) or not isinstance(min_partition_size, int) or min_partition_size < 0:
        raise InputError(f"dataset.partition.min_partition_size: must be an integer >= 0, got {min_partition_size!r}")
    return (float(alpha), None, min_partition_size)


def _pathological_options(alpha, classes_per_client, min_partition_size, labels_key: bytes) -> tuple:
    num_classes = _count_classes(labels_key)
    if (isinstance(classes_per_client, bool) or not isinstance(classes_per_client, int)
            or not 1 <= classes_per_client <= num_classes):
        raise InputError(
            f"dataset.partition.classes_per_client: must be an integer in [1, {num_classes}], got {classes_per_client!r}"
        )
    return (None, classes_per_client, 0)


def _iid_partitioner(partitioners, num_partitions: int, size: int, *, seed: int, **_) -> tuple:
    # IidPartitioner shards contiguously; shuffling first makes the shards random.
    order = rng(seed, "data", "iid-order").permutation(size)
    return partitioners.IidPartitioner(num_partitions=num_partitions), order


def _iid_split(num_partitions: int, size: int, *, seed: int) -> tuple[np.ndarray, ...]:
    # What IidPartitioner returns: Dataset.shard(contiguous=True) gives the first size % n shards one extra
    # sample, as array_split does (tests/test_scale.py compares the two).
    order = rng(seed, "data", "iid-order").permutation(size)
    return tuple(np.array_split(order, num_partitions))


def _dirichlet_partitioner(partitioners, num_partitions: int, size: int, *, partitioner_seed: int, alpha: float,
                           min_partition_size: int, **_) -> tuple:
    return partitioners.DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=alpha,
        min_partition_size=min_partition_size, self_balancing=False, seed=partitioner_seed,
    ), np.arange(size)


def _pathological_partitioner(partitioners, num_partitions: int, size: int, *, partitioner_seed: int,
                              classes_per_client: int, **_) -> tuple:
    return partitioners.PathologicalPartitioner(
        num_partitions=num_partitions, partition_by="label", num_classes_per_partition=classes_per_client,
        class_assignment_mode="deterministic", seed=partitioner_seed,
    ), np.arange(size)


#: Partition kind name → how it splits. The scenario's ``dataset.partition.kind`` is checked against these.
PARTITION_KINDS: Mapping[str, PartitionKind] = MappingProxyType({
    "iid": PartitionKind(_iid_options, _iid_partitioner, _iid_split),
    "dirichlet": PartitionKind(_dirichlet_options, _dirichlet_partitioner),
    "pathological": PartitionKind(_pathological_options, _pathological_partitioner),
})
