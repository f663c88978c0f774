"""The ServerApp's body: discover the fleet, then drive fed-deq's rounds over a Flower Grid and record them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import flwr
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from fed_deq.recorder import RunRecorder
from fed_deq.rounds import OpenRound, Reply, RoundDriver, run_rounds
from fed_deq.scenario import Scenario, dump_scenario
from server.records import to_reply
from server.strategies import robust_fuser
from wire.messages import train_message
from wire.records import to_array_record

log = logging.getLogger("fed_deq.server")
#: Pause between the server's looks for replies in a simulation (Flower's in-memory Grid: 0.1 s, a mean 50 ms
#: lost per round); a look costs one dictionary read per message still waited for.
PULL_INTERVAL_S = 0.02


def wait_for_nodes(grid: Grid, expected: int, wait_s: float, stop: threading.Event | None = None) -> list[int]:
    """Node ids once ``expected`` nodes are connected, or whoever is there after ``wait_s`` seconds (or a stop)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected or time.monotonic() >= deadline or stop.wait(0.2):
            return node_ids


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout_s: float,
                     stop: threading.Event | None = None) -> list[Message]:
    """``grid.send_and_receive``, except that it gives up once ``stop`` is set, returning the replies so far.

    Flower's own waits out its whole timeout, which kept an interrupted simulation alive; without a stop event
    it is used as is (a deployment's Grid polls at its own pace).
    """
    if stop is None:
        return list(grid.send_and_receive(messages, timeout=timeout_s))
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while waiting and not stop.is_set():
        arrived = list(grid.pull_messages(waiting))
        replies.extend(arrived)
        waiting -= {m.metadata.reply_to_message_id for m in arrived}
        if not waiting or time.monotonic() >= deadline:
            break
        stop.wait(PULL_INTERVAL_S)
    return replies


def discover_partitions(grid: Grid, expected: int, timeout_s: float, wait_s: float = 120.0,
                        stop: threading.Event | None = None) -> tuple[dict[int, int], dict[int, str]]:
    """Which partition each connected node serves; node ids are random, partitions are not.

    Returns (node id → partition id, node id → why its answer was refused). Every node is asked, except on
    Flower's simulation engine, whose map follows from the order it registered its nodes in
    (``registration_order_map``) and is confirmed by asking ``CONFIRM_NODES`` nodes spread over that order (a
    query per node took 40 s for 10,000 simulated nodes). If a confirming node disagrees, every node is asked.
    A reply without a readable partition id in range is refused; so is every node that claims a partition
    another node claims too (keeping one of them would let whoever answers first take a partition over).
    """
    node_ids = wait_for_nodes(grid, expected, wait_s, stop)
    if len(node_ids) < expected:
        log.warning("only %d of %d nodes connected after %.0fs; going on with them", len(node_ids), expected, wait_s)
    ordered = registration_order_map(grid, node_ids, expected)
    if ordered is not None and _confirmed(grid, ordered, timeout_s, stop):
        return ordered, {}
    claims, refused = _ask_partitions(grid, node_ids, expected, timeout_s, stop)
    partitions = _unique_claims(claims, refused)
    for node, reason in sorted(refused.items()):
        log.warning("discovery: node %s refused: %s", node, reason)
    return partitions, refused


def _confirmed(grid: Grid, ordered: dict[int, int], timeout_s: float, stop: threading.Event | None) -> bool:
    """Whether ``CONFIRM_NODES`` nodes spread over ``ordered`` (node → partition) all claim its partition."""
    size = len(ordered)
    ranks = sorted({round(i * (size - 1) / (CONFIRM_NODES - 1)) for i in range(CONFIRM_NODES)})
    by_rank = {pid: node for node, pid in ordered.items()}
    claims, refused = _ask_partitions(grid, [by_rank[r] for r in ranks], size, timeout_s, stop)
    wrong = sorted(set(claims.items()) - set(ordered.items()))
    if refused or wrong or len(claims) < len(ranks):
        log.warning("discovery: the registration order is not confirmed (refused: %s; other claims: %s; "
                    "%d of %d answered); asking every node", refused, wrong[:3], len(claims), len(ranks))
        return False
    log.info("discovery: %d nodes mapped in registration order, %d of them confirmed", size, len(claims))
    return True


#: Nodes asked to confirm a map taken from the simulation engine's registration order.
CONFIRM_NODES = 16
#: Flower releases whose simulation engine gives the i-th node it registers partition i (``vce_api._register_nodes``).
ENGINE_SERIES = "1.42."


def registration_order_map(grid: Grid, node_ids: list[int], expected: int) -> dict[int, int] | None:
    """node id → partition id as Flower's simulation engine assigned them, or None if this grid is not its.

    The engine registers its ``num_supernodes`` nodes one after another and gives the i-th partition i; its
    in-memory LinkState lists nodes in that order, and their registration times must agree. Any other grid
    (a deployment's, a test's), another Flower release, or a fleet other than the ``expected`` nodes: None.
    """
    state = getattr(grid, "state", None)
    if not flwr.__version__.startswith(ENGINE_SERIES) or not callable(getattr(state, "get_node_info", None)):
        return None
    connected = set(node_ids)
    infos = [info for info in state.get_node_info() if info.node_id in connected]
    stamps = [info.registered_at for info in infos]
    if len(infos) != expected or len(connected) != expected or not _non_decreasing(stamps):
        return None
    return {int(info.node_id): pid for pid, info in enumerate(infos)}


