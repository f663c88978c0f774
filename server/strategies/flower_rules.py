"""Flower's robust aggregation rules as fusers of fed-deq's round driver (composition, not inheritance).

The driver screens replies and keeps the clock; for ``fedmedian``, ``fedtrimmedavg`` and ``krum`` it hands
the accepted models to Flower's own strategy, wrapped in Messages that carry the server-known sample
counts (never the client's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.constants import DEFAULT_TTL
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy

from fed_deq.rounds import Arrays, Fuser
from fed_deq.scenario import Scenario
from wire.records import from_array_record, to_array_record

#: Federated evaluation is off: fed-deq evaluates centrally, at every tier's budget.
_COMMON = {"fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}


#: The core's rules with ``adapter="flower"`` (fed_deq/rules.py) → Flower's strategy, from the fusion section.
FLOWER_STRATEGIES: Mapping[str, Callable[[Any], Strategy]] = MappingProxyType({
    "fedmedian": lambda f: FedMedian(**_COMMON),                                      # Yin et al. 2018
    "fedtrimmedavg": lambda f: FedTrimmedAvg(beta=f.trim_beta, **_COMMON),            # Yin et al. 2018
    "krum": lambda f: Krum(num_malicious_nodes=f.krum_malicious, **_COMMON),          # Blanchard et al. 2017
})


#: Flower's warning when a strategy is built with ``fraction_evaluate=0`` — on purpose here (see ``_COMMON``).
_EVALUATION_OFF_NOTICE = "Federated evaluation will be skipped"


def _drop_evaluation_notice(record: logging.LogRecord) -> bool:
    return _EVALUATION_OFF_NOTICE not in record.getMessage()


def flower_strategy(scenario: Scenario) -> Strategy | None:
    """Flower's strategy for a robust ``fusion.rule``, configured from the scenario; None for fed-deq's rules.

    Built without Flower's warning that federated evaluation is off, which every run would print otherwise."""
    make = FLOWER_STRATEGIES.get(scenario.fusion.rule)
    if make is None:
        return None
    logger = logging.getLogger("flwr")
    logger.addFilter(_drop_evaluation_notice)
    try:
        return make(scenario.fusion)
    finally:
        logger.removeFilter(_drop_evaluation_notice)


def robust_fuser(scenario: Scenario) -> Fuser | None:
    """The driver's fuser for a robust rule (Flower's ``aggregate_train``), or None for fed-deq's own rules."""
    strategy = flower_strategy(scenario)
    if strategy is None:
        return None

    def fuse(server_round: int, reference: Arrays, arrays: list[Arrays], sizes: np.ndarray) -> Arrays:
        messages = [_as_reply(a, n, node) for node, (a, n) in enumerate(zip(arrays, sizes), start=1)]
        fused, _ = strategy.aggregate_train(server_round, messages)
        if fused is None:
            raise ValueError(f"{type(strategy).__name__} returned no model")
        return {key: from_array_record(fused)[key].astype(ref.dtype, copy=False) for key, ref in reference.items()}

    return fuse


def _as_reply(arrays: Arrays, num_examples: float, node: int) -> Message:
    """A screened model as the reply Message Flower's strategies aggregate."""
    content = RecordDict({"arrays": to_array_record(arrays),
                          "metrics": MetricRecord({"num-examples": float(num_examples)})})
    # Explicit metadata: outside a running ServerApp (the bare loop) there is no task identity to borrow.
    metadata = Metadata(run_id=0, message_id=f"fused-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=DEFAULT_TTL,
                        message_type=MessageType.TRAIN, src_task_id=0, dst_task_id=0)
    return Message(content=content, metadata=metadata)


__all__ = ["flower_strategy", "robust_fuser"]
