"""Simulated devices: tiers, per-round iteration budgets, the simulated clock and every fleet-level draw.

Pure python + numpy (no Flower, no torch). Every random draw comes from ``seeding.rng(seed, *keys)`` with keys that
name what is drawn (``"availability", round`` or ``"straggler", round, partition_id``), so a draw never
depends on the order in which draws are made.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fed_deq.errors import InputError
from fed_deq.seeding import rng
from fed_deq.scenario import Scenario, tier_counts

BYTES_PER_PARAM = 4  # float32
BITS_PER_BYTE = 8


@dataclass(frozen=True)
class Device:
    """One simulated client device; ``partition_id`` is its index in the fleet and its data partition."""

    partition_id: int
    tier: str
    compute_flops: float        # sustained FLOP/s for local training
    bandwidth_bps: float        # bit/s, same up and down
    availability: float         # probability of being reachable in a round
    dropout: float              # probability of dropping out mid-round once sampled
    straggler_prob: float       # probability of running slow in a round
    straggler_slowdown: float   # factor on compute time when slow


@dataclass(frozen=True)
class Budget:
    """Solver iterations per solve: forward (fixed-point) and backward (gradient) iterations."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        """Forward plus backward iterations."""
        return self.forward + self.backward


@dataclass(frozen=True)
class RoundPlan:
    """Who is reachable, who is sampled and who of those drops out; sorted partition ids."""

    available: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    dropped_out: list[int] = field(default_factory=list)

    @property
    def active(self) -> list[int]:
        """Sampled clients that do not drop out (the ones expected to reply)."""
        dropped = set(self.dropped_out)
        return [pid for pid in self.sampled if pid not in dropped]


def build_fleet(scenario: Scenario) -> list[Device]:
    """All devices, index = partition id; tiers are spread over partition ids by a seeded shuffle."""
    tiers = {tier.name: tier for tier in scenario.fleet.tiers}
    return [device_from_tier(tiers[name], pid) for pid, name in enumerate(tier_layout(scenario))]


def device_of(scenario: Scenario, partition_id: int) -> Device:
    """One partition's device, without building the others (a client needs only its own)."""
    layout = tier_layout(scenario)
    if not 0 <= partition_id < len(layout):
        raise InputError(f"partition-id {partition_id} is outside the fleet of {len(layout)} clients")
    tier = next(t for t in scenario.fleet.tiers if t.name == layout[partition_id])
    return device_from_tier(tier, partition_id)


def tier_layout(scenario: Scenario) -> tuple[str, ...]:
    """The tier name of every partition id: tier labels in a permutation drawn from the scenario seed."""
    return _tier_layout(scenario.seed, tuple(tier_counts(scenario).items()))


