"""The ServerApp's body: discover the fleet, run the rounds with the scenario's strategy, record them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fed_deq import fleet
from fed_deq.recorder import RunRecorder
from fed_deq.scenario import Scenario, dump_scenario
from fed_deq.workload import model_arrays
from server.records import from_array_record, to_array_record
from server.strategies import FleetBinding, build_strategy

log = logging.getLogger("fed_deq.server")


def wait_for_nodes(grid: Grid, expected: int, wait_s: float) -> list[int]:
    """Node ids once ``expected`` nodes are connected, or whoever is there after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected or time.monotonic() >= deadline:
            return node_ids
        time.sleep(0.2)


def discover_partitions(grid: Grid, expected: int, timeout_s: float, wait_s: float = 120.0) -> dict[int, int]:
    """Ask every connected node which partition it serves; node ids are random, partitions are not."""
    node_ids = wait_for_nodes(grid, expected, wait_s)
    if len(node_ids) < expected:
        log.warning("only %d of %d nodes connected after %.0fs; going on with them", len(node_ids), expected, wait_s)
    queries = [Message(RecordDict({"config": ConfigRecord({"ask": "partition"})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in node_ids]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        if reply.has_error():
            log.warning("node %s did not describe itself: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content["metrics"]["partition-id"])
        if 0 <= pid < expected:
            partitions[reply.metadata.src_node_id] = pid
    return partitions


def run_federation(grid: Grid, scenario: Scenario, out_dir: str | Path, *, name: str = "scenario",
                   progress: bool = False, timeout_s: float = 3600.0) -> dict:
    """Run every round of the scenario on ``grid`` and write the run's files to ``out_dir``."""
    devices = fleet.build_fleet(scenario)
    partitions = discover_partitions(grid, len(devices), timeout_s)
    strategy = build_strategy(scenario)
    strategy.bind(FleetBinding(scenario=scenario, scenario_text=dump_scenario(scenario), devices=devices,
                               partitions=partitions))
    with RunRecorder(scenario, out_dir, name=name, progress=progress) as recorder:
        initial = model_arrays(recorder.model)

        def evaluate(server_round: int, arrays) -> MetricRecord:
            numpy_arrays = from_array_record(arrays)
            if server_round == 0:
                result = recorder.initial_model(numpy_arrays)
            else:
                result = recorder.record_round(server_round, numpy_arrays, strategy.reports.get(server_round))
            return MetricRecord({"accuracy": float(result["accuracy"])})

        strategy.start(grid=grid, initial_arrays=to_array_record(initial), num_rounds=scenario.training.rounds,
                       timeout=timeout_s, evaluate_fn=evaluate)
        summary = recorder.finish()
        summary["nodes_discovered"] = len(partitions)
    return summary
