"""What the server checks a training reply against, and the tolerances it allows (no Flower, no torch).

Each check raises :class:`Rejected` with a reason that names the symptom; the reason is recorded in
metrics.jsonl. The facts come from the scenario alone (:class:`ClientFacts`, derived by the round driver).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fed_deq import fleet, fusion, quantize

Arrays = dict[str, np.ndarray]

#: Metrics every training reply must carry; anything missing is rejected before it reaches the fusion.
REQUIRED_METRICS = (
    "num-examples", "local-steps", "forward-iterations", "backward-iterations", "budget-total", "budget-share",
    "rel-residual", "val-accuracy", "val-rel-residual", "sim-time-s", "server-round", "partition-id",
    "work-solve-evals", "work-grad-evals", "work-vjp-evals", "work-samples", "work-norm-calls", "work-solver-steps",
)
#: Relative tolerance on the simulated time a client claims against the server's clock (same formula).
TIME_TOLERANCE = 1e-3
#: The server re-evaluates a client's model with the client's own call; on the same machine the numbers agree
#: to the bit, but another CPU or BLAS may round differently, flip a near-tie of one prediction or stop one
#: sample's solve an iteration apart. So: one correct sample of slack, and a relative tolerance on the residual.
ACCURACY_SLACK_SAMPLES = 1
RESIDUAL_TOLERANCE = 1e-3
#: Work counts may exceed the budget's bound by this much before a reply is rejected (float sums).
WORK_SLACK = 1e-6


@dataclass(frozen=True)
class ClientFacts:
    """What the server derives about one partition from the scenario alone."""

    partition_id: int
    tier: str
    num_examples: int          # training samples (partition minus its validation split)
    num_val: int
    local_steps: int
    budget: fleet.Budget
    budget_share: float
    max_work: fleet.WorkCounts


class Rejected(Exception):
    """A reply fails a check; the message is the reason recorded in metrics.jsonl."""


class Dropped(Exception):
    """A reply arrived after the deadline (by the server's clock)."""


def check_sender(problem: str | None, partition_id: int | None, node_id: int, instructed) -> int:
    """The partition a readable reply comes from, if that partition was asked to train this round."""
    if problem is not None:
        raise Rejected(problem)
    if partition_id is None:
        raise Rejected(f"reply from node {node_id}, which serves no known partition")
    if partition_id not in instructed:
        raise Rejected("reply from a client not asked to train this round")
    return partition_id


def decode_upload(arrays: Arrays | None, encoding: str, reference: Arrays) -> Arrays | None:
    """A reply's arrays dequantised into the reference's dtypes (``training.upload``, fed_deq/quantize.py)."""
    if arrays is None:
        return None
    try:
        return quantize.decode(arrays, encoding, reference)
    except ValueError as exc:
        raise Rejected(f"unreadable {encoding} upload: {exc}") from None


def check_payload(arrays: Arrays | None, metrics: dict | None, reference: Arrays) -> None:
    """The model has the reference's layout and finite values; every required metric is a finite number."""
    reason = fusion.screen_update(arrays or {}, reference, metrics or {}, REQUIRED_METRICS)
    if reason is not None:
        raise Rejected(reason)


def check_time(claimed: float, server_time: float) -> None:
    """The simulated time a client claims against the server's clock (the same formula, so a tight tolerance)."""
    if abs(claimed - server_time) > TIME_TOLERANCE * max(server_time, 1e-9):
        raise Rejected(f"sim-time-s claims {claimed:.4g}s, the server's clock says {server_time:.4g}s")


def check_identity(metrics: dict, server_round: int, pid: int) -> None:
    """The reply answers this round, for the partition of the node that sent it."""
    if int(metrics["server-round"]) != server_round:
        raise Rejected(f"late reply from round {int(metrics['server-round'])}")
    if int(metrics["partition-id"]) != pid:
        raise Rejected(f"partition-id {int(metrics['partition-id'])} claimed by the node serving partition {pid}")


def check_ranges(metrics: dict, facts: ClientFacts) -> None:
    """Every number is inside the range it can take (iterations within the assigned budget)."""
    b = facts.budget
    bounds = {
        "rel-residual": (0.0, math.inf), "val-rel-residual": (0.0, math.inf), "val-accuracy": (0.0, 1.0),
        "sim-time-s": (0.0, math.inf), "compute-s": (0.0, math.inf), "comm-s": (0.0, math.inf),
        "train-loss": (0.0, math.inf), "budget-share": (0.0, 1.0),
        "forward-iterations": (0.0, b.forward + WORK_SLACK), "backward-iterations": (0.0, b.backward + WORK_SLACK),
        "work-solve-evals": (0.0, math.inf), "work-grad-evals": (0.0, math.inf), "work-vjp-evals": (0.0, math.inf),
        "work-samples": (0.0, math.inf), "work-norm-calls": (0.0, math.inf), "work-solver-steps": (0.0, math.inf),
    }
    for name, (low, high) in bounds.items():
        if name in metrics and not low <= float(metrics[name]) <= high:
            raise Rejected(f"{name} {float(metrics[name]):.4g} out of range [{low:g}, {high:g}]")


def check_claims(metrics: dict, facts: ClientFacts) -> None:
    """Sizes, steps, budget and work against what the server derived."""
    if float(metrics["num-examples"]) != facts.num_examples:
        raise Rejected(f"num-examples {float(metrics['num-examples']):.6g} but partition {facts.partition_id} "
                       f"holds {facts.num_examples} training samples (server-known)")
    if float(metrics["local-steps"]) != facts.local_steps:
        raise Rejected(f"local-steps {float(metrics['local-steps']):.6g} but {facts.num_examples} samples make "
                       f"{facts.local_steps} steps (server-known)")
    if float(metrics["budget-total"]) != facts.budget.total:
        raise Rejected(f"budget-total {float(metrics['budget-total']):.6g} but the server assigned "
                       f"{facts.budget.total} iterations")
    bound = facts.max_work
    if float(metrics["work-samples"]) != bound.samples:
        raise Rejected(f"work-samples {float(metrics['work-samples']):.6g} but {facts.num_examples} samples "
                       f"give {bound.samples:g} sample passes")
    for name, limit in (("work-solve-evals", bound.solve_evals), ("work-grad-evals", bound.grad_evals),
                        ("work-vjp-evals", bound.vjp_evals), ("work-norm-calls", bound.norm_calls),
                        ("work-solver-steps", bound.solver_steps)):
        if float(metrics[name]) > limit * (1 + WORK_SLACK) + WORK_SLACK:
            raise Rejected(f"{name} {float(metrics[name]):.6g} exceeds what the assigned budget allows ({limit:g})")


def check_validation(metrics: dict, val, facts: ClientFacts) -> None:
    """The accuracy and residual claimed on the validation split against the server's own re-evaluation."""
    n = facts.num_val
    measured_acc = float(val.accuracy) if val.num_examples else 0.0
    claimed_acc = float(metrics["val-accuracy"])
    if abs(round(claimed_acc * max(n, 1)) - round(measured_acc * max(n, 1))) > ACCURACY_SLACK_SAMPLES:
        raise Rejected(f"val-accuracy {claimed_acc:.4g} but the server measures {measured_acc:.4g} on the "
                       f"client's {n} validation samples")
    measured_res, claimed_res = float(val.rel_residual), float(metrics["val-rel-residual"])
    if abs(claimed_res - measured_res) > RESIDUAL_TOLERANCE * max(measured_res, 1e-3):
        raise Rejected(f"val-rel-residual {claimed_res:.4g} but the server measures {measured_res:.4g} on the "
                       f"client's validation samples")


def check_fused(fused: Arrays, reference: Arrays) -> None:
    """A fused model must have the reference's layout and finite values, or the round keeps the old model."""
    reason = fusion.screen_update(fused, reference, {}, ())
    if reason is not None:
        raise ValueError(f"fused model unusable: {reason}")
