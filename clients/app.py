"""Flower ClientApp of fed-deq: a device training a compact DEQ within its solver-iteration budget."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_deq import adversary
from fed_deq.scenario import parse_scenario_text
from fed_deq.workload import run_client_round
from wire.messages import read_train_request
from wire.records import from_array_record, to_array_record

app = ClientApp()

_WARM_KEY = "warm-start"


def _partition_id(context: Context) -> int:
    """This node's partition (set by the simulation engine, or by `--node-config` in deployment)."""
    return int(context.node_config["partition-id"])


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which partition (and tier, if pinned) this node serves."""
    tier = str(context.node_config.get("tier", ""))
    content = RecordDict({"metrics": MetricRecord({"partition-id": _partition_id(context)}),
                          "config": ConfigRecord({"tier": tier})})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train within the budget the server assigned; keep per-sample fixed points in node state (warm start).

    A partition the scenario makes an adversary misbehaves as its attack says (fed_deq/adversary.py).
    """
    request = read_train_request(msg.content["config"])
    scenario = parse_scenario_text(request.scenario_text)
    partition_id = _partition_id(context)
    attack = adversary.attack_of(scenario, partition_id)
    if attack == "silent":
        # Never answer: hold the reply past the server's round timeout, then give up.
        time.sleep(scenario.simulation.round_timeout_s + 1.0)
        raise adversary.AdversaryCrash("silent client gave up")
    warm = context.state.array_records.get(_WARM_KEY)
    tier = str(context.node_config.get("tier", "")) or None
    result = run_client_round(
        scenario, partition_id, request.server_round, from_array_record(msg.content["arrays"]),
        budget=request.budget, tier=tier, warm_start=warm["z"].numpy() if warm is not None else None,
        proximal_mu=request.proximal_mu, attack=attack,
    )
    if result.warm_start.size:
        context.state[_WARM_KEY] = to_array_record({"z": result.warm_start})
    content = RecordDict({"arrays": to_array_record(result.arrays), "metrics": MetricRecord(result.metrics)})
    return Message(content, reply_to=msg)
