"""Rules that span keys or sections, and the derived facts they rest on (fleet size, tier sizes, round size).

The check functions run as model validators of the schema (schema.py) and raise ``failure(key, message)``;
the key is relative to the model that validates (the fleet for :func:`check_fleet`, the whole scenario for
:func:`check_scenario`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fed_deq.errors import InputError
from fed_deq.scenario.choices import registry
from fed_deq.scenario.messages import did_you_mean, failure

if TYPE_CHECKING:
    from fed_deq.scenario.schema import (AdversaryConfig, FleetConfig, ModelConfig, Scenario, TierConfig,
                                         TrainingConfig)

# Sizes of the built-in datasets, for the "enough samples for every client" check; hub datasets are unknown.
_DIGITS_SAMPLES = 1797
_BUILTIN_NUM_CLASSES = 10
_SHARE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------------
# Derived facts (public API).


def tier_names(scenario: Scenario) -> list[str]:
    """Tier names in file order."""
    return [tier.name for tier in scenario.fleet.tiers]


def num_clients(scenario: Scenario) -> int:
    """Fleet size (resolved from counts, or given with shares)."""
    return sum(tier_counts(scenario).values())


def tier_counts(scenario: Scenario) -> dict[str, int]:
    """Devices per tier; shares become counts by largest remainder, so they sum exactly to num_clients."""
    tiers = scenario.fleet.tiers
    if all(tier.count is not None for tier in tiers):
        return {tier.name: int(tier.count) for tier in tiers}  # type: ignore[arg-type]
    total = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    exact = [float(tier.share) * total for tier in tiers]  # type: ignore[arg-type]
    counts = [math.floor(value) for value in exact]
    missing = max(0, total - sum(counts))
    # Ties go to the earlier tier: sorted() is stable.
    by_remainder = sorted(range(len(tiers)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:missing]:
        counts[i] += 1
    return {tier.name: count for tier, count in zip(tiers, counts)}


def resolve_tier(scenario: Scenario, name: str, *, source: str = "node-config", key: str = "tier") -> TierConfig:
    """The tier called ``name``; an unknown name is an InputError naming ``source: key`` and the valid tiers."""
    for tier in scenario.fleet.tiers:
        if tier.name == name:
            return tier
    valid = tier_names(scenario)
    raise InputError(f"{source}: {key}: unknown tier {name!r}{did_you_mean(str(name), valid)}; "
                     f"valid tiers: {', '.join(valid)}")


def adversary_count(entry: AdversaryConfig, tier_size: int) -> int:
    """Devices an adversaries entry plants: its count, or its share of the tier rounded half up."""
    if entry.count is not None:
        return int(entry.count)
    return int(math.floor(float(entry.share) * tier_size + 0.5))  # type: ignore[arg-type]


def resolve_clients_per_round(training: TrainingConfig, fleet_size: int) -> int:
    """Clients a round samples from a fleet of ``fleet_size``: ``fraction_per_round`` of it (rounded half up,
    at least 1), else ``clients_per_round`` as given, else the default count capped at the fleet size.

    A parsed scenario holds the result in ``training.clients_per_round``.
    """
    if training.fraction_per_round is not None:
        return max(1, min(fleet_size, int(training.fraction_per_round * fleet_size + 0.5)))
    if "clients_per_round" in training.model_fields_set:
        return training.clients_per_round
    # The default count must not make a small fleet, which never mentioned it, an error.
    return min(training.clients_per_round, fleet_size)


def fleet_size(fleet: FleetConfig) -> int:
    """The sum of the tier counts, or ``num_clients`` when tiers use shares."""
    if all(tier.count is not None for tier in fleet.tiers):
        return sum(int(tier.count) for tier in fleet.tiers)  # type: ignore[arg-type]
    return int(fleet.num_clients)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# The fleet on its own.


def check_fleet(fleet: FleetConfig) -> None:
    """Unique tier names; all tiers sized by count or all by share; counts or shares that make a fleet."""
    seen: set[str] = set()
    for i, tier in enumerate(fleet.tiers):
        if tier.name in seen:
            raise failure(f"tiers.{i}.name", f"duplicate tier name {tier.name!r}")
        seen.add(tier.name)
    uses_count = [tier.count is not None for tier in fleet.tiers]
    if any(uses_count) and not all(uses_count):
        raise failure("tiers", "mixes count and share; give every tier a count, or every tier a share")
    # Without a tiers key the default single tier is sized by num_clients, given or defaulted.
    given = fleet.num_clients if ("num_clients" in fleet.model_fields_set or
                                  "tiers" not in fleet.model_fields_set) else None
    if all(uses_count):
        total = fleet_size(fleet)
        if given is not None and given != total:
            raise failure("num_clients", f"is {given} but the tier counts sum to {total}")
        if total < 1:
            raise failure("tiers", "tier counts sum to 0; the fleet needs a device")
        return
    if given is None:
        raise failure("num_clients", "required when tiers use share")
    share_sum = sum(float(tier.share) for tier in fleet.tiers)  # type: ignore[arg-type]
    if abs(share_sum - 1.0) > _SHARE_TOLERANCE:
        raise failure("tiers", f"shares must sum to 1, got {share_sum:g}")


def check_model(model: ModelConfig) -> None:
    """Sparse masks only on a kind that takes them (weight_tied, per the model-kind registry)."""
    if model.sparse_masks and not registry("model_kind")[model.kind].takes_masks:
        raise failure("sparse_masks", f"needs model.kind weight_tied (one cell, a mask per layer), "
                                      f"got model.kind {model.kind}")


# --------------------------------------------------------------------------------------------------------
# Rules across sections.


def check_scenario(scenario: Scenario) -> None:
    """Every rule that needs more than one section; the first broken one raises."""
    _check_clients_per_round(scenario)
    _check_iterations(scenario)
    _check_dataset_size(scenario)
    _check_fusion(scenario)
    _check_simulation(scenario)
    _check_adversaries(scenario)
    _check_adversarial_training(scenario)


def _check_adversarial_training(scenario: Scenario) -> None:
    """Intermediate states exist only along a DEQ's solver dynamics."""
    a = scenario.training.adversarial
    if a is not None and a.intermediate_states and scenario.model.kind != "deq":
        raise failure("training.adversarial.intermediate_states",
                      f"needs model.kind deq (a fixed-depth {scenario.model.kind} has no solver dynamics)")