def _non_decreasing(stamps: list[str]) -> bool:
    """ISO timestamps (all present) in non-decreasing order."""
    try:
        times = [datetime.fromisoformat(stamp) for stamp in stamps]
    except (TypeError, ValueError):
        return False
    return all(a <= b for a, b in zip(times, times[1:]))


def _ask_partitions(grid: Grid, node_ids: list[int], expected: int, timeout_s: float,
                    stop: threading.Event | None) -> tuple[dict[int, int], dict[int, str]]:
    """Ask ``node_ids`` which partition they serve: (node → claimed partition, node → why refused)."""
    queries = [Message(RecordDict({"config": ConfigRecord({"ask": "partition"})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in node_ids]
    claims: dict[int, int] = {}
    refused: dict[int, str] = {}
    for reply in send_and_receive(grid, queries, timeout_s, stop):
        node = reply.metadata.src_node_id
        try:
            claims[node] = _claimed_partition(reply, expected)
        except ValueError as exc:
            refused[node] = str(exc)
    return claims, refused


def _unique_claims(claims: dict[int, int], refused: dict[int, str]) -> dict[int, int]:
    """The claims no other node makes too; every node of a shared claim is added to ``refused``."""
    by_partition: dict[int, list[int]] = {}
    for node, pid in claims.items():
        by_partition.setdefault(pid, []).append(node)
    partitions = {}
    for pid, nodes in by_partition.items():
        if len(nodes) == 1:
            partitions[nodes[0]] = pid
        else:
            for node in nodes:
                refused[node] = f"partition {pid} claimed by {len(nodes)} nodes"
    return partitions


def _claimed_partition(reply: Message, expected: int) -> int:
    """The partition id a discovery reply claims, or ValueError naming what is wrong with it."""
    if reply.has_error():
        raise ValueError(f"did not describe itself: {reply.error.reason}")
    try:
        value = reply.content["metrics"]["partition-id"]
    except Exception:  # noqa: BLE001 - any malformed content means the same thing
        raise ValueError("discovery reply without a partition-id") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"partition-id {value!r} is not an integer")
    if not 0 <= int(value) < expected:
        raise ValueError(f"partition-id {int(value)} outside the fleet of {expected}")
    return int(value)


def flower_exchange(grid: Grid, partitions: dict[int, int], scenario_text: str, timeout_s: float,
                    rounds: int, stop: threading.Event | None = None):
    """The run loop's exchange over a Flower Grid: one message per instruction, replies back as Reply."""
    nodes = {pid: node for node, pid in partitions.items()}

    def exchange(open_round: OpenRound) -> tuple[list[Reply], list[int]]:
        # Flower's own round banner, for users who follow a run with `flwr run --stream`.
        flwr_log(logging.INFO, "[ROUND %s/%s]", open_round.server_round, rounds)
        live = set(grid.get_node_ids())
        arrays = to_array_record(open_round.reference)
        offline = [pid for pid in open_round.instructions if nodes.get(pid) not in live]
        messages = [train_message(open_round.server_round, instruction, arrays, nodes[pid], scenario_text)
                    for pid, instruction in open_round.instructions.items() if pid not in offline]
        replies = send_and_receive(grid, messages, timeout_s, stop)
        # The Grid filled in the ids of what it sent; an error reply for a dead node comes from the SuperLink
        # itself, so only the message it answers tells whose it is.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return [to_reply(m, partitions, sent_to) for m in replies], offline

    return exchange


def run_federation(grid: Grid, scenario: Scenario, out_dir: str | Path, *, name: str = "scenario",
                   progress: bool = False, timeout_s: float = 3600.0, stop: threading.Event | None = None,
                   tensorboard: bool = False) -> dict:
    """Run every round of the scenario on ``grid`` and write the run's files to ``out_dir``.

    Setting ``stop`` ends the run early: the rounds finished by then are kept and the summary says
    ``"interrupted": true``.
    """
    driver = RoundDriver(scenario, robust_fuser=robust_fuser(scenario))
    with RunRecorder(scenario, out_dir, name=name, progress=progress, tensorboard=tensorboard) as recorder:
        # The starting model is evaluated first, while the clients may still be starting (discovery waits
        # for them): a 20,000-sample test set takes seconds.
        recorder.evaluate_initial(driver.initial_arrays())
        partitions, refused = discover_partitions(grid, len(driver.devices), timeout_s, stop=stop)
        exchange = flower_exchange(grid, partitions, dump_scenario(scenario), timeout_s, scenario.training.rounds,
                                   stop)
        run_rounds(driver, recorder, exchange, stop.is_set if stop else None)
        summary = recorder.finish(extra={"nodes_discovered": len(partitions),
                                         "discovery_refused": {str(k): v for k, v in sorted(refused.items())}},
                                  interrupted=bool(stop and stop.is_set()))
    return summary
