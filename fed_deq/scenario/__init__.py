"""Strict scenario schema: YAML file -> frozen pydantic models.

Anything unknown, misspelt, mistyped or impossible is an ``InputError`` with one line naming the file and
the dotted key path, e.g. ``scenarios/x.yaml: training.rounds: must be an integer >= 1, got -3``.

- schema.py: the sections and their keys (defaults, types, ranges); choices.py: named choices checked against
  the registries that implement them; checks.py: rules across keys, and derived facts (tier sizes, ...);
  load.py: YAML, ``--set`` overrides, dumping, the JSON Schema; messages.py: the one-line errors.

Importable without Flower or torch; validating a named choice imports the registry that implements it.
A scenario is immutable: derive a changed one with ``scenario.model_copy(update={...})`` (not validated) or,
to have it checked, ``parse_scenario({**scenario.to_dict(), ...}, source)``.
"""

from __future__ import annotations

from fed_deq.scenario.checks import (
    adversary_count,
    num_clients,
    resolve_clients_per_round,
    resolve_tier,
    tier_counts,
    tier_names,
)
from fed_deq.scenario.choices import names, registry
from fed_deq.scenario.load import (
    dump_scenario,
    load_scenario,
    parse_scenario,
    parse_scenario_text,
    scenario_json_schema,
    validate_file,
)
from fed_deq.scenario.schema import (
    AdversaryConfig,
    DatasetConfig,
    FleetConfig,
    FusionConfig,
    ModelConfig,
    PartitionConfig,
    Scenario,
    SimulationConfig,
    TierConfig,
    TrainingConfig,
)


__all__ = [
    "AdversaryConfig", "DatasetConfig", "FleetConfig", "FusionConfig", "ModelConfig", "PartitionConfig", "Scenario",
    "SimulationConfig", "TierConfig", "TrainingConfig", "adversary_count", "dump_scenario", "load_scenario", "names",
    "num_clients", "parse_scenario", "parse_scenario_text", "registry", "resolve_clients_per_round", "resolve_tier",
    "scenario_json_schema", "tier_counts", "tier_names", "validate_file",
]
