"""Misbehaving clients planted by a scenario's ``adversaries`` section (numpy only, no Flower, no torch).

Which partitions misbehave is drawn from the scenario seed (``rng(seed, "adversaries", entry)``), so the
server, every client and the bare loop agree on it without talking. An attack rewrites an honest client's
reply (its arrays and metrics); ``crash`` raises instead and ``silent`` never answers. In every runner the
simulator models a silent client like a dropout: its instruction is never delivered, the round waits for it
until the deadline (simulated time), and it is recorded as ``no reply by the deadline`` — so silence costs
the round its deadline in simulated time, not ``simulation.round_timeout_s`` of wall time.

Every attack is a function ``(arrays, metrics) -> (arrays, metrics)`` in :data:`ATTACKS`; model-poisoning
attacks (sign flip, scaling, ALIE, ...) are new entries of the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from fed_deq import fleet, seeding
from fed_deq.scenario import Scenario, adversary_count

Arrays = dict[str, np.ndarray]
Metrics = dict[str, float]
Attack = Callable[[Arrays, Metrics], tuple[Arrays, Metrics]]


class AdversaryCrash(RuntimeError):
    """Raised by a client mounting the ``crash`` attack."""


def assign(scenario: Scenario) -> dict[int, str]:
    """Partition id → attack for every planted adversary, drawn from the scenario seed.

    Entries are served in file order; each draws its devices among the tier's partitions that no earlier
    entry took.
    """
    layout = fleet.tier_layout(scenario)
    taken: dict[int, str] = {}
    for index, entry in enumerate(scenario.adversaries):
        pool = [pid for pid, tier in enumerate(layout) if tier == entry.tier and pid not in taken]
        count = adversary_count(entry, layout.count(entry.tier))
        chosen = seeding.rng(scenario.seed, "adversaries", index).choice(pool, size=count, replace=False)
        taken.update({int(pid): entry.attack for pid in chosen})
    return dict(sorted(taken.items()))


def attack_of(scenario: Scenario, partition_id: int) -> str | None:
    """The attack partition ``partition_id`` mounts, or None for an honest client."""
    if not scenario.adversaries:
        return None
    return assign(scenario).get(int(partition_id))


def apply(attack: str | None, arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    """The reply an adversary sends instead of its honest ``(arrays, metrics)``; honest clients pass through."""
    if attack is None:
        return arrays, metrics
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    return ATTACKS[attack](dict(arrays), dict(metrics))


def _set(**values: float) -> Attack:
    def attack(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
        metrics.update(values)
        return arrays, metrics
    return attack


def _inflate_examples(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    metrics["num-examples"] = metrics["num-examples"] * 1000.0
    return arrays, metrics


def _fake_time(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    # A straggler's way out: claim a tenth of the time it took.
    for key in ("sim-time-s", "compute-s", "comm-s"):
        metrics[key] = metrics[key] * 0.1
    return arrays, metrics


def _nan_update(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    key = _first_float_key(arrays)
    poisoned = np.array(arrays[key], copy=True)
    poisoned.reshape(-1)[0] = np.nan
    arrays[key] = poisoned
    return arrays, metrics


def _wrong_shape(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    key = _first_float_key(arrays)
    arrays[key] = np.ascontiguousarray(np.asarray(arrays[key]).reshape(-1)[:-1])
    return arrays, metrics


def _crash(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    raise AdversaryCrash("adversary: crash attack (the client raised instead of replying)")


def _silent(arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    raise AdversaryCrash("adversary: a silent client never replies; it should not have been asked")


def _first_float_key(arrays: Arrays) -> str:
    return next(k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating))


#: Attack name → what it does to an honest reply.
ATTACKS: Mapping[str, Attack] = MappingProxyType({
    "inflate_examples": _inflate_examples,                  # 1000x its sample count, to grab the weight
    "fake_residual": _set(**{"rel-residual": 0.0, "val-rel-residual": 0.0}),   # "perfectly converged"
    "fake_accuracy": _set(**{"val-accuracy": 1.0}),         # "perfect on my validation data"
    "fake_time": _fake_time,                                # a tenth of its real time
    "fake_steps": _set(**{"local-steps": 1.0}),             # one step, to be scaled up by FedNova
    "negative_metric": _set(**{"rel-residual": -0.01}),     # out of range, used to crash the fusion
    "nan_update": _nan_update,                              # a NaN in its weights
    "wrong_shape": _wrong_shape,                            # one weight one element short
    "crash": _crash,                                        # raises
    "silent": _silent,                                      # never replies
})
