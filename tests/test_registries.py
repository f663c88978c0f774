"""Every named choice of a scenario is exactly the keys of the registry that implements it."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_deq import fusion, rules
from fed_deq.deq.models import build_model
from fed_deq.deq.solvers import SOLVERS, register_solver
from fed_deq.errors import InputError
from fed_deq.scenario import Scenario, parse_scenario, registry, scenario_json_schema
from fed_deq.scenario.choices import BUILT_IN, REGISTRIES, Choice
from fed_deq.scenario.messages import model_of
from fed_deq.training import OPTIMIZERS, LocalTrainConfig, evaluate, make_optimizer

SRC = "scenarios/x.yaml"


def choice_fields(model: type = Scenario, prefix: str = "") -> dict[str, str]:
    """Dotted key path → choice, read off the schema's ``Choice`` annotations (list items as ``0``)."""
    found = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        # An optional choice (``Annotated[str, Choice(...)] | None``) keeps its Choice inside the union.
        inner = [getattr(arg, "__metadata__", ()) for arg in typing.get_args(info.annotation)]
        for item in [*info.metadata, *(meta for metas in inner for meta in metas)]:
            if isinstance(item, Choice):
                found[path] = item.choice
        child = model_of(info.annotation)
        if child is not None:
            inner = f"{path}.0." if typing.get_origin(info.annotation) is tuple else f"{path}."
            found.update(choice_fields(child, inner))
    return found


CHOICE_FIELDS = choice_fields()


def scenario_with(path: str, value: str) -> dict:
    """A scenario mapping that sets ``path`` (an adversaries entry gets the default tier and a count)."""
    if path.startswith("adversaries."):
        return {"adversaries": [{"tier": "device", "count": 1, path.rsplit(".", 1)[1]: value}]}
    if path.startswith("fleet.tiers."):
        return {"fleet": {"tiers": [{"name": "device", "count": 1, path.rsplit(".", 1)[1]: value}]}}
    data: dict = {}
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def json_schema_at(path: str) -> dict:
    """The JSON Schema of the key at ``path``."""
    schema = scenario_json_schema()
    node = schema
    for part in path.split("."):
        if part.isdigit():
            node = node["items"]
        else:
            node = node["properties"][part]
        if "anyOf" in node:  # a section may also be null (an empty section means its defaults)
            node = next(option for option in node["anyOf"] if option.get("type") != "null")
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_registry_is_a_choice_of_the_schema():
    assert set(CHOICE_FIELDS.values()) == set(REGISTRIES)


@pytest.mark.parametrize("path", sorted(CHOICE_FIELDS))
def test_the_schema_accepts_exactly_the_registry_names(path):
    names = list(registry(CHOICE_FIELDS[path]))
    assert names, "an empty registry would make the key impossible to set"
    for name in names:
        parsed = parse_scenario(scenario_with(path, name), SRC)
        section = parsed
        for part in path.split("."):
            section = section[int(part)] if part.isdigit() else getattr(section, part)
        assert section == name
    unknown = "x-" + names[0]
    with pytest.raises(InputError) as info:
        parse_scenario(scenario_with(path, unknown), SRC)
    assert str(info.value).startswith(f"{SRC}: {path}: must be one of {', '.join(names)}, got {unknown!r}")
    assert json_schema_at(path)["enum"] == names


def test_a_registered_solver_is_accepted_and_used_by_a_solve():
    calls: list[int] = []

    def counting_picard(f, z0, *, max_iter, tol):
        calls.append(max_iter)
        return SOLVERS["picard"](f, z0, max_iter=max_iter, tol=tol)

    name = "test-counting-picard"
    with pytest.raises(InputError, match="model.solver: must be one of"):
        parse_scenario({"model": {"solver": name}}, SRC)
    register_solver(name, counting_picard)
    try:
        chosen = parse_scenario({"model": {"solver": name, "cell": "mlp"}}, SRC)
        assert name in json_schema_at("model.solver")["enum"]
        model = build_model(cell=chosen.model.cell, input_shape=(8,), num_classes=3, width=4)
        x = np.random.default_rng(0).random((5, 8), dtype=np.float32)
        result = evaluate(model, x, np.zeros(5, dtype=np.int64), solver=chosen.model.solver, max_iter=3,
                          tol=chosen.model.tol)
        assert calls == [3] and result.num_examples == 5
    finally:
        SOLVERS.pop(name, None)
    with pytest.raises(InputError, match="model.solver: must be one of"):
        parse_scenario({"model": {"solver": name}}, SRC)


def test_optimizers_are_built_through_the_registry():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name, factory in OPTIMIZERS.items():
        cfg = LocalTrainConfig(epochs=1, batch_size=2, learning_rate=0.1, optimizer=name, momentum=0.5,
                               solver="anderson", tol=1e-3, backward="one-step")
        assert type(make_optimizer(params, cfg)) is type(factory(params, cfg))
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(params, LocalTrainConfig(epochs=1, batch_size=2, learning_rate=0.1, optimizer="lbfgs",
                                                momentum=0.5, solver="anderson", tol=1e-3, backward="one-step"))


def test_the_flower_adapter_carries_out_exactly_the_rules_the_core_leaves_to_it():
    from server.strategies.flower_rules import FLOWER_STRATEGIES, flower_strategy

    carried = {rule for rule in rules.FUSION_RULES
               if flower_strategy(parse_scenario({"fusion": {"rule": rule}}, SRC)) is not None}
    assert carried == set(FLOWER_STRATEGIES) == set(rules.adapter_rules("flower"))
    assert all(rules.FUSION_RULES[name].fuse is None for name in carried)
    core = [name for name, rule in rules.FUSION_RULES.items() if rule.adapter is None]
    assert core and all(rules.FUSION_RULES[name].fuse is not None for name in core)
    assert carried  # the robust rules exist


def test_the_clock_prices_every_backward_mode():
    from fed_deq.deq.backward import BACKWARD_MODES
    from fed_deq.fleet import max_work, split_budget

    for mode in BACKWARD_MODES:
        budget = split_budget(6, mode, 3)
        assert budget.forward >= 1 and budget.total == 6
        work = max_work(samples=10, batch_size=4, epochs=1, forward=budget.forward, backward=budget.backward,
                        backward_mode=mode)
        assert work.grad_evals >= 10  # every mode recomputes f at least once per sample on the gradient path


def test_the_built_in_names_are_the_names_the_registries_ship_with():
    # In a fresh interpreter: tests in this one register extra names for a while.
    script = ("import json; from fed_deq.scenario.choices import REGISTRIES, names; "
              "print(json.dumps({choice: sorted(names(choice)) for choice in REGISTRIES}))")
    shipped = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                        text=True).stdout)
    assert set(BUILT_IN) == set(REGISTRIES)
    assert {choice: sorted(BUILT_IN[choice]) for choice in shipped} == shipped


def test_validating_the_shipped_scenarios_does_not_import_torch():
    # fed-deq simulate starts Ray while torch imports in another thread; validation on the main thread
    # must not import it first.
    script = ("import sys, glob; from tools.cli import main; from fed_deq.scenario import load_scenario; "
              "[load_scenario(path) for path in sorted(glob.glob('scenarios/*.yaml'))]; "
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"
