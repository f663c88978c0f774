"""An in-process Flower Grid for fast, Ray-free tests of the ServerApp and ClientApp together.

It delivers each message to a real ``ClientApp`` call in this process, keeps per-node state like the
simulation engine does, and lets a test tamper with replies (raise, corrupt, delay) per partition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message]


class FakeGrid(Grid):
    """Nodes with shuffled random-looking ids, each serving one partition through ``client_app``."""

    def __init__(self, client_app, num_nodes: int, *, seed: int = 0, node_config_extra: dict | None = None,
                 tamper: Tamper | None = None, raise_for: Iterable[int] = ()):
        # The Flower runtime sets who "this process" is before a ServerApp builds Messages; so do we.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        rng = np.random.default_rng(seed)
        ids = [int(x) for x in rng.choice(2**40, size=num_nodes, replace=False)]
        self.client_app = client_app
        self.partition_of = {node: pid for pid, node in enumerate(ids)}
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": pid, "num-partitions": num_nodes,
                                       **(node_config_extra or {})})
            for node, pid in self.partition_of.items()
        }
        self.tamper = tamper
        self.raise_for = set(raise_for)
        self.offline: set[int] = set()
        self.sent: list[Message] = []

    # The Grid interface -------------------------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: D102 - Grid interface
        self._run = run

    @property
    def run(self):  # noqa: D102 - Grid interface
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return [n for n in self.partition_of if n not in self.offline]

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError("FakeGrid only supports send_and_receive")

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError("FakeGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message now and return the replies (error replies for raising clients)."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            pid = self.partition_of[node]
            try:
                if pid in self.raise_for and msg.metadata.message_type == "train":
                    raise RuntimeError(f"client {pid} crashed")
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - mirrors how Flower turns a ClientApp exception into an error reply
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
                continue
            if self.tamper is not None and msg.metadata.message_type == "train":
                reply = self.tamper(pid, reply)
            replies.append(reply)
        return replies
