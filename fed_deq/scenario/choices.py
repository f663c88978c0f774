"""Named choices (solver, cell, fusion rule, ...) are the keys of the registry that implements them.

The schema holds no list of names: a value is checked against the registry when it is validated, so a
solver added with ``register_solver("mine", fn)`` can be chosen from YAML at once, and the JSON Schema lists
the registry's names as ``enum`` when it is generated. The registries are imported on first use, not with
this package: the modules that implement them import the scenario (and torch).

The names the registries ship with are also listed here (``BUILT_IN``), so that a scenario naming only
those validates without importing the registries and torch (1-2 s): ``fed-deq simulate`` starts Ray while
torch imports in another thread. A name outside the list is checked against the registry itself, so
registered names still validate; tests/test_registries.py checks the list against the registries.
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

#: The names each registry ships with, readable without importing it (see the module docstring).
BUILT_IN: Mapping[str, frozenset[str]] = MappingProxyType({
    "partition": frozenset({"iid", "dirichlet", "pathological"}),
    "model_kind": frozenset({"deq", "weight_tied", "explicit"}),
    "cell": frozenset({"mlp", "conv1d", "conv2d"}),
    "contraction": frozenset({"none", "spectral", "monotone", "lyapunov"}),
    "solver": frozenset({"picard", "anderson", "broyden"}),
    "backward": frozenset({"one-step", "implicit", "phantom"}),
    "optimizer": frozenset({"sgd", "adam"}),
    "rule": frozenset({"quality", "fedavg", "fednova", "fedprox", "fedmedian", "fedtrimmedavg", "krum"}),
    "score": frozenset({"budget", "residual", "accuracy", "product", "probe"}),
    "attack": frozenset({"inflate_examples", "fake_residual", "fake_accuracy", "fake_time", "fake_steps",
                         "negative_metric", "nan_update", "wrong_shape", "crash", "silent", "sign_flip",
                         "gaussian", "scale", "free_rider", "label_flip", "alie", "ipm"}),
    "profile": frozenset({"phone-low", "phone-mid", "phone-flagship", "rpi-4", "rpi-5", "laptop-cpu",
                          "edge-server"}),
    "upload": frozenset({"float32", "float16", "int8"}),
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
        if value in BUILT_IN[self.choice]:  # shipped names are known without importing the registry
            return value
        valid = names(self.choice)
        if value not in valid:
            raise failure("", f"must be one of {', '.join(valid)}, got {value!r}{did_you_mean(value, list(valid))}")
        return value