def _check_clients_per_round(scenario: Scenario) -> None:
    value = scenario.training.clients_per_round
    size = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    if value > size:
        raise failure("training.clients_per_round", f"must be an integer in [1, {size}] (fleet.num_clients), "
                                                    f"got {value}")


def _check_iterations(scenario: Scenario) -> None:
    training = scenario.training
    if training.max_iterations < training.min_iterations:
        raise failure("training.max_iterations", f"must be >= training.min_iterations ({training.min_iterations}), "
                                                 f"got {training.max_iterations}")
    if training.min_iterations < 2:
        # Every backward mode needs at least one forward and one backward iteration: a budget of 1 cannot
        # hold both, and the weakest clients would fail every round.
        raise failure("training.min_iterations", f"must be >= 2 with model.backward {scenario.model.backward} "
                                                 f"(1 forward + at least 1 backward iteration), "
                                                 f"got {training.min_iterations}")


def _check_dataset_size(scenario: Scenario) -> None:
    dataset = scenario.dataset
    total = {"mnist1d": dataset.num_samples, "digits": _DIGITS_SAMPLES}.get(dataset.name)
    if total is None:
        return  # hub datasets: size unknown until download
    clients = int(scenario.fleet.num_clients)  # type: ignore[arg-type]
    train = int(total * (1 - dataset.test_fraction)) - scenario.fusion.probe_samples \
        - dataset.server_validation_samples
    per_client = max(1, dataset.partition.min_partition_size if dataset.partition.kind == "dirichlet" else 1)
    needed = clients * per_client
    if train < needed:
        if dataset.name == "mnist1d":
            raise failure("dataset.num_samples", f"must leave at least {needed} training samples ({per_client} "
                                                 f"for each of {clients} clients), got {total} ({train} for training)")
        raise failure("fleet.num_clients", f"{dataset.name} has {train} training samples, too few for "
                                           f"{per_client} per client, got {clients} clients")
    if dataset.partition.kind == "pathological" and dataset.partition.classes_per_client > _BUILTIN_NUM_CLASSES:
        raise failure("dataset.partition.classes_per_client", f"must be <= {_BUILTIN_NUM_CLASSES} for "
                                                              f"{dataset.name}, got {dataset.partition.classes_per_client}")


