"""Misbehaving clients planted by a scenario's ``adversaries`` section (numpy only, no Flower, no torch).

Which partitions misbehave is drawn from the scenario seed (``rng(seed, "adversaries", entry)``), so the
server, every client and the bare loop agree on it without talking. In every runner the simulator models a
silent client like a dropout: its instruction is never delivered, the round waits for it until the deadline
(simulated time), and it is recorded as ``no reply by the deadline`` — so silence costs the round its
deadline in simulated time, not ``simulation.round_timeout_s`` of wall time.

Every attack is an :class:`AttackKind` in :data:`ATTACKS`, and acts at one ``stage``:

- ``reply``: lies and faults. The honest reply is rewritten after the client validated its model, so its
  claims no longer match what the server measures (``crash`` raises instead, ``silent`` never answers).
  The trust checks catch each one (tests/test_adversaries.py).
- ``update``: model poisoning. The trained update Δ = trained − global is replaced before the client
  validates and encodes it, so every claim the client sends agrees with the poisoned model and only the
  fusion rule stands between it and the global model: ``sign_flip`` (−Δ), ``gaussian`` (N(0, σ²) in place
  of Δ), ``scale`` (λΔ: model replacement), ``free_rider`` (Δ = 0: it trains, claims the work, and returns
  the global model).
- ``data``: ``label_flip`` trains on labels mapped y → C − 1 − y (Blades' label flip); it validates on its
  true labels, as the server re-measures them.
- ``collude``: ``alie`` (Baruch et al. 2019, "A Little Is Enough": μ − z·σ) and ``ipm`` (Xie et al. 2020,
  inner-product manipulation: −ε·μ), with μ and σ the coordinate-wise mean and standard deviation of the
  colluders' own honest updates of the round. Colluders need each other's updates; the simulator stands in
  for their network with a side channel in the round loop (fed_deq/collusion.py) that reads only colluders'
  replies, never an honest client's.

Attack parameters (``sigma``, ``factor``, ``z``, ``epsilon``) are fields of the adversaries entry; each
attack takes at most one, with the default in its AttackKind.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from fed_deq import fleet, seeding
from fed_deq.scenario import Scenario, adversary_count

if TYPE_CHECKING:
    from fed_deq.scenario.schema import AdversaryConfig

Arrays = dict[str, np.ndarray]
Metrics = dict[str, float]
Attack = Callable[[Arrays, Metrics], tuple[Arrays, Metrics]]
#: The stages an attack can act at (see the module docstring).
STAGES = ("reply", "update", "data", "collude")


@dataclass(frozen=True)
class AttackKind:
    """An attack: the ``stage`` it acts at, its function, and the one parameter it takes (with its default;
    None for ALIE's z means Baruch et al.'s value from the round's numbers of clients and colluders)."""

    stage: str
    act: Callable
    parameter: str | None = None
    default: float | None = None


class AdversaryCrash(RuntimeError):
    """Raised by a client mounting the ``crash`` attack."""


def planted(scenario: Scenario) -> dict[int, AdversaryConfig]:
    """Partition id → the adversaries entry it mounts, for every planted adversary, drawn from the seed.

    Entries are served in file order; each draws its devices among the tier's partitions that no earlier
    entry took.
    """
    layout = fleet.tier_layout(scenario)
    taken: dict[int, AdversaryConfig] = {}
    for index, entry in enumerate(scenario.adversaries):
        pool = [pid for pid, tier in enumerate(layout) if tier == entry.tier and pid not in taken]
        count = adversary_count(entry, layout.count(entry.tier))
        chosen = seeding.rng(scenario.seed, "adversaries", index).choice(pool, size=count, replace=False)
        taken.update({int(pid): entry for pid in chosen})
    return dict(sorted(taken.items()))


def assign(scenario: Scenario) -> dict[int, str]:
    """Partition id → attack name for every planted adversary (see ``planted``)."""
    return {pid: entry.attack for pid, entry in planted(scenario).items()}


def attack_of(scenario: Scenario, partition_id: int) -> str | None:
    """The attack partition ``partition_id`` mounts, or None for an honest client."""
    if not scenario.adversaries:
        return None
    return assign(scenario).get(int(partition_id))


def parameter_value(scenario: Scenario, partition_id: int, attack: str) -> float | None:
    """The parameter ``attack`` uses for this partition: its adversaries entry's value, else the default."""
    kind = ATTACKS[attack]
    entry = planted(scenario).get(int(partition_id)) if scenario.adversaries else None
    value = getattr(entry, kind.parameter, None) if entry is not None and kind.parameter else None
    return kind.default if value is None else float(value)


def stage_of(attack: str | None) -> str | None:
    """The stage ``attack`` acts at (None for an honest client); an unknown name is a ValueError."""
    if attack is None:
        return None
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    return ATTACKS[attack].stage


def apply(attack: str | None, arrays: Arrays, metrics: Metrics) -> tuple[Arrays, Metrics]:
    """The reply an adversary sends instead of its honest ``(arrays, metrics)``: reply-stage attacks rewrite
    it; honest clients and the other stages (which act earlier, or in the side channel) pass through."""
    if stage_of(attack) != "reply":
        return arrays, metrics
    return ATTACKS[attack].act(dict(arrays), dict(metrics))


# --- model poisoning --------------------------------------------------------------------------------------


def poison(attack: str, value: float | None, trained: Arrays, reference: Arrays,
           rng: np.random.Generator) -> Arrays:
    """The model an update-stage attacker sends: reference + its rewrite of Δ = trained − reference.

    Only floating arrays are updates; others (integer buffers) are sent as trained. Each array keeps its dtype.
    """
    kind = ATTACKS[attack]
    if kind.stage != "update":
        raise ValueError(f"{attack!r} is not a model-poisoning attack")
    return with_update(reference, kind.act(update_of(trained, reference), value, rng), trained)


def update_of(model: Arrays, reference: Arrays) -> Arrays:
    """Δ = model − reference (float64), for the floating arrays of ``model`` only."""
    return {k: np.asarray(model[k], np.float64) - np.asarray(reference[k], np.float64)
            for k in model if _is_float(model[k])}


def with_update(reference: Arrays, update: Arrays, like: Arrays) -> Arrays:
    """reference + Δ for the arrays ``update`` holds, ``like``'s own array (a copy) for the others; every array
    in ``like``'s dtype."""
    return {k: (np.asarray(reference[k], np.float64) + update[k]).astype(np.asarray(like[k]).dtype)
            if k in update else np.array(like[k], copy=True) for k in like}


def _sign_flip(update: Arrays, value, rng) -> Arrays:
    return {k: -v for k, v in update.items()}


def _gaussian(update: Arrays, sigma: float, rng: np.random.Generator) -> Arrays:
    # Drawn in sorted key order so the noise does not depend on the dict's order.
    return {k: rng.normal(0.0, sigma, size=update[k].shape) for k in sorted(update)}


def _scale(update: Arrays, factor: float, rng) -> Arrays:
    return {k: factor * v for k, v in update.items()}


def _free_rider(update: Arrays, value, rng) -> Arrays:
    return {k: np.zeros_like(v) for k, v in update.items()}


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels mapped y → C − 1 − y (a permutation of the classes: every class becomes another, 0 ↔ C − 1)."""
    labels = np.asarray(labels)
    return (num_classes - 1 - labels).astype(labels.dtype)


# --- colluding attacks --------------------------------------------------------------------------------------


def collude(attack: str, value: float | None, updates: Sequence[Arrays], round_clients: int) -> Arrays:
    """The one update every colluder of ``attack`` sends this round, computed from ``updates`` — the
    colluders' own honest updates, nothing else — and the number of clients the round asked."""
    kind = ATTACKS[attack]
    if kind.stage != "collude":
        raise ValueError(f"{attack!r} is not a colluding attack")
    if not updates:
        raise ValueError("a colluding attack needs at least one colluder's update")
    return kind.act(updates, value, round_clients)


def alie_z(round_clients: int, colluders: int) -> float:
    """Baruch et al.'s z: with s = ⌊n/2 + 1⌋ − f clients the colluders must sway, z = Φ⁻¹((n − s)/n).

    s is kept at 1 or more (with more colluders than that, the quantile is capped at (n − 1)/n).
    """
    n = max(int(round_clients), 2)
    s = max(n // 2 + 1 - int(colluders), 1)
    return statistics.NormalDist().inv_cdf((n - s) / n)


def _alie(updates: Sequence[Arrays], z: float | None, round_clients: int) -> Arrays:
    z = alie_z(round_clients, len(updates)) if z is None else z
    # Population standard deviation: defined for a single colluder too (σ = 0: it sends its own update).
    return {k: np.mean([u[k] for u in updates], axis=0) - z * np.std([u[k] for u in updates], axis=0)
            for k in updates[0]}


def _ipm(updates: Sequence[Arrays], epsilon: float, round_clients: int) -> Arrays:
    return {k: -epsilon * np.mean([u[k] for u in updates], axis=0) for k in updates[0]}


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
    return next(k for k, v in arrays.items() if _is_float(v))


def _is_float(value) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _reply(act: Attack) -> AttackKind:
    return AttackKind("reply", act)


#: Attack name → how it works. The lies and faults first (the trust checks catch each), then poisoning.
ATTACKS: Mapping[str, AttackKind] = MappingProxyType({
    "inflate_examples": _reply(_inflate_examples),          # 1000x its sample count, to grab the weight
    "fake_residual": _reply(_set(**{"rel-residual": 0.0, "val-rel-residual": 0.0})),   # "perfectly converged"
    "fake_accuracy": _reply(_set(**{"val-accuracy": 1.0})),  # "perfect on my validation data"
    "fake_time": _reply(_fake_time),                        # a tenth of its real time
    "fake_steps": _reply(_set(**{"local-steps": 1.0})),     # one step, to be scaled up by FedNova
    "negative_metric": _reply(_set(**{"rel-residual": -0.01})),  # out of range, used to crash the fusion
    "nan_update": _reply(_nan_update),                      # a NaN in its weights
    "wrong_shape": _reply(_wrong_shape),                    # one weight one element short
    "crash": _reply(_crash),                                # raises
    "silent": _reply(_silent),                              # never replies
    "sign_flip": AttackKind("update", _sign_flip),          # −Δ
    "gaussian": AttackKind("update", _gaussian, "sigma", 1.0),  # N(0, σ²) in place of Δ
    "scale": AttackKind("update", _scale, "factor", 10.0),  # λΔ (model replacement)
    "free_rider": AttackKind("update", _free_rider),        # Δ = 0, the work claimed
    "label_flip": AttackKind("data", flip_labels),          # trains on y → C − 1 − y
    "alie": AttackKind("collude", _alie, "z", None),        # μ − zσ of the colluders' updates
    "ipm": AttackKind("collude", _ipm, "epsilon", 0.5),     # −εμ of the colluders' updates
})
#: The lies and faults: every one is caught by the server's checks.
REPLY_ATTACKS: tuple[str, ...] = tuple(name for name, kind in ATTACKS.items() if kind.stage == "reply")
#: The poisoning attacks: only the fusion rule stands between them and the global model.
POISONING_ATTACKS: tuple[str, ...] = tuple(name for name, kind in ATTACKS.items() if kind.stage != "reply")
