"""Datasets and per-client train/validation splits (partitions: fed_deq/partitions.py; hub: fed_deq/hub.py).

``load_dataset`` and the partition lists are memoised with ``functools.lru_cache``: a Flower client process
serves many partitions and rounds, and regenerating MNIST-1D or repartitioning 20,000 labels per message
would cost seconds. Generated datasets are also kept on disk, for every process (fed_deq/datacache.py).
Cached arrays are made read-only so one caller cannot corrupt another's data; copy them (``np.array(x)``,
``torch.tensor(x)``) before writing. Arrays handed out by ``client_data`` are fresh copies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import threading
from dataclasses import dataclass

import numpy as np

from fed_deq import datacache
from fed_deq.errors import InputError
from fed_deq.hub import from_hf_dataset, load_hub  # noqa: F401 - from_hf_dataset is part of this module's API
# Partitions live in fed_deq/partitions.py; partition and PARTITION_KINDS stay part of this module's API, and the
# memoised internals are named here for the tests that clear or bypass the memo.
from fed_deq.partitions import PARTITION_KINDS, partition  # noqa: F401
from fed_deq.partitions import _make_partitions, _partition_cached  # noqa: F401
from fed_deq.partitions import check_seed as _check_seed
from fed_deq.seeding import rng

# Guards the global `random`/`np.random` state that mnist1d's make_dataset seeds and draws from.
_GLOBAL_RNG_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A dataset split into train, test and the server's probe set: float32 features, int64 labels (read-only).

    The probe set and the server's validation split (``hold_server_validation``) are drawn from the training
    split before it is partitioned, so they follow the training distribution and share no sample with the
    test set, with each other or with any client.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    x_probe: np.ndarray | None = None
    y_probe: np.ndarray | None = None
    x_server_val: np.ndarray | None = None
    y_server_val: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's local data: its partition split into train and (possibly empty) validation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


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


@functools.lru_cache(maxsize=4)
def hold_server_validation(bundle: DataBundle, samples: int, seed: int) -> DataBundle:
    """Move ``samples`` random training samples into the server's validation split (memoised per bundle).

    Tuning scores its trials on this split so that the test set stays unseen until the final report. It is
    drawn after the probe set, so the probe set does not depend on it; the test set is untouched.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
        raise InputError(f"dataset.server_validation_samples: must be an integer >= 0, got {samples!r}")
    n = len(bundle.y_train)
    if samples >= n:
        raise InputError(f"dataset.server_validation_samples: must be below the {n} training samples left "
                         f"after the probe set, got {samples}")
    order = rng(_check_seed(seed), "data", "server-validation-split").permutation(n)
    held, train = np.sort(order[:samples]), np.sort(order[samples:])
    arrays = [np.ascontiguousarray(a) for a in (bundle.x_train[train], bundle.y_train[train],
                                                bundle.x_train[held], bundle.y_train[held])]
    for a in arrays:
        a.setflags(write=False)
    return dataclasses.replace(bundle, x_train=arrays[0], y_train=arrays[1], x_server_val=arrays[2],
                               y_server_val=arrays[3])


def _make_mnist1d(seed: int, num_samples) -> tuple[np.ndarray, np.ndarray, int]:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 20:
        raise InputError(f"dataset.num_samples: must be an integer >= 20 for mnist1d, got {num_samples!r}")
    # mnist1d's defaults (get_dataset_args) are fixed per release, so its version stands for them in the key.
    params = {"seed": seed, "num_samples": int(num_samples), "mnist1d": datacache.package_version("mnist1d")}
    arrays = datacache.cached_arrays("mnist1d", params, lambda: _generate_mnist1d(seed, int(num_samples)),
                                     ("x", "y"))
    return arrays["x"], arrays["y"], 10


def _generate_mnist1d(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    """MNIST-1D made by its generator (never downloaded): train and test pooled, float32 x and int64 y."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=False)
    args.num_samples = num_samples
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
    return {"x": np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32),
            "y": np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)}


def _load_digits() -> tuple[np.ndarray, np.ndarray, int]:
    # Cached too: importing scikit-learn's datasets module costs each process about a second.
    params = {"scikit-learn": datacache.package_version("scikit-learn")}
    arrays = datacache.cached_arrays("digits", params, _read_digits, ("x", "y"))
    return arrays["x"], arrays["y"], 10


def _read_digits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits, x scaled to [0, 1] (float32), y int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel intensities in the digits set run from 0 to 16.
    return {"x": (digits.data / 16.0).astype(np.float32), "y": digits.target.astype(np.int64)}


def _split_bundle(x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float, seed: int) -> DataBundle:
    n = len(y)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    order = rng(seed, "data", "test-split").permutation(n)
    test, train = order[:n_test], order[n_test:]
    arrays = [np.ascontiguousarray(a) for a in (x[train], y[train], x[test], y[test])]
    for a in arrays:
        a.setflags(write=False)
    return DataBundle(*arrays, num_classes=int(num_classes), input_shape=tuple(int(d) for d in x.shape[1:]))


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
