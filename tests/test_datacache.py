"""The on-disk dataset cache (fed_deq/datacache.py): what it returns is what generation returns, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fed_deq import data, datacache, partitions


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of this test only."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(datacache.CACHE_DIR_ENV, str(folder))
    return folder


def _fail(*_args, **_kwargs):
    raise AssertionError("generated although the cache holds the dataset")


def test_a_cache_hit_returns_the_generated_arrays_bit_for_bit(cache, monkeypatch):
    fresh = data._generate_mnist1d(4, 300)
    first = data._make_mnist1d(4, 300)              # a miss: generated, stored
    assert len(list(cache.glob("mnist1d-*.npz"))) == 1
    monkeypatch.setattr(data, "_generate_mnist1d", _fail)
    second = data._make_mnist1d(4, 300)             # a hit: read back, never generated
    for x in (first[0], second[0]):
        assert x.dtype == np.float32 and x.tobytes() == fresh["x"].tobytes()
    for y in (first[1], second[1]):
        assert y.dtype == np.int64 and y.tobytes() == fresh["y"].tobytes()


def test_digits_come_from_the_cache_once_stored(cache, monkeypatch):
    x, y, classes = data._load_digits()
    monkeypatch.setattr(data, "_read_digits", _fail)
    x2, y2, _ = data._load_digits()
    assert classes == 10 and x.shape == (1797, 64) and x2.tobytes() == x.tobytes() and y2.tobytes() == y.tobytes()


def test_partitions_come_from_the_cache_identical_and_read_only(cache, monkeypatch):
    labels = np.arange(200, dtype=np.int64) % 10
    options = dict(kind="dirichlet", seed=1, alpha=0.5, min_partition_size=2)
    made = partitions._make_partitions(labels.tobytes(), 7, "dirichlet", 1, 0.5, None, 2)
    partitions._partition_cached.cache_clear()
    first = partitions.partition(labels, 7, **options)
    partitions._partition_cached.cache_clear()      # a new process: only the disk remembers
    monkeypatch.setattr(partitions, "_make_partitions", _fail)
    second = partitions.partition(labels, 7, **options)
    for parts in (first, second):
        assert [p.tolist() for p in parts] == [p.tolist() for p in made]
        assert all(p.dtype == np.int64 and not p.flags.writeable for p in parts)
    partitions._partition_cached.cache_clear()


def test_different_parameters_give_different_keys_and_order_does_not_matter():
    base = {"seed": 1, "num_samples": 4000, "mnist1d": "0.0.2.post1"}
    keys = {datacache.cache_key("mnist1d", base),
            datacache.cache_key("mnist1d", {**base, "seed": 2}),
            datacache.cache_key("mnist1d", {**base, "num_samples": 4001}),
            datacache.cache_key("mnist1d", {**base, "mnist1d": "0.0.3"}),
            datacache.cache_key("digits", base)}
    assert len(keys) == 5
    assert datacache.cache_key("mnist1d", dict(reversed(base.items()))) == datacache.cache_key("mnist1d", base)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing-array"])
def test_a_damaged_file_is_generated_again_and_rewritten(cache, damage):
    params = {"n": 5}
    arrays = {"x": np.arange(50, dtype=np.float32), "y": np.arange(5, dtype=np.int64)}
    path = datacache.cache_path("toy", params)
    datacache.store_arrays(path, arrays)
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        datacache.store_arrays(path, {"x": arrays["x"]})
    calls = []
    got = datacache.cached_arrays("toy", params, lambda: calls.append(1) or arrays, ("x", "y"))
    assert calls == [1]
    assert got["x"].tobytes() == arrays["x"].tobytes() and got["y"].tobytes() == arrays["y"].tobytes()
    assert datacache.read_arrays(path, ("x", "y")) is not None  # repaired on disk


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_partial_one(cache, monkeypatch):
    path = datacache.cache_path("toy", {"n": 1})
    datacache.store_arrays(path, {"x": np.ones(3)})
    before = path.read_bytes()

    def half_write(handle, **arrays):
        handle.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_write)
    with pytest.warns(UserWarning, match="dataset cache not written"):
        assert datacache.store_arrays(path, {"x": np.zeros(3)}) is False
    assert path.read_bytes() == before
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temporary file left behind


def test_an_unwritable_cache_folder_only_costs_the_speed_up(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(datacache.CACHE_DIR_ENV, str(blocker / "cache"))  # a folder inside a file: cannot exist
    with pytest.warns(UserWarning, match=datacache.CACHE_DIR_ENV):
        got = datacache.cached_arrays("toy", {"n": 2}, lambda: {"x": np.arange(4)}, ("x",))
    assert got["x"].tolist() == [0, 1, 2, 3]


def test_the_folder_comes_from_the_environment_or_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(datacache.CACHE_DIR_ENV, str(tmp_path))
    assert datacache.cache_dir() == tmp_path
    monkeypatch.delenv(datacache.CACHE_DIR_ENV)
    assert datacache.cache_dir() == Path(os.path.expanduser("~/.cache/fed-deq"))


def test_the_test_session_never_writes_to_the_users_cache():
    # tests/conftest.py points every test (and the processes they start) at a folder of the session
    assert Path(os.environ[datacache.CACHE_DIR_ENV]) != Path(os.path.expanduser("~/.cache/fed-deq"))


def _generate_slowly(log: str) -> dict:
    """A generator that notes each call in ``log`` and takes long enough for the other callers to arrive."""
    import time

    with open(log, "a", encoding="utf-8") as handle:
        handle.write("generated\n")
    time.sleep(0.5)
    return {"x": np.arange(6.0)}


def _ask_for_the_dataset(folder: str, log: str, start) -> list:
    """In a child process: wait for the start signal, then ask the cache for one dataset."""
    os.environ[datacache.CACHE_DIR_ENV] = folder
    start.wait(30)
    return datacache.cached_arrays("slow", {"n": 6}, lambda: _generate_slowly(log), ("x",))["x"].tolist()


def test_processes_asking_at_once_generate_a_missing_dataset_once(cache):
    import multiprocessing

    log = cache.parent / "calls.log"
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Event()
    with context.Pool(3) as pool:
        pending = [pool.apply_async(_ask_for_the_dataset, (str(cache), str(log), start)) for _ in range(3)]
        start.set()
        answers = [p.get(timeout=120) for p in pending]
    assert answers == [list(np.arange(6.0))] * 3
    assert log.read_text().splitlines() == ["generated"]  # one process generated, the two others read its file

