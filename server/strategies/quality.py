"""Quality-weighted fusion: w_k ∝ n_k^a · max(q_k, ε)^b, with q_k from a pluggable model-quality score."""

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fed_deq import fusion
from fed_deq.rounds import Reply, quality_fusion_weights
from server.records import to_array_record
from server.strategies.fleet import FleetMixin


class QualityFedAvg(FleetMixin, FedAvg):
    """FedAvg whose weights also reward converged, accurate client models (fed-deq's own rule)."""

    def fuse(self, server_round: int, accepted: list[Reply],
             messages: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, dict[int, float]]:
        """Average the accepted models with quality weights; metrics as Flower averages them."""
        f = self.binding.scenario.fusion
        weights = quality_fusion_weights(accepted, score=f.score, size_exponent=f.size_exponent,
                                         quality_exponent=f.quality_exponent, beta=f.beta, floor=f.floor)
        arrays = fusion.weighted_average([r.arrays for r in accepted], weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in messages], self.weighted_by_key)
        return to_array_record(arrays), metrics, {r.partition_id: float(w) for r, w in zip(accepted, weights)}
