"""Named choices (solver, cell, fusion rule, ...) are the keys of the registry that implements them.

The schema holds no list of names: a value is checked against the registry when it is validated, so a
solver added with ``register_solver("mine", fn)`` can be chosen from YAML at once, and the JSON Schema lists
the registry's names as ``enum`` when it is generated. The registries are imported on first use, not with
this package: the modules that implement them import the scenario (and torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from fed_deq.scenario.messages import did_you_mean, failure

#: Choice → (module, registry) that implements it.
REGISTRIES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "partition": ("fed_deq.partitions", "PARTITION_KINDS"),
    "model_kind": ("fed_deq.deq.kinds", "MODEL_KINDS"),
    "cell": ("fed_deq.deq.cells", "CELLS"),
    "contraction": ("fed_deq.deq.cells", "CONTRACTIONS"),
    "solver": ("fed_deq.deq.solvers", "SOLVERS"),
    "backward": ("fed_deq.deq.backward", "BACKWARD_MODES"),
    "optimizer": ("fed_deq.training", "OPTIMIZERS"),
    "rule": ("fed_deq.rules", "FUSION_RULES"),
    "score": ("fed_deq.fusion", "QUALITY_SCORES"),
    "attack": ("fed_deq.adversary", "ATTACKS"),
    "profile": ("fed_deq.profiles", "PROFILES"),
    "upload": ("fed_deq.quantize", "ENCODINGS"),
})

def registry(choice: str) -> Mapping[str, Any]:
    """The registry implementing ``choice`` (e.g. ``registry("solver")`` is ``fed_deq.deq.solvers.SOLVERS``)."""
    module, name = REGISTRIES[choice]
    return getattr(importlib.import_module(module), name)


def names(choice: str) -> tuple[str, ...]:
    """The names ``choice`` accepts right now, in registry order."""
    return tuple(registry(choice))


@dataclass(frozen=True)
class Choice:
    """Field annotation: the value must be a name in the registry of ``choice``."""

    choice: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        json_schema = handler(schema)
        json_schema["enum"] = list(names(self.choice))
        return json_schema

    def check(self, value: str) -> str:
        """``value`` if the registry has it, else a validation error suggesting the closest name."""
        valid = names(self.choice)
        if value not in valid:
            raise failure("", f"must be one of {', '.join(valid)}, got {value!r}{did_you_mean(value, list(valid))}")
        return value