@functools.lru_cache(maxsize=16)
def _tier_layout(seed: int, counts: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    # Memoised on plain values: every reply of a round asks for its client's tier.
    labels = [name for name, count in counts for _ in range(count)]
    order = rng(seed, "fleet", "tiers").permutation(len(labels))
    return tuple(labels[i] for i in order)


def device_from_tier(tier, partition_id: int) -> Device:
    """A device with a tier's figures (``tier`` is a scenario TierConfig) serving ``partition_id``."""
    return Device(partition_id=partition_id, tier=tier.name, compute_flops=tier.compute_gflops * 1e9,
                  bandwidth_bps=tier.bandwidth_mbps * 1e6, availability=tier.availability, dropout=tier.dropout,
                  straggler_prob=tier.straggler_prob, straggler_slowdown=tier.straggler_slowdown)


def model_bytes(num_params: int) -> int:
    """Size on the wire of a float32 model."""
    return int(num_params) * BYTES_PER_PARAM


def comm_seconds(device: Device, model_bytes: int) -> float:
    """Download plus upload of the model at the device's bandwidth."""
    return 2 * model_bytes * BITS_PER_BYTE / device.bandwidth_bps


def compute_seconds(device: Device, flops: float) -> float:
    """Time the device needs for ``flops`` at its nominal speed (straggling is applied by the caller)."""
    return flops / device.compute_flops


@dataclass(frozen=True)
class WorkCounts:
    """What local training evaluated in one round, in per-sample units (summed over all batches).

    Every count is batch-level: a call that runs on a batch of B samples counts B, whether or not a sample
    still needed it (a batched solve evaluates f on the whole batch until its slowest sample stops).
    """

    solve_evals: float   # sample-evaluations of f inside forward solves: batch_size * f-calls of the solver
    grad_evals: float    # sample-evaluations of f recomputed with autograd on the gradient path (forward part);
                         # each is also differentiated into the cell weights in backward
    vjp_evals: float     # sample vector-Jacobian products through f with respect to the state (J^T y) in backward
    samples: float       # sample passes through encoder + head (each charged forward + backward = 3x overhead)
    norm_calls: float    # calls of the cell's weight normalisation (one per model forward); its backward is charged too
    solver_steps: float = 0.0  # sample-steps of a solver to a next iterate (f-calls - 1 per solve, forward solves
                               # and implicit adjoint solves), each charged the solver's own linear algebra

    def __add__(self, other: "WorkCounts") -> "WorkCounts":
        if not isinstance(other, WorkCounts):
            return NotImplemented
        return WorkCounts(*(a + b for a, b in zip(_work_tuple(self), _work_tuple(other))))


def _work_tuple(counts: WorkCounts) -> tuple[float, ...]:
    return (counts.solve_evals, counts.grad_evals, counts.vjp_evals, counts.samples, counts.norm_calls,
            counts.solver_steps)


NO_WORK = WorkCounts(0.0, 0.0, 0.0, 0.0, 0.0)


def work_flops(counts: WorkCounts, *, cell_flops: float, overhead_flops: float, norm_flops: float,
               solver_flops: float = 0.0) -> float:
    """FLOPs of the work in ``counts`` (the cost model of the simulated clock; docs/design.md).

    ``solve_evals * cell + grad_evals * 2 cell + vjp_evals * cell + samples * 3 overhead
    + norm_calls * norm_flops + solver_steps * solver_flops``, with ``cell_flops`` one f evaluation per
    sample, ``overhead_flops`` the encoder + head forward per sample, ``norm_flops`` one call of the weight
    normalisation INCLUDING its backward, ``solver_flops`` the solver's own work per sample-iteration.
    A recomputed f evaluation costs 2 cells: its forward and its weight-gradient product in backward; a
    vector-Jacobian product with respect to the state costs 1 cell (a transposed convolution / matrix
    product as large as the forward). FLOPs count multiply-adds of matrix products and convolutions as 2,
    like torch's FlopCounterMode; elementwise work (ReLU, GroupNorm, residual norms, the optimizer step) is
    not charged.
    """
    return (counts.solve_evals * cell_flops
            + counts.grad_evals * 2.0 * cell_flops
            + counts.vjp_evals * cell_flops
            + counts.samples * 3.0 * overhead_flops
            + counts.norm_calls * norm_flops
            + counts.solver_steps * solver_flops)


def local_steps(samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a round: ``ceil(samples / batch_size)`` batches per epoch (the last one smaller)."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if samples < 0 or epochs < 0:
        raise ValueError(f"samples and epochs must be >= 0, got {samples!r}, {epochs!r}")
    return math.ceil(int(samples) / int(batch_size)) * int(epochs)


def max_work(*, samples: int, batch_size: int, epochs: int, forward: int, backward: int,
             backward_mode: str, attack_steps: int = 0, intermediate_states: bool = False) -> WorkCounts:
    """The most work a client can do in a round with per-solve budget (forward, backward): a hard bound.

    Every batch runs the whole forward budget on the whole batch (the solver never calls f more than
    ``max_iter`` times); the gradient path as fed_deq/deq/backward.py runs it, with ``backward`` the
    ``backward_max_iter`` the model is called with (a value below 1 is charged as 1, the least the model
    accepts). Per sample and epoch:

    - one-step: 1 recomputed f, no state VJP.
    - phantom (k = backward): k recomputed f, k - 1 state VJPs.
    - implicit (k = backward): 1 recomputed f, at most k - 1 adjoint VJPs + 1 in the final backward;
      the adjoint solver makes at most k - 2 steps (charged as solver steps like the forward's forward - 1).

    ``local_steps(samples, batch_size, epochs)`` model forwards, so as many weight normalisations.

    Adversarial training (``training.adversarial``): each of the ``attack_steps`` PGD steps of a batch is a
    model call at the same budgets with its gradient path run to the input, charged as one more training
    pass; ``intermediate_states`` adds, per batch, an unrolled pass of at most ``forward`` steps with
    autograd (``forward`` recomputed f, ``forward - 1`` state VJPs, one encoder + head pass, one weight
    normalisation).
    """
    if backward_mode not in ("one-step", "phantom", "implicit"):
        raise ValueError(f"unknown backward mode {backward_mode!r}; valid: one-step, implicit, phantom")
    if isinstance(forward, bool) or int(forward) != forward or forward < 1:
        raise ValueError(f"forward must be an integer >= 1, got {forward!r}")
    steps = local_steps(samples, batch_size, epochs)
    passes = float(samples) * float(epochs)
    k = max(int(backward), 1)
    if backward_mode == "one-step":
        grad, vjp, adjoint = 1, 0, 0
    elif backward_mode == "phantom":
        grad, vjp, adjoint = k, k - 1, 0
    else:
        grad, vjp, adjoint = 1, k, k - 1
    solver_steps = (int(forward) - 1) + max(adjoint - 1, 0)
    calls = 1 + int(attack_steps)  # the training pass and the attack's passes, all alike
    work = WorkCounts(solve_evals=calls * passes * forward, grad_evals=calls * passes * grad,
                      vjp_evals=calls * passes * vjp, samples=calls * passes, norm_calls=float(calls * steps),
                      solver_steps=calls * passes * solver_steps)
    if intermediate_states:
        work = work + intermediate_work(passes, steps, int(forward))
    return work


def intermediate_work(passes: float, steps: int, depth: int) -> WorkCounts:
    """The most an intermediate-state loss costs: per sample an unrolled pass of ``depth`` steps with autograd
    (each f recomputed and differentiated into the weights, ``depth - 1`` state VJPs), an encoder + head pass,
    and one weight normalisation per batch."""
    return WorkCounts(solve_evals=0.0, grad_evals=passes * depth, vjp_evals=passes * max(depth - 1, 0),
                      samples=passes, norm_calls=float(steps))


def unroll_work(*, samples: int, batch_size: int, epochs: int, depth: int, attack_steps: int = 0) -> WorkCounts:
    """The work of a round of a fixed-depth model (fed_deq/deq/unrolled.py): exact, whatever the budget.

    Per sample and epoch, ``depth`` layers evaluated with autograd (each also differentiated into the
    weights) and ``depth - 1`` vector-Jacobian products with respect to the state (backpropagation through the
    unroll; layer 1 starts from the constant 0); no solve, no solver steps. One weight normalisation per model
    forward, as for the DEQ (the model's ``norm_flops`` covers all the layers it normalises). Each of the
    ``attack_steps`` PGD steps of adversarial training is one more such pass (backpropagated to the input).
    """
    if isinstance(depth, bool) or int(depth) != depth or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    calls = 1 + int(attack_steps)
    passes = float(samples) * float(epochs) * calls
    return WorkCounts(solve_evals=0.0, grad_evals=passes * depth, vjp_evals=passes * (depth - 1), samples=passes,
                      norm_calls=float(calls * local_steps(samples, batch_size, epochs)), solver_steps=0.0)


def split_budget(total: int, backward: str, backward_iterations: int) -> Budget:
    """Split a per-solve budget between the forward solve and the backward pass, per backward mode."""
    if backward == "one-step":
        back = 1
    elif backward == "phantom":
        back = min(backward_iterations, total - 1)
    elif backward == "implicit":
        back = min(backward_iterations, total // 2)
    else:
        raise ValueError(f"unknown backward mode {backward!r}; valid: one-step, implicit, phantom")
    forward = total - back
    if forward < 1 or back < 0:
        raise ValueError(f"a budget of {total} iterations cannot hold a forward solve with backward {backward!r}")
    return Budget(forward=forward, backward=back)


def plan_budget(device: Device, *, deadline_s: float, comm_s: float, samples: int, epochs: int,
                cell_flops: float, overhead_flops: float, backward: str, backward_iterations: int,
                min_iterations: int, max_iterations: int, batch_size: int, norm_flops: float,
                solver_flops: float = 0.0, attack_steps: int = 0, intermediate_states: bool = False) -> Budget:
    """The largest per-solve budget whose local training fits in the deadline after communication.

    A budget fits when the most work it allows, ``work_flops(max_work(...))`` (every batch spends its whole
    forward budget on the whole batch, plus the gradient path, the weight normalisation and the solver's own
    work, and the adversarial training's attack: ``attack_steps``, ``intermediate_states``), runs within the
    time left at the device's nominal speed.
    Bounded by [min_iterations, max_iterations]. When not even min_iterations fits, the min budget is
    returned anyway: the device then overruns the deadline and becomes a straggler, which is the point.
    """
    if max_iterations < min_iterations:
        raise ValueError(f"max_iterations ({max_iterations}) < min_iterations ({min_iterations})")
    time_left = deadline_s - comm_s

    def fits(total: int) -> bool:
        budget = split_budget(total, backward, backward_iterations)
        counts = max_work(samples=samples, batch_size=batch_size, epochs=epochs, forward=budget.forward,
                          backward=budget.backward, backward_mode=backward, attack_steps=attack_steps,
                          intermediate_states=intermediate_states)
        flops = work_flops(counts, cell_flops=cell_flops, overhead_flops=overhead_flops, norm_flops=norm_flops,
                           solver_flops=solver_flops)
        return compute_seconds(device, flops) <= time_left

    # Cost never decreases with the total in any backward mode, so bisect for the largest total that fits.
    low, high = min_iterations, max_iterations
    if not fits(low):
        return split_budget(low, backward, backward_iterations)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return split_budget(low, backward, backward_iterations)


def plan_round(fleet: Sequence[Device], *, seed: int, round: int, clients_per_round: int) -> RoundPlan:
    """Availability draws, then sampling without replacement, then dropout draws, for one round.

    ``clients_per_round`` is the count to sample (a scenario's ``training.clients_per_round``, resolved from a
    fraction when the scenario gives one); fewer are sampled when fewer are available.
    Each draw is made for every device, so one device's outcome never depends on who else was drawn.
    """
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, (int, np.integer)):
        raise ValueError(f"clients_per_round must be an integer count, got {clients_per_round!r}")
    size = len(fleet)
    availability = np.array([device.availability for device in fleet], dtype=float)
    dropout = np.array([device.dropout for device in fleet], dtype=float)
    available = np.flatnonzero(rng(seed, "availability", round).random(size) < availability)
    count = min(int(clients_per_round), size, available.size)
    sampled = np.sort(rng(seed, "sample", round).choice(available, size=count, replace=False))
    drops = rng(seed, "dropout", round).random(size) < dropout
    dropped = sampled[drops[sampled]]
    ids = [int(fleet[i].partition_id) for i in range(size)]
    return RoundPlan(
        available=[ids[i] for i in available],
        sampled=[ids[i] for i in sampled],
        dropped_out=[ids[i] for i in dropped],
    )


def straggler_slowdown(device: Device, *, seed: int, round: int) -> float:
    """The device's slowdown factor this round: its tier's slowdown if the straggler draw hits, else 1.0."""
    hit = rng(seed, "straggler", round, device.partition_id).random() < device.straggler_prob
    return float(device.straggler_slowdown) if hit else 1.0


def round_time(client_times: Sequence[float], deadline_s: float) -> tuple[np.ndarray, float]:
    """Which replies beat the deadline, and how long the round lasted.

    The server waits for every sampled client or until the deadline, whichever comes first: the round lasts
    as long as the slowest client, capped by the deadline. Pass ``inf`` for a client that dropped out.
    With no clients at all the round still lasts the deadline (nobody could be reached in time).
    """
    times = np.asarray(client_times, dtype=float).reshape(-1)
    if np.isnan(times).any() or (times < 0).any():
        raise ValueError(f"client times must be >= 0, got {times.tolist()}")
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
    accepted = times <= deadline_s
    if times.size == 0:
        return accepted, float(deadline_s)
    return accepted, float(min(times.max(), deadline_s))

