"""What lets a fleet of 10,000 clients start in seconds: partitions computed in one go and node discovery from
the simulation engine's registration order. Each shortcut must give exactly what the slow path gives."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from flwr_datasets import partitioner as flwr_partitioners

from clients.app import app as client_app
from fed_deq import partitions
from server import federation
from tests.fakegrid import FakeGrid


def one_by_one(partitioner, order: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """flwr-datasets' own way: one load_partition per partition."""
    return [np.asarray(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]


def fed(partitioner, labels: np.ndarray, order: np.ndarray):
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    return partitioner


@pytest.mark.parametrize("size, num_partitions", [(1003, 1), (1003, 7), (1003, 10), (1003, 1003), (64, 10)])
def test_iid_split_is_what_flwr_datasets_iid_partitioner_gives(size, num_partitions):
    labels = np.arange(size) % 10
    made, order = partitions._iid_partitioner(flwr_partitioners, num_partitions, size, seed=3)
    expected = one_by_one(fed(made, labels, order), order, num_partitions)
    got = partitions._iid_split(num_partitions, size, seed=3)
    assert [p.tolist() for p in got] == [p.tolist() for p in expected]


@pytest.mark.parametrize("kind, options", [("dirichlet", {"alpha": 0.5, "min_partition_size": 0}),
                                           ("pathological", {"classes_per_client": 2})])
def test_partitions_read_from_the_partitioner_map_equal_one_by_one_loads(kind, options):
    labels = np.random.default_rng(0).integers(0, 10, 997)

    def build():
        made, order = partitions.PARTITION_KINDS[kind].partitioner(
            flwr_partitioners, 20, labels.size, seed=1, partitioner_seed=11, alpha=options.get("alpha"),
            classes_per_client=options.get("classes_per_client"),
            min_partition_size=options.get("min_partition_size", 0))
        return fed(made, labels, order), order

    fast = partitions._load_partitions(*build(), 20)
    slow = one_by_one(*build(), 20)
    assert [p.tolist() for p in fast] == [p.tolist() for p in slow]
    assert sum(p.size for p in fast) == labels.size


def test_labels_key_is_remembered_only_for_labels_nothing_can_change():
    frozen = np.arange(50) % 5
    frozen.setflags(write=False)
    assert partitions._labels_key(frozen) is partitions._labels_key(frozen)
    writable = np.arange(50) % 5
    partitions.partition(writable, 5, kind="pathological", seed=0, classes_per_client=2)
    writable[:] = 0  # the same object with other labels: keyed by what it holds now
    assert partitions._labels_key(writable) == np.zeros(50, dtype=np.int64).tobytes()
    with pytest.raises(partitions.InputError, match=r"classes_per_client: must be an integer in \[1, 1\]"):
        partitions.partition(writable, 5, kind="pathological", seed=0, classes_per_client=2)
    view = frozen[:40]  # read-only, but a view: its base decides what it holds
    assert partitions._labels_key(view) is not partitions._labels_key(view)


# --- discovery --------------------------------------------------------------------------------------------


def with_registration(grid: FakeGrid, order: list[int]) -> FakeGrid:
    """Give ``grid`` an in-memory LinkState whose nodes are listed (and time-stamped) in ``order``."""
    infos = [SimpleNamespace(node_id=node, registered_at=f"2026-11-30T00:00:00.{i:06d}+00:00")
             for i, node in enumerate(order)]
    grid.state = SimpleNamespace(get_node_info=lambda: list(infos))
    return grid


def queries(grid: FakeGrid) -> int:
    return sum(1 for m in grid.sent if m.metadata.message_type == "query")


def test_discovery_takes_the_registration_order_and_asks_only_a_few_nodes():
    grid = FakeGrid(client_app, 40)
    truth = dict(grid.partition_of)
    with_registration(grid, sorted(truth, key=truth.get))
    found, refused = federation.discover_partitions(grid, 40, timeout_s=10)
    assert found == truth and refused == {}
    assert queries(grid) == federation.CONFIRM_NODES


def test_discovery_asks_every_node_when_the_order_disagrees_with_them():
    grid = FakeGrid(client_app, 40)
    truth = dict(grid.partition_of)
    order = sorted(truth, key=truth.get)
    order[0], order[-1] = order[-1], order[0]  # ranks 0 and 39 are among those confirmed
    with_registration(grid, order)
    found, refused = federation.discover_partitions(grid, 40, timeout_s=10)
    assert found == truth and refused == {}
    assert queries(grid) == federation.CONFIRM_NODES + 40


def test_discovery_ignores_an_order_its_registration_times_contradict():
    grid = FakeGrid(client_app, 8)
    truth = dict(grid.partition_of)
    with_registration(grid, sorted(truth, key=truth.get))
    infos = grid.state.get_node_info()
    infos[2].registered_at, infos[3].registered_at = infos[3].registered_at, infos[2].registered_at
    grid.state = SimpleNamespace(get_node_info=lambda: infos)
    assert federation.registration_order_map(grid, list(truth), 8) is None
    found, _ = federation.discover_partitions(grid, 8, timeout_s=10)
    assert found == truth and queries(grid) == 8


def test_a_grid_of_other_nodes_than_expected_is_asked_node_by_node():
    grid = with_registration(FakeGrid(client_app, 6), [])
    assert federation.registration_order_map(grid, list(grid.partition_of), 6) is None
    grid.offline = {next(iter(grid.partition_of))}  # one node gone: the map would name a node not connected
    truth = {n: p for n, p in grid.partition_of.items() if n not in grid.offline}
    with_registration(grid, sorted(grid.partition_of, key=grid.partition_of.get))
    found, _ = federation.discover_partitions(grid, 6, timeout_s=10, wait_s=0.1)
    assert found == truth and queries(grid) == 5
