"""What passes between the round driver (fed_deq/rounds.py) and the adapters that carry a round: the
instruction a client gets, the reply it sends, and the report of what happened to the round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fed_deq import fleet, workload

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Reply:
    """A client's answer to a training instruction, as plain data.

    ``problem`` is set by an adapter that could not even read the reply (the reason it gives).
    """

    node_id: int
    partition_id: int | None
    arrays: Arrays | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Instruction:
    """One client's training order: its partition and the per-solve budget the server assigned."""

    partition_id: int
    budget: fleet.Budget
    proximal_mu: float


@dataclass
class RoundReport:
    """Who took part in a round and what happened to each reply (keys are partition ids)."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    unavailable: int = 0
    dropped: dict[int, str] = field(default_factory=dict)      # straggler, dropped out, never replied
    rejected: dict[int, str] = field(default_factory=dict)     # invalid or untruthful reply
    failed: dict[int, str] = field(default_factory=dict)       # client raised
    accepted: list[int] = field(default_factory=list)
    round_sim_time_s: float = 0.0
    client_sim_time_s: dict[int, float] = field(default_factory=dict)   # the server's clock, per reply
    fusion_weights: dict[int, float] = field(default_factory=dict)
    previous_model_weight: float = 0.0     # weight left on the last global model (FedNova), else 0
    scores: dict[int, float] = field(default_factory=dict)
    fusion_error: str | None = None
    probe: dict[str, float] | None = None
    mean_iterations: float | None = None
    mean_rel_residual: float | None = None
    bytes_down: int = 0    # models sent (one per instruction delivered); payload bytes, fed_deq/quantize.py
    bytes_up: int = 0      # every reply received with arrays, rejected ones included: they crossed the wire

    def to_record(self) -> dict:
        """The report's part of a ``metrics.jsonl`` line."""
        def by_pid(values: dict) -> dict:
            return {str(k): v for k, v in sorted(values.items())}

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
            "fusion_weights": by_pid(self.fusion_weights),
            "previous_model_weight": self.previous_model_weight,
            "quality_scores": by_pid(self.scores),
            "client_sim_time_s": by_pid(self.client_sim_time_s),
            "fusion_error": self.fusion_error,
            "probe": self.probe,
            "dropped": by_pid(self.dropped),
            "rejected": by_pid(self.rejected),
            "failed": by_pid(self.failed),
            "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
        }


@dataclass
class OpenRound:
    """A round between its instructions and its replies."""

    server_round: int
    reference: Arrays
    report: RoundReport
    instructions: dict[int, Instruction]     # by partition id

    @property
    def bytes_down(self) -> int:
        """Bytes of the model each instructed client downloads."""
        return workload.arrays_nbytes(self.reference)
