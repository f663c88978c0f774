"""The train message both adapters agree on: what the server puts in it and how a client reads it back."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fed_deq.fleet import Budget
from fed_deq.rounds import Instruction

# Wire names of the train config's fields.
SERVER_ROUND = "server-round"
SCENARIO = "scenario"
BUDGET_FORWARD = "budget-forward"
BUDGET_BACKWARD = "budget-backward"
PROXIMAL_MU = "proximal-mu"


@dataclass(frozen=True)
class TrainRequest:
    """A train message as the client reads it."""

    server_round: int
    scenario_text: str
    budget: Budget
    proximal_mu: float


def train_message(server_round: int, instruction: Instruction, arrays: ArrayRecord, node_id: int,
                  scenario_text: str) -> Message:
    """One client's train message, with its own RecordDict (Flower would share one across messages otherwise)."""
    config = ConfigRecord({SERVER_ROUND: server_round, SCENARIO: scenario_text,
                           BUDGET_FORWARD: instruction.budget.forward, BUDGET_BACKWARD: instruction.budget.backward,
                           PROXIMAL_MU: instruction.proximal_mu})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def read_train_request(config: ConfigRecord) -> TrainRequest:
    """The fields of a train message's config record."""
    return TrainRequest(server_round=int(config[SERVER_ROUND]), scenario_text=str(config[SCENARIO]),
                        budget=Budget(forward=int(config[BUDGET_FORWARD]), backward=int(config[BUDGET_BACKWARD])),
                        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)))
