"""Datasets, federated partitions and per-client train/validation splits (hub datasets: fed_deq/hub.py).

``load_dataset`` and the partition lists are memoised with ``functools.lru_cache``: a Flower client process
serves many partitions and rounds, and regenerating MNIST-1D or repartitioning 20,000 labels per message
would cost seconds. Cached arrays are made read-only so one caller cannot corrupt another's data; copy them
(``np.array(x)``, ``torch.tensor(x)``) before writing. Arrays handed out by ``client_data`` are fresh copies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fed_deq.errors import InputError
from fed_deq.hub import from_hf_dataset, load_hub  # noqa: F401 - from_hf_dataset is part of this module's API
from fed_deq.seeding import rng

# Guards the global `random`/`np.random` state that mnist1d's make_dataset seeds and draws from.
_GLOBAL_RNG_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A dataset split into train, test and the server's probe set: float32 features, int64 labels (read-only).

    The probe set is drawn from the training split before it is partitioned, so it follows the training
    distribution and shares no sample with the test set or with any client.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    x_probe: np.ndarray | None = None
    y_probe: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's local data: its partition split into train and (possibly empty) validation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: must be an integer >= 0, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_dataset(
    name: str,
    *,
    seed: int,
    num_samples: int,
    test_fraction: float,
    image_key: str | None = None,
    label_key: str | None = None,
    probe_samples: int = 0,
) -> DataBundle:
    """Load ``name`` and split it into train/test (and ``probe_samples`` of train into the probe set) with
    seeded permutations (memoised).

    ``"mnist1d"`` is generated locally (``num_samples`` total, x shape ``(N, 40)``); ``"digits"`` is
    scikit-learn's 8×8 digits (x ``(N, 64)`` in [0, 1], ``num_samples`` ignored); any other name is a
    Hugging Face hub dataset (needs the network) whose splits are pooled, converted with
    ``from_hf_dataset`` and re-split by ``test_fraction``.
    """
    seed = _check_seed(seed)
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise InputError(f"dataset.test_fraction: must be in (0, 1), got {test_fraction!r}")
    if not isinstance(name, str) or not name:
        raise InputError(f"dataset.name: must be a non-empty string, got {name!r}")
    if name == "mnist1d":
        x, y, num_classes = _make_mnist1d(seed, num_samples)
    elif name == "digits":
        x, y, num_classes = _load_digits()
    else:
        x, y, num_classes = load_hub(name, image_key, label_key)
    return _split_probe(_split_bundle(x, y, num_classes, test_fraction, seed), probe_samples, seed)


def _split_probe(bundle: DataBundle, probe_samples: int, seed: int) -> DataBundle:
    """Move ``probe_samples`` random training samples into the probe set (the test set is untouched)."""
    if isinstance(probe_samples, bool) or not isinstance(probe_samples, (int, np.integer)) or probe_samples < 0:
        raise InputError(f"fusion.probe_samples: must be an integer >= 0, got {probe_samples!r}")
    n = len(bundle.y_train)
    if probe_samples >= n:
        raise InputError(f"fusion.probe_samples: must be below the {n} training samples, got {probe_samples}")
    order = rng(seed, "data", "probe-split").permutation(n)
    probe, train = np.sort(order[:probe_samples]), np.sort(order[probe_samples:])
    arrays = [np.ascontiguousarray(a) for a in (bundle.x_train[train], bundle.y_train[train],
                                                bundle.x_train[probe], bundle.y_train[probe])]
    for a in arrays:
        a.setflags(write=False)
    return dataclasses.replace(bundle, x_train=arrays[0], y_train=arrays[1], x_probe=arrays[2], y_probe=arrays[3])


def _make_mnist1d(seed: int, num_samples) -> tuple[np.ndarray, np.ndarray, int]:
    from mnist1d.data import get_dataset_args, make_dataset

    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 20:
        raise InputError(f"dataset.num_samples: must be an integer >= 20 for mnist1d, got {num_samples!r}")
    args = get_dataset_args(as_dict=False)
    args.num_samples = int(num_samples)
    args.seed = seed
    # make_dataset seeds and draws from the global `random`/`np.random`; restore them so loading data
    # never changes anyone else's random stream. The lock keeps two threads (the runner pre-generates the
    # server's dataset in one while the server starts in another) from interleaving their draws, which
    # silently produced two different datasets in one process.
    with _GLOBAL_RNG_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            raw = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    return x, y, 10


def _load_digits() -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel intensities in the digits set run from 0 to 16.
    x = (digits.data / 16.0).astype(np.float32)
    return x, digits.target.astype(np.int64), 10


def _split_bundle(x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float, seed: int) -> DataBundle:
    n = len(y)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    order = rng(seed, "data", "test-split").permutation(n)
    test, train = order[:n_test], order[n_test:]
    arrays = [np.ascontiguousarray(a) for a in (x[train], y[train], x[test], y[test])]
    for a in arrays:
        a.setflags(write=False)
    return DataBundle(*arrays, num_classes=int(num_classes), input_shape=tuple(int(d) for d in x.shape[1:]))


# ---------------------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------------------


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
    seed = _check_seed(seed)
    options = _partition_options(kind, alpha, classes_per_client, min_partition_size, labels)
    labels = labels.astype(np.int64)
    return list(_partition_cached(labels.tobytes(), int(num_partitions), kind, seed, *options))


def _partition_options(kind, alpha, classes_per_client, min_partition_size, labels) -> tuple:
    """Validate the options ``kind`` uses and drop the others, so equivalent calls share a cache entry."""
    if kind not in PARTITION_KINDS:
        raise InputError(f"dataset.partition.kind: unknown {kind!r}; valid: {', '.join(PARTITION_KINDS)}")
    return PARTITION_KINDS[kind].options(alpha, classes_per_client, min_partition_size, labels)


@functools.lru_cache(maxsize=8)
def _partition_cached(labels_bytes: bytes, num_partitions: int, kind: str, seed: int,
                      alpha: float | None, classes_per_client: int | None,
                      min_partition_size: int) -> tuple[np.ndarray, ...]:
    import datasets
    from flwr_datasets import partitioner as partitioners

    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    partitioner_seed = int(rng(seed, "data", "partitioner").integers(2**31))
    partitioner, order = PARTITION_KINDS[kind].partitioner(
        partitioners, num_partitions, labels.size, seed=seed, partitioner_seed=partitioner_seed, alpha=alpha,
        classes_per_client=classes_per_client, min_partition_size=min_partition_size)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    try:
        parts = tuple(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                      for i in range(num_partitions))
    except ValueError as exc:
        raise InputError(f"dataset.partition: {kind} partitioning failed: {str(exc).splitlines()[0]}") from exc
    for part in parts:
        part.setflags(write=False)
    return parts


@dataclass(frozen=True)
class PartitionKind:
    """A split of the training set: ``options(alpha, classes_per_client, min_partition_size, labels)`` checks
    and keeps the options it uses; ``partitioner(flwr_datasets.partitioner, num_partitions, size, *, seed,
    partitioner_seed, **options)`` returns the partitioner and the sample order it is fed in."""

    options: Callable[..., tuple]
    partitioner: Callable[..., tuple]


def _iid_options(*_) -> tuple:
    return (None, None, 0)


def _dirichlet_options(alpha, classes_per_client, min_partition_size, labels) -> tuple:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"dataset.partition.alpha: must be a number > 0 for dirichlet, got {alpha!r}")
    if isinstance(min_partition_size, bool) or not isinstance(min_partition_size, int) or min_partition_size < 0:
        raise InputError(f"dataset.partition.min_partition_size: must be an integer >= 0, got {min_partition_size!r}")
    return (float(alpha), None, min_partition_size)


def _pathological_options(alpha, classes_per_client, min_partition_size, labels) -> tuple:
    num_classes = len(np.unique(labels))
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
    "iid": PartitionKind(_iid_options, _iid_partitioner),
    "dirichlet": PartitionKind(_dirichlet_options, _dirichlet_partitioner),
    "pathological": PartitionKind(_pathological_options, _pathological_partitioner),
})


def client_data(
    bundle: DataBundle,
    partition_id: int,
    *,
    num_partitions: int,
    kind: str,
    seed: int,
    alpha: float | None = None,
    classes_per_client: int | None = None,
    min_partition_size: int = 0,
    validation_fraction: float = 0.1,
) -> ClientData:
    """The training partition ``partition_id`` of ``bundle``, split by a seeded shuffle into local train and
    validation (``floor(n * validation_fraction)`` samples, keeping at least one for training)."""
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)):
        raise InputError(f"partition-id: must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise InputError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    if not (isinstance(validation_fraction, (int, float)) and 0 <= validation_fraction < 1):
        raise InputError(f"dataset.validation_fraction: must be in [0, 1), got {validation_fraction!r}")
    indices = partition(bundle.y_train, num_partitions, kind=kind, seed=seed, alpha=alpha,
                        classes_per_client=classes_per_client, min_partition_size=min_partition_size)[partition_id]
    if indices.size == 0:
        raise InputError(
            f"partition {partition_id} is empty; raise dataset.partition.min_partition_size or alpha, or use fewer clients"
        )
    shuffled = indices[rng(_check_seed(seed), "data", "validation", int(partition_id)).permutation(indices.size)]
    n_val = min(math.floor(indices.size * validation_fraction), indices.size - 1)
    val, train = shuffled[:n_val], shuffled[n_val:]
    # Fancy indexing copies, so clients get writable arrays independent of the cached bundle.
    return ClientData(bundle.x_train[train], bundle.y_train[train], bundle.x_train[val], bundle.y_train[val])