def _check_fusion(scenario: Scenario) -> None:
    fusion = scenario.fusion
    if fusion.rule == "quality" and fusion.score == "probe" and fusion.probe_samples < 1:
        raise failure("fusion.probe_samples", f"must be >= 1 with fusion.score probe, got {fusion.probe_samples}")
    valid = tier_names(scenario)
    for name in fusion.tier_weights:
        if name not in valid:
            raise failure(f"fusion.tier_weights.{name}", f"unknown tier {name!r}{did_you_mean(name, valid)}; "
                                                         f"valid tiers: {', '.join(valid)}")
    sampled = scenario.training.clients_per_round
    # Krum scores each update by its n - f - 2 nearest neighbours, so it needs n >= 2f + 3.
    if fusion.rule == "krum" and sampled < 2 * fusion.krum_malicious + 3:
        raise failure("fusion.krum_malicious", f"krum needs clients per round >= 2f + 3, "
                                               f"got f={fusion.krum_malicious} with {sampled} clients per round")


def _check_simulation(scenario: Scenario) -> None:
    sim = scenario.simulation
    if sim.num_cpus is not None and sim.num_cpus < sim.cpus_per_client:
        cpus = sim.cpus_per_client
        raise failure("simulation.num_cpus", f"must be >= simulation.cpus_per_client "
                                             f"({int(cpus) if cpus.is_integer() else cpus}), got {sim.num_cpus}")


#: The parameter fields of an adversaries entry (fed_deq/adversary.py PARAMETERS).
ATTACK_PARAMETERS = ("sigma", "factor", "z", "epsilon")


def _check_adversaries(scenario: Scenario) -> None:
    """Known tier, never more adversaries in a tier than it has devices, and only the attack's own parameter."""
    counts = tier_counts(scenario)
    planted: dict[str, int] = {}
    for i, entry in enumerate(scenario.adversaries):
        _check_attack_parameters(i, entry)
        if entry.tier not in counts:
            valid = list(counts)
            raise failure(f"adversaries.{i}.tier", f"unknown tier {entry.tier!r}{did_you_mean(entry.tier, valid)}; "
                                                   f"valid tiers: {', '.join(valid)}")
        planted[entry.tier] = planted.get(entry.tier, 0) + adversary_count(entry, counts[entry.tier])
        if planted[entry.tier] > counts[entry.tier]:
            raise failure(f"adversaries.{i}.count", f"{planted[entry.tier]} adversaries planted in tier "
                                                    f"{entry.tier!r}, which has {counts[entry.tier]} devices")


def _check_attack_parameters(index: int, entry: AdversaryConfig) -> None:
    """A parameter set on an adversaries entry must be the one its attack takes (fed_deq/adversary.py)."""
    takes = registry("attack")[entry.attack].parameter
    for name in ATTACK_PARAMETERS:
        if getattr(entry, name) is not None and name != takes:
            also = f" (it takes {takes})" if takes else " (it takes no parameter)"
            raise failure(f"adversaries.{index}.{name}", f"the {entry.attack} attack has no {name}{also}")
