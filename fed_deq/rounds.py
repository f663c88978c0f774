"""One federated round on the server side, without Flower: screen replies, pick fusion weights, keep the clock.

The Flower strategies in ``server/`` convert Messages into :class:`Reply` objects, call these functions,
and convert the result back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fed_deq import fleet, fusion

Arrays = dict[str, np.ndarray]

#: Metrics every training reply must carry; anything missing is rejected before it reaches the fusion.
REQUIRED_METRICS = (
    "num-examples", "local-steps", "forward-iterations", "backward-iterations", "budget-share",
    "rel-residual", "val-accuracy", "sim-time-s", "server-round", "partition-id",
)


@dataclass(frozen=True)
class Reply:
    """A client's answer to a training message, as plain data."""

    node_id: int
    partition_id: int | None
    arrays: Arrays | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None


@dataclass
class RoundReport:
    """Who took part in a round and what happened to each reply (keys are partition ids)."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    unavailable: int = 0
    dropped: dict[int, str] = field(default_factory=dict)      # straggler or dropped out
    rejected: dict[int, str] = field(default_factory=dict)     # invalid reply
    failed: dict[int, str] = field(default_factory=dict)       # client raised
    accepted: list[int] = field(default_factory=list)
    round_sim_time_s: float = 0.0
    fusion_weights: dict[int, float] = field(default_factory=dict)
    mean_iterations: float | None = None
    mean_rel_residual: float | None = None

    def to_record(self) -> dict:
        """The report's part of a ``metrics.jsonl`` line."""
        return {
            "clients_sampled": len(self.sampled),
            "clients_completed": len(self.accepted),
            "clients_dropped": len(self.dropped),
            "clients_rejected": len(self.rejected),
            "clients_failed": len(self.failed),
            "clients_unavailable": self.unavailable,
            "round_sim_time_s": self.round_sim_time_s,
            "mean_iterations": self.mean_iterations,
            "mean_rel_residual": self.mean_rel_residual,
            "fusion_weights": {str(k): v for k, v in sorted(self.fusion_weights.items())},
            "dropped": {str(k): v for k, v in sorted(self.dropped.items())},
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "failed": {str(k): v for k, v in sorted(self.failed.items())},
        }


def _label(reply: Reply) -> int:
    """Partition id when known, else the node id (a reply that failed before saying who it is)."""
    return reply.partition_id if reply.partition_id is not None else reply.node_id


def screen_replies(
    replies: list[Reply],
    report: RoundReport,
    *,
    reference: Arrays,
    deadline_s: float,
    max_norm_ratio: float,
) -> list[Reply]:
    """Sort replies into failed / rejected / dropped / accepted (recorded in ``report``); return the accepted.

    Order matters: an error reply is a failure; a malformed or stale one is rejected; a well-formed one that
    arrived after the deadline (simulated) is a straggler and dropped; among the rest, an update whose norm is
    far above the round's median is rejected.
    """
    candidates: list[Reply] = []
    for reply in replies:
        label = _label(reply)
        if reply.error is not None:
            report.failed[label] = reply.error
            continue
        reason = fusion.screen_update(reply.arrays or {}, reference, reply.metrics or {}, REQUIRED_METRICS)
        if reason is None and int(reply.metrics["server-round"]) != report.server_round:
            reason = f"late reply from round {int(reply.metrics['server-round'])}"
        if reason is not None:
            report.rejected[label] = reason
        elif reply.metrics["sim-time-s"] > deadline_s:
            report.dropped[label] = f"straggler: {reply.metrics['sim-time-s']:.2f}s > deadline {deadline_s:g}s"
        else:
            candidates.append(reply)
    norms = np.array([fusion.update_norm(r.arrays, reference) for r in candidates])
    outliers = fusion.norm_outliers(norms, max_norm_ratio) if len(candidates) else np.zeros(0, bool)
    accepted = []
    for reply, norm, outlier in zip(candidates, norms, outliers):
        if outlier:
            report.rejected[_label(reply)] = f"update norm {norm:.3g} > {max_norm_ratio:g}x round median"
        else:
            accepted.append(reply)
    report.accepted = sorted(_label(r) for r in accepted)
    return sorted(accepted, key=_label)


def close_round(report: RoundReport, accepted: list[Reply], deadline_s: float) -> None:
    """Fill the simulated round time and the solver statistics of the accepted replies."""
    # A client that dropped out or straggled keeps the server waiting until the deadline.
    times = [r.metrics["sim-time-s"] for r in accepted] + [math.inf] * len(report.dropped)
    _, report.round_sim_time_s = fleet.round_time(times, deadline_s)
    if accepted:
        iters = [r.metrics["forward-iterations"] + r.metrics["backward-iterations"] for r in accepted]
        report.mean_iterations = float(np.mean(iters))
        residuals = [r.metrics["rel-residual"] for r in accepted if math.isfinite(r.metrics["rel-residual"])]
        report.mean_rel_residual = float(np.mean(residuals)) if residuals else None


def quality_fusion_weights(accepted: list[Reply], *, score: str, size_exponent: float,
                           quality_exponent: float, beta: float, floor: float) -> np.ndarray:
    """Quality-weighted fusion weights w_k ∝ n_k^a · max(q_k, ε)^b for the accepted replies."""
    metrics = [r.metrics for r in accepted]
    scores = fusion.quality_scores(
        score,
        budget_share=np.array([m["budget-share"] for m in metrics]),
        rel_residual=np.array([m["rel-residual"] for m in metrics]),
        val_accuracy=np.array([m["val-accuracy"] for m in metrics]),
        beta=beta,
    )
    sizes = np.array([m["num-examples"] for m in metrics])
    return fusion.quality_weights(sizes, scores, size_exponent=size_exponent,
                                  quality_exponent=quality_exponent, floor=floor)
