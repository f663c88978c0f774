"""FedNova (Wang et al. 2020): normalised averaging that removes the bias of unequal local step counts."""

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fed_deq import fusion
from fed_deq.rounds import Reply
from server.records import to_array_record
from server.strategies.fleet import FleetMixin


class FedNova(FleetMixin, FedAvg):
    """x⁺ = x − (Σ_j p_j τ_j) Σ_i p_i Δ_i / τ_i, with τ_i the client's local SGD steps."""

    def fuse(self, server_round: int, accepted: list[Reply],
             messages: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, dict[int, float]]:
        """Normalise each client's update by its step count before averaging."""
        sizes = np.array([r.metrics["num-examples"] for r in accepted])
        steps = np.array([max(r.metrics["local-steps"], 1.0) for r in accepted])
        arrays = fusion.fednova_aggregate(self._reference, [r.arrays for r in accepted], sizes, steps)
        metrics = self.train_metrics_aggr_fn([m.content for m in messages], self.weighted_by_key)
        p = sizes / sizes.sum()
        return to_array_record(arrays), metrics, {r.partition_id: float(w) for r, w in zip(accepted, p)}
