"""A scenario on a real two-node Ray cluster: a head and a second node started on this machine.

The cluster is Ray's own test cluster (``ray.cluster_utils.Cluster``: each node a raylet with its own CPUs, the
head with the GCS), reached by `fed-deq simulate` through ``simulation.ray_address`` as a remote cluster would
be. Its files (sockets, logs, and the address file through which a plain ``ray.init()`` would join it) go to
a private temp dir, so no other run on this machine joins it by accident. Which node ran which client call is read from
the task events its GCS keeps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_SCENARIO

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
CLIENTS, ROUNDS = 6, 2  # TINY_SCENARIO's fleet and rounds; every client trains each round


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker node of 1 CPU each; yields (cluster, [head node id, worker node id])."""
    from ray.cluster_utils import Cluster

    # Short: Ray's socket paths under it must stay below the 107 characters of a Unix socket address.
    private = tempfile.mkdtemp(prefix="fdq-ray-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = private  # the nodes and the simulate subprocess inherit it
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, [cluster.head_node.node_id, worker.node_id]
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(private, ignore_errors=True)


def client_calls_by_node(cluster) -> dict[str, int]:
    """How many ClientApp calls (Flower's ``ClientAppActor.run`` actor tasks) each node ran, from the GCS's
    task events (the state API would need Ray's dashboard, which the minimal install lacks)."""
    from ray.core.generated import gcs_pb2

    names: dict[bytes, str] = {}
    nodes: dict[bytes, str] = {}
    for raw in cluster.global_state._connect_and_get_accessor().get_task_events():
        event = gcs_pb2.TaskEvents.FromString(raw)
        if event.task_info.name:
            names[event.task_id] = event.task_info.name
        if event.state_updates.node_id:
            nodes[event.task_id] = event.state_updates.node_id.hex()
    counts: dict[str, int] = {}
    for task, node in nodes.items():
        if names.get(task) == "ClientAppActor.run":
            counts[node] = counts.get(node, 0) + 1
    return counts


def live_client_actors(cluster) -> list[str]:
    """Flower client actors the cluster still runs, waiting up to 30 s for those of an ended job to be reaped."""
    deadline = time.monotonic() + 30
    while True:
        alive = [a["ActorID"] for a in cluster.global_state.actor_table(None).values()
                 if a["ActorClassName"] == "ClientAppActor" and a["State"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_a_scenario_runs_on_both_nodes_of_a_ray_cluster(two_node_cluster, tmp_path):
    cluster, node_ids = two_node_cluster
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY_SCENARIO)
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "fed-deq"), "simulate", str(scenario), "--out", str(out),
               "--no-progress", "--set", f"simulation.ray_address={cluster.address}",
               "--set", f"training.clients_per_round={CLIENTS}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["nodes_discovered"] == CLIENTS
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_completed"] for m in metrics] == [CLIENTS] * ROUNDS
    # Client work ran on both nodes: each node's client actor ran ClientApp calls. (A call's events reach the
    # GCS within a second or so; the first round's have, whatever the last ones' fate when the run ended.)
    calls = client_calls_by_node(cluster)
    assert set(calls) == set(node_ids), calls
    # The run leaves the cluster as it found it: both nodes up, none of its client actors left running.
    assert sorted(n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]) == sorted(node_ids)
    assert live_client_actors(cluster) == []


def test_without_ray_address_a_run_starts_its_own_ray_even_beside_a_cluster(two_node_cluster, tmp_path):
    # RAY_ADDRESS names the running cluster, as `ray start` users often export it: a plain ray.init() would
    # join it (and refuse num_cpus). A scenario without simulation.ray_address must run on a Ray of its own.
    cluster, _ = two_node_cluster
    before = client_calls_by_node(cluster)
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY_SCENARIO)
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "fed-deq"), "simulate", str(scenario), "--out", str(out),
               "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_ADDRESS": cluster.address})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["rounds"] == ROUNDS
    assert client_calls_by_node(cluster) == before  # the cluster ran none of its client calls
