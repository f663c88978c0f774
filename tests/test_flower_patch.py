"""Changes to Flower's behaviour stay inside the run: the single-pass dispatcher (which delivers what Flower's own
loop delivers) and the quieter logging are in place only within their ``with`` blocks.

No Ray here: each dispatcher runs in a thread against Flower's in-memory LinkState, a queue and a stop event
that ends the loop after a fixed number of sweeps (so nothing depends on timing).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from queue import Empty, Queue

import pytest

from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log as flwr_log
from flwr.common.logger import warn_deprecated_feature
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from tools.flower_patch import QUEUE_WAIT_S, PromptQueue, is_known_state, single_pass_dispatch, single_pass_loop
from tools.simulate import quiet_flower

RUN_ID, TASK_ID = 4242, 77
NODES = 5            # registered in the LinkState
MAPPED = 3           # the first MAPPED nodes are the simulation's; messages to the others are never delivered
# (label, node index, expired?): several messages to node 0, two to unmapped nodes, one expired to node 1.
PLAN = [("a0", 0, False), ("a1", 0, False), ("a2", 0, False), ("b0", 1, True), ("b1", 1, False),
        ("c0", 2, False), ("u3", 3, False), ("u4", 4, False), ("a3", 0, False)]


class StopAfter(threading.Event):
    """A stop event that sets itself after ``sweeps`` loop turns; its waits return at once."""

    def __init__(self, sweeps: int) -> None:
        super().__init__()
        self.turns_left = sweeps

    def is_set(self) -> bool:
        if self.turns_left <= 0:
            self.set()
        self.turns_left -= 1
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(0)


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's Message() reads the process's run id; give it the test's run (restored afterwards)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", TASK_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def linkstate_with_messages():
    """A fresh in-memory LinkState as run_simulation builds it, holding PLAN's messages; and the node mapping."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = TASK_ID
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    mapping = vce_api._register_nodes(num_nodes=NODES, state_factory=factory)
    node_ids = list(mapping)
    for label, index, expired in PLAN:
        message = Message(RecordDict(), dst_node_id=node_ids[index], message_type=MessageType.TRAIN, ttl=600)
        message.metadata.__dict__["_message_id"] = label  # as InMemoryGrid.push_messages does, but readable
        assert state.store_message_ins(message) == label
        if expired:
            message.metadata.created_at -= 3600  # stored while valid, expired by the time it is dispatched
    return state, {node: pid for node, pid in mapping.items() if pid < MAPPED}


def delivered(loop, sweeps: int) -> Counter:
    """Message ids ``loop`` puts in the queue in ``sweeps`` sweeps over a fresh LinkState."""
    state, mapping = linkstate_with_messages()
    queue: Queue = Queue()
    thread = threading.Thread(target=loop, args=(state, queue, mapping, StopAfter(sweeps)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the dispatcher did not stop"
    ids = Counter()
    while True:
        try:
            ids[queue.get_nowait().metadata.message_id] += 1
        except Empty:
            return ids


@pytest.mark.parametrize("sweeps", [1, 2, 3, 6])
def test_single_pass_delivers_what_flowers_loop_delivers(task_identity, sweeps):
    flower_loop = vce_api.add_messages_to_queue
    ours = delivered(single_pass_loop(flower_loop), sweeps)
    assert ours == delivered(flower_loop, sweeps)
    assert not {"b0", "u3", "u4"} & set(ours)  # expired and unmapped: never delivered
    assert max(ours.values()) == 1
    assert ours["a0"] == 1 and (sweeps >= 4) == (ours["a3"] == 1)  # one per node per sweep, in stored order


def test_context_manager_installs_and_restores_flowers_loop():
    original = vce_api.add_messages_to_queue
    with single_pass_dispatch() as installed:
        assert installed and vce_api.add_messages_to_queue.single_pass
        assert vce_api.Queue is PromptQueue  # the engine's queues, created inside the run
        with single_pass_dispatch() as nested:  # an inner block leaves the outer one's replacement alone
            assert not nested
        assert vce_api.add_messages_to_queue.single_pass
    assert vce_api.add_messages_to_queue is original and vce_api.Queue is Queue
    with pytest.raises(RuntimeError), single_pass_dispatch():
        raise RuntimeError("a run that fails")
    assert vce_api.add_messages_to_queue is original and vce_api.Queue is Queue


def test_a_prompt_queue_caps_timed_waits_and_leaves_the_others(monkeypatch):
    asked = []
    monkeypatch.setattr(Queue, "get", lambda self, block=True, timeout=None: asked.append((block, timeout)))
    queue = PromptQueue()
    queue.get(timeout=1.0)          # Flower's worker threads: a second, capped
    queue.get(timeout=0.01)         # shorter waits stay as they are
    queue.get()                     # an untimed wait stays untimed
    queue.get(False)
    assert asked == [(True, QUEUE_WAIT_S), (True, 0.01), (True, None), (False, None)]


def test_a_prompt_queue_still_delivers_what_is_put():
    queue = PromptQueue()
    queue.put("reply")
    assert queue.get(timeout=1.0) == "reply"
    with pytest.raises(Empty):
        queue.get(timeout=1.0)


def test_a_state_with_a_plain_lock_keeps_flowers_loop(task_identity):
    state, mapping = linkstate_with_messages()
    assert is_known_state(state)
    state.lock = threading.Lock()  # _check_stored_messages would deadlock under this lock taken twice
    assert not is_known_state(state)
    calls = []
    loop = single_pass_loop(lambda *args: calls.append(args))
    stop = StopAfter(1)
    loop(state, Queue(), mapping, stop)
    assert calls == [(state, calls[0][1], mapping, stop)]


class Collect(logging.Handler):
    """Keeps the messages of the records it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_flower_drops_only_the_deprecation_notice_and_restores_logging():
    flwr_logger, ray_logger = logging.getLogger("flwr"), logging.getLogger("ray")
    before = (flwr_logger.level, ray_logger.level, list(flwr_logger.filters), list(warnings.filters))
    collect = Collect()
    flwr_logger.addHandler(collect)
    try:
        with quiet_flower():
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed ...")
            flwr_log(logging.WARNING, "a real problem")
            flwr_log(logging.INFO, "[ROUND 1/3]")
            assert ray_logger.level > logging.INFO
        assert collect.messages == ["a real problem"]
        assert (flwr_logger.level, ray_logger.level, flwr_logger.filters, warnings.filters) == before
    finally:
        flwr_logger.removeHandler(collect)
