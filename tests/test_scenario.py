"""Strict scenario schema: defaults, every error class, overrides, shipped files, round trips."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from fed_deq.errors import InputError
from fed_deq.scenario import (
    Scenario,
    TrainingConfig,
    dump_scenario,
    load_scenario,
    num_clients,
    parse_scenario,
    parse_scenario_text,
    resolve_clients_per_round,
    resolve_tier,
    tier_counts,
    tier_names,
    validate_file,
)

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))
SRC = "scenarios/x.yaml"

TWO_TIERS = {"fleet": {"tiers": [{"name": "phone", "count": 6}, {"name": "laptop", "count": 4}]}}


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: dict) -> str:
    with pytest.raises(InputError) as info:
        parse_scenario(data, SRC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}: ")
    return message


def merged(*parts: dict) -> dict:
    """Deep-merge small scenario fragments (later wins)."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- defaults


def test_empty_file_gives_all_defaults(tmp_path):
    scenario = load_scenario(write(tmp_path, ""))
    assert scenario == Scenario()
    assert scenario.training.rounds == 15
    assert scenario.fusion.rule == "quality"
    assert num_clients(scenario) == 10
    assert tier_names(scenario) == ["device"]


def test_minimal_file_with_counts_resolves_num_clients():
    scenario = parse_scenario(TWO_TIERS, SRC)
    assert scenario.fleet.num_clients == 10
    assert tier_counts(scenario) == {"phone": 6, "laptop": 4}
    assert scenario.model == Scenario().model


def test_ints_are_accepted_for_floats_and_converted():
    scenario = parse_scenario({"training": {"deadline_s": 7}, "model": {"tol": 1}}, SRC)
    assert scenario.training.deadline_s == 7.0 and isinstance(scenario.training.deadline_s, float)
    assert isinstance(scenario.model.tol, float)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    scenario = load_scenario(write(tmp_path, "model:\n  tol: 1e-4\n"))
    assert scenario.model.tol == pytest.approx(1e-4)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_known_solvers_are_accepted(solver):
    assert parse_scenario({"model": {"solver": solver}}, SRC).model.solver == solver


def test_empty_section_means_defaults():
    assert parse_scenario({"model": None, "fusion": None}, SRC) == Scenario()


# ----------------------------------------------------------------------------------------------- unknown keys


def test_unknown_nested_key_suggests_closest():
    message = error_of({"model": {"solverr": "anderson"}})
    assert "model.solverr: unknown key" in message
    assert "did you mean model.solver?" in message


def test_unknown_deep_key_in_tier_suggests_closest():
    message = error_of({"fleet": {"tiers": [{"name": "a", "count": 2, "compute_gflop": 1.0}]}})
    assert "fleet.tiers.0.compute_gflop: unknown key" in message
    assert "did you mean fleet.tiers.0.compute_gflops?" in message


def test_key_in_the_wrong_section_points_to_the_right_one():
    message = error_of({"rounds": 3})
    assert message == f"{SRC}: rounds: unknown key; did you mean training.rounds?"


def test_unknown_key_without_a_close_match_lists_valid_keys():
    message = error_of({"simulation": {"zzz": 1}})
    assert "simulation.zzz: unknown key" in message
    assert "cpus_per_client" in message and "ray_address" in message


# ----------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize("data, path, fragment", [
    ({"training": {"rounds": True}}, "training.rounds", "must be an integer, got True"),
    ({"training": {"rounds": 2.0}}, "training.rounds", "must be an integer, got 2.0"),
    ({"training": {"rounds": "10"}}, "training.rounds", "must be an integer, got '10'"),
    ({"training": {"deadline_s": False}}, "training.deadline_s", "must be a number"),
    ({"model": {"tol": "small"}}, "model.tol", "must be a number, got 'small'"),
    ({"training": {"warm_start": "yes"}}, "training.warm_start", "must be true or false"),
    ({"dataset": {"name": 7}}, "dataset.name", "must be a string"),
    ({"model": [1, 2]}, "model", "must be a mapping, got a list"),
    ({"fleet": {"tiers": {"name": "a"}}}, "fleet.tiers", "must be a list of tiers"),
    ({"training": {"clients_per_round": True}}, "training.clients_per_round", "must be an integer, got True"),
    ({"simulation": {"num_cpus": 2.5}}, "simulation.num_cpus", "must be an integer or null"),
    ({"model": {"tol": float("inf")}}, "model.tol", "finite"),
])
def test_wrong_types_name_the_key(data, path, fragment):
    message = error_of(data)
    assert f": {path}: " in message
    assert fragment in message


# ----------------------------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize("data, path", [
    ({"training": {"rounds": -3}}, "training.rounds"),
    ({"training": {"rounds": 0}}, "training.rounds"),
    ({"training": {"clients_per_round": 0}}, "training.clients_per_round"),
    ({"training": {"clients_per_round": 11}}, "training.clients_per_round"),
    ({"training": {"clients_per_round": 1.5}}, "training.clients_per_round"),
    ({"training": {"clients_per_round": 0.0}}, "training.clients_per_round"),
    ({"training": {"min_iterations": 0}}, "training.min_iterations"),
    ({"training": {"min_iterations": -2}}, "training.min_iterations"),
    ({"training": {"min_iterations": 5, "max_iterations": 4}}, "training.max_iterations"),
    ({"training": {"min_iterations": 1}}, "training.min_iterations"),  # one-step needs 2
    ({"model": {"backward_iterations": -1}}, "model.backward_iterations"),
    ({"model": {"eval_iterations": 0}}, "model.eval_iterations"),
    ({"training": {"deadline_s": 0}}, "training.deadline_s"),
    ({"training": {"learning_rate": -0.1}}, "training.learning_rate"),
    ({"training": {"momentum": 1.0}}, "training.momentum"),
    ({"model": {"tol": 0.0}}, "model.tol"),
    ({"dataset": {"validation_fraction": 1.0}}, "dataset.validation_fraction"),
    ({"dataset": {"test_fraction": -0.1}}, "dataset.test_fraction"),
    ({"dataset": {"partition": {"kind": "dirichlet", "alpha": 0}}}, "dataset.partition.alpha"),
    ({"dataset": {"partition": {"kind": "pathological", "classes_per_client": 0}}},
     "dataset.partition.classes_per_client"),
    ({"dataset": {"partition": {"kind": "pathological", "classes_per_client": 11}}},
     "dataset.partition.classes_per_client"),
    ({"dataset": {"num_samples": 8}}, "dataset.num_samples"),
    ({"fusion": {"floor": 1.0}}, "fusion.floor"),
    ({"fusion": {"trim_beta": 0.5}}, "fusion.trim_beta"),
    ({"fusion": {"rule": "krum", "krum_malicious": 3}}, "fusion.krum_malicious"),
    ({"simulation": {"cpus_per_client": 0}}, "simulation.cpus_per_client"),
    ({"simulation": {"cpus_per_client": 2, "num_cpus": 1}}, "simulation.num_cpus"),
    ({"seed": -1}, "seed"),
])
def test_impossible_values_name_the_key(data, path):
    message = error_of(data)
    assert f"{SRC}: {path}: must" in message or f"{SRC}: {path}: " in message
    assert "got" in message


def test_range_message_format():
    assert error_of({"training": {"rounds": -3}}) == f"{SRC}: training.rounds: must be an integer >= 1, got -3"


@pytest.mark.parametrize("field, value", [
    ("compute_gflops", 0), ("bandwidth_mbps", -5), ("availability", 0.0), ("availability", 1.2),
    ("dropout", 1.5), ("straggler_prob", -0.1), ("straggler_slowdown", 0.5), ("count", -1),
])
def test_impossible_tier_values_name_the_tier_key(field, value):
    tier = {"name": "phone", "count": 10, field: value}
    message = error_of({"fleet": {"tiers": [tier]}})
    assert f"{SRC}: fleet.tiers.0.{field}: must be" in message


@pytest.mark.parametrize("data, path, choice", [
    ({"dataset": {"partition": {"kind": "dirichlett"}}}, "dataset.partition.kind", "dirichlet"),
    ({"model": {"cell": "conv3d"}}, "model.cell", "conv2d"),
    ({"model": {"contraction": "spectal"}}, "model.contraction", "spectral"),
    ({"model": {"backward": "onestep"}}, "model.backward", "one-step"),
    ({"model": {"solver": "andersen"}}, "model.solver", "anderson"),
    ({"training": {"optimizer": "adamw"}}, "training.optimizer", "adam"),
    ({"fusion": {"rule": "fedavgm"}}, "fusion.rule", "fedavg"),
    ({"fusion": {"score": "residuals"}}, "fusion.score", "residual"),
])
def test_unknown_enum_values_suggest_a_valid_one(data, path, choice):
    message = error_of(data)
    assert f"{SRC}: {path}: must be one of" in message
    assert f"did you mean {choice!r}?" in message


# ----------------------------------------------------------------------------------------------- tiers


def test_duplicate_tier_names():
    message = error_of({"fleet": {"tiers": [{"name": "a", "count": 1}, {"name": "a", "count": 2}]}})
    assert "fleet.tiers.1.name: duplicate tier name 'a'" in message


@pytest.mark.parametrize("tier, fragment", [
    ({"count": 3}, "fleet.tiers.0.name: missing"),
    ({"name": "", "count": 3}, "fleet.tiers.0.name: must be a non-empty string"),
    ({"name": "a"}, "fleet.tiers.0: needs exactly one of count or share"),
    ({"name": "a", "count": 3, "share": 1.0}, "fleet.tiers.0: needs exactly one of count or share"),
])
def test_tier_name_and_size_rules(tier, fragment):
    assert fragment in error_of({"fleet": {"tiers": [tier]}})


def test_shares_must_sum_to_one():
    data = {"fleet": {"num_clients": 10, "tiers": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}}
    assert "fleet.tiers: shares must sum to 1, got 0.9" in error_of(data)


def test_shares_need_num_clients():
    data = {"fleet": {"tiers": [{"name": "a", "share": 1.0}]}}
    assert error_of(data) == f"{SRC}: fleet.num_clients: required when tiers use share"


def test_counts_must_match_num_clients():
    data = merged(TWO_TIERS, {"fleet": {"num_clients": 12}})
    assert "fleet.num_clients: is 12 but the tier counts sum to 10" in error_of(data)


def test_count_and_share_cannot_mix():
    data = {"fleet": {"num_clients": 10, "tiers": [{"name": "a", "count": 5}, {"name": "b", "share": 0.5}]}}
    assert "fleet.tiers: mixes count and share" in error_of(data)


def test_empty_tier_list():
    assert "fleet.tiers: must list at least one tier" in error_of({"fleet": {"tiers": []}})


def test_shares_become_counts_by_largest_remainder():
    tiers = [{"name": n, "share": s} for n, s in [("a", 0.45), ("b", 0.35), ("c", 0.2)]]
    scenario = parse_scenario({"fleet": {"num_clients": 7, "tiers": tiers}}, SRC)
    # exact 3.15 / 2.45 / 1.4 -> floors 3/2/1, the one left over goes to the largest remainder (b)
    assert tier_counts(scenario) == {"a": 3, "b": 3, "c": 1}
    assert num_clients(scenario) == 7


def test_default_clients_per_round_fits_a_small_fleet():
    scenario = parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 5}]}}, SRC)
    assert scenario.training.clients_per_round == 5
    explicit = {"fleet": {"tiers": [{"name": "a", "count": 5}]}, "training": {"clients_per_round": 8}}
    assert "training.clients_per_round: must be an integer in [1, 5]" in error_of(explicit)


def test_equal_shares_sum_exactly():
    tiers = [{"name": n, "share": 1 / 3} for n in "abc"]
    scenario = parse_scenario({"fleet": {"num_clients": 10, "tiers": tiers}, "training": {"clients_per_round": 3}},
                              SRC)
    assert tier_counts(scenario) == {"a": 4, "b": 3, "c": 3}


def test_resolve_tier_unknown_names_key_and_lists_tiers():
    scenario = parse_scenario(TWO_TIERS, SRC)
    assert resolve_tier(scenario, "laptop").count == 4
    with pytest.raises(InputError) as info:
        resolve_tier(scenario, "lapto", source="supernode --node-config", key="tier")
    message = str(info.value)
    assert message.startswith("supernode --node-config: tier: unknown tier 'lapto'")
    assert "did you mean 'laptop'?" in message
    assert "valid tiers: phone, laptop" in message


def training(**keys) -> TrainingConfig:
    return parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 20}]}, "training": keys}, SRC).training


def test_resolve_clients_per_round():
    assert resolve_clients_per_round(training(clients_per_round=8), 20) == 8
    assert resolve_clients_per_round(training(fraction_per_round=0.25), 20) == 5
    assert resolve_clients_per_round(training(fraction_per_round=1.0), 20) == 20
    assert resolve_clients_per_round(training(fraction_per_round=0.001), 20) == 1
    assert resolve_clients_per_round(TrainingConfig(), 5) == 5  # the default count, capped at the fleet size
    assert resolve_clients_per_round(TrainingConfig(), 20) == 8


def test_a_parsed_scenario_holds_the_resolved_count():
    assert training(fraction_per_round=0.25).clients_per_round == 5
    assert training(fraction_per_round=0.25).fraction_per_round == 0.25
    assert training(clients_per_round=3).clients_per_round == 3
    assert training().clients_per_round == 8 and training().fraction_per_round is None


@pytest.mark.parametrize("value", [0.1, 1.0, 3.0])
def test_a_float_count_points_to_fraction_per_round(value):
    message = error_of({"training": {"clients_per_round": value}})
    assert message == (f"{SRC}: training.clients_per_round: must be an integer (a count of clients), got {value}; "
                       f"for a fraction of the fleet use training.fraction_per_round")


def test_count_and_fraction_cannot_both_be_given():
    message = error_of({"training": {"clients_per_round": 4, "fraction_per_round": 0.5}})
    assert message.startswith(f"{SRC}: training.fraction_per_round: ")
    assert "training.clients_per_round" in message and "not both" in message


@pytest.mark.parametrize("value, fragment", [
    (0, "must be a number in (0, 1], got 0.0"), (1.5, "must be a number in (0, 1], got 1.5"),
    (2, "must be a number in (0, 1], got 2.0"), ("half", "must be a number or null, got 'half' (a string)"),
])
def test_fraction_per_round_range(value, fragment):
    assert error_of({"training": {"fraction_per_round": value}}) == f"{SRC}: training.fraction_per_round: {fragment}"


# ----------------------------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError, match=r"nope\.yaml: no such file$"):
        load_scenario(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_scenario(tmp_path)


def test_broken_yaml_reports_line(tmp_path):
    path = write(tmp_path, "seed: 0\ntraining:\n  rounds: 3\n   batch_size: [1\n")
    with pytest.raises(InputError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4")
    assert "invalid YAML" in message and "\n" not in message


def test_scenario_text_errors_name_the_source():
    with pytest.raises(InputError) as info:
        parse_scenario_text("training:\n  rounds: 0\n", "server message")
    assert str(info.value) == "server message: training.rounds: must be an integer >= 1, got 0"
    with pytest.raises(InputError, match="^server message: top level must be a mapping"):
        parse_scenario_text("3\n", "server message")


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- seed\n- 0\n")
    with pytest.raises(InputError, match="top level must be a mapping of sections, got a list"):
        load_scenario(path)


def test_duplicate_keys_are_rejected(tmp_path):
    path = write(tmp_path, "training:\n  rounds: 3\n  rounds: 4\n")
    with pytest.raises(InputError) as info:
        load_scenario(path)
    assert str(info.value) == f"{path}: line 3: training.rounds: duplicate key"


def test_file_errors_name_file_and_key(tmp_path):
    path = write(tmp_path, "training:\n  rounds: -3\n")
    with pytest.raises(InputError) as info:
        validate_file(path)
    assert str(info.value) == f"{path}: training.rounds: must be an integer >= 1, got -3"


# ----------------------------------------------------------------------------------------------- overrides


def test_overrides_set_nested_values(tmp_path):
    path = write(tmp_path, yaml.safe_dump(TWO_TIERS))
    scenario = load_scenario(path, [
        "training.rounds=3", "model.tol=1e-5", "fusion.rule=fedavg", "seed=7",
        "dataset.partition.kind=dirichlet", "fleet.tiers.laptop.compute_gflops=2", "fleet.tiers.0.availability=0.5",
    ])
    assert scenario.training.rounds == 3
    assert scenario.model.tol == pytest.approx(1e-5)
    assert scenario.fusion.rule == "fedavg"
    assert scenario.seed == 7
    assert scenario.dataset.partition.kind == "dirichlet"
    assert resolve_tier(scenario, "laptop").compute_gflops == 2.0
    assert resolve_tier(scenario, "phone").availability == 0.5


def test_override_into_default_tiers(tmp_path):
    scenario = load_scenario(write(tmp_path, ""), ["fleet.tiers.device.dropout=0.25"])
    assert scenario.fleet.tiers[0].dropout == 0.25
    assert scenario.fleet.num_clients == 10


@pytest.mark.parametrize("item, fragment", [
    ("model.solverr=broyden", "--set model.solverr: unknown key model.solverr; did you mean model.solver?"),
    ("trainig.rounds=3", "--set trainig.rounds: unknown key trainig; did you mean training?"),
    ("fleet.tiers.tablet.count=3", "unknown tier 'tablet'"),
    ("seed.x=1", "--set seed.x: seed has no sub-keys"),
    ("training.rounds", "expected dotted.key=value"),
])
def test_bad_overrides_name_the_key(tmp_path, item, fragment):
    path = write(tmp_path, yaml.safe_dump(TWO_TIERS))
    with pytest.raises(InputError) as info:
        load_scenario(path, [item])
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)


def test_override_with_bad_value_is_checked_like_the_file(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(InputError) as info:
        load_scenario(path, ["training.rounds=-3"])
    assert str(info.value) == f"{path}: training.rounds: must be an integer >= 1, got -3"


# ----------------------------------------------------------------------------------------------- shipped files, round trip


def test_all_four_scenarios_are_shipped():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "heterogeneous-fleet.yaml", "digits-iid.yaml",
                                         "large-fleet.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_scenarios_validate_and_round_trip(path, tmp_path):
    scenario = validate_file(path)
    assert path.read_text(encoding="utf-8").startswith("#"), "each scenario starts with a comment header"
    text = dump_scenario(scenario)
    assert parse_scenario(yaml.safe_load(text), "dumped") == scenario
    assert parse_scenario_text(text, "message") == scenario
    written = tmp_path / "resolved.yaml"
    assert dump_scenario(scenario, written) == text
    assert load_scenario(written) == scenario
    assert load_scenario(written).to_dict() == scenario.to_dict()


def test_shipped_scenarios_meet_their_briefs():
    default = validate_file(SCENARIOS / "default.yaml")
    assert num_clients(default) == 20 and len(default.fleet.tiers) == 3
    hetero = validate_file(SCENARIOS / "heterogeneous-fleet.yaml")
    assert num_clients(hetero) >= 100 and len(hetero.fleet.tiers) == 4
    assert hetero.dataset.partition.kind == "dirichlet" and hetero.dataset.partition.alpha == 0.3
    assert any(t.straggler_prob > 0 for t in hetero.fleet.tiers)
    assert any(t.availability < 1 for t in hetero.fleet.tiers)
    digits = validate_file(SCENARIOS / "digits-iid.yaml")
    assert (digits.dataset.name, digits.model.cell, digits.dataset.partition.kind) == ("digits", "mlp", "iid")
    large = validate_file(SCENARIOS / "large-fleet.yaml")
    assert num_clients(large) == 1000 and large.training.clients_per_round == 50


def test_round_trip_keeps_non_default_values():
    tiers = [{"name": "a", "share": 0.3, "straggler_prob": 0.2, "straggler_slowdown": 2.5},
             {"name": "b", "share": 0.7}]
    data = {"seed": 3, "fleet": {"num_clients": 30, "tiers": tiers},
            "training": {"fraction_per_round": 0.3}, "dataset": {"image_key": "img"},
            "simulation": {"ray_address": "auto", "num_cpus": 2}}
    scenario = parse_scenario(data, SRC)
    text = dump_scenario(scenario)
    again = parse_scenario(yaml.safe_load(text), SRC)
    assert again == scenario
    assert again.training.fraction_per_round == 0.3 and again.training.clients_per_round == 9
    assert "fraction_per_round: 0.3" in text and "clients_per_round" not in text  # the count is derived
    assert again.fleet.tiers[0].count is None
    assert again.model_dump() == scenario.model_dump()


def test_scenario_is_frozen():
    scenario = Scenario()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        scenario.training.rounds = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        scenario.fleet.tiers[0].name = "x"  # type: ignore[misc]
    assert isinstance(scenario.fleet.tiers, tuple)


def test_model_copy_derives_a_changed_scenario():
    scenario = parse_scenario(TWO_TIERS, SRC)
    faster = scenario.model_copy(update={"training": scenario.training.model_copy(update={"rounds": 3})})
    assert faster.training.rounds == 3 and scenario.training.rounds == 15
    assert faster.fleet is scenario.fleet


# ----------------------------------------------------------------------------------------------- parse once


def test_scenario_text_is_parsed_once_per_process(monkeypatch):
    from fed_deq.scenario import load

    text = dump_scenario(parse_scenario(TWO_TIERS, SRC))
    parse_scenario_text.cache_clear()
    first = parse_scenario_text(text)
    validations = []
    monkeypatch.setattr(load, "parse_scenario", lambda *args: validations.append(args))
    assert parse_scenario_text(text) is first
    assert validations == []  # the second call neither parsed the YAML nor validated it again
    assert parse_scenario_text(text + "\n") is None and len(validations) == 1  # other text: validated
    parse_scenario_text.cache_clear()


# ----------------------------------------------------------------------------------------------- trust


@pytest.mark.parametrize("backward", ["one-step", "phantom", "implicit"])
def test_a_budget_of_one_iteration_is_refused_in_every_backward_mode(backward):
    message = error_of({"model": {"backward": backward}, "training": {"min_iterations": 1}})
    assert message.startswith(f"{SRC}: training.min_iterations: must be >= 2 with model.backward {backward}")


def test_probe_score_needs_probe_samples():
    message = error_of({"fusion": {"rule": "quality", "score": "probe", "probe_samples": 0}})
    assert message == f"{SRC}: fusion.probe_samples: must be >= 1 with fusion.score probe, got 0"
    assert parse_scenario({"fusion": {"score": "residual", "probe_samples": 0}}, SRC).fusion.probe_samples == 0


def test_the_probe_set_counts_against_the_training_samples():
    message = error_of({"dataset": {"num_samples": 300}, "fusion": {"probe_samples": 235}})
    assert "dataset.num_samples: must leave at least" in message


ADVERSARY = {"tier": "phone", "count": 1, "attack": "fake_time"}


def test_adversaries_parse_and_round_trip():
    data = merged(TWO_TIERS, {"adversaries": [ADVERSARY, {"tier": "laptop", "share": 0.5, "attack": "crash"}]})
    scenario = parse_scenario(data, SRC)
    assert [(a.tier, a.attack, a.count, a.share) for a in scenario.adversaries] == [
        ("phone", "fake_time", 1, None), ("laptop", "crash", None, 0.5)]
    assert parse_scenario_text(dump_scenario(scenario)) == scenario
    assert parse_scenario(TWO_TIERS, SRC).adversaries == ()
    assert parse_scenario(merged(TWO_TIERS, {"adversaries": None}), SRC).adversaries == ()


@pytest.mark.parametrize("entry, fragment", [
    ({**ADVERSARY, "tier": "phon"}, "adversaries.0.tier: unknown tier 'phon'; did you mean 'phone'?"),
    ({**ADVERSARY, "attack": "fake_tim"}, "adversaries.0.attack: must be one of"),
    ({"tier": "phone", "count": 1}, "adversaries.0.attack: missing (required)"),
    ({"tier": "phone", "attack": "crash"}, "adversaries.0: needs exactly one of count or share"),
    ({**ADVERSARY, "share": 0.5}, "adversaries.0: needs exactly one of count or share"),
    ({**ADVERSARY, "count": 99}, "adversaries.0.count: 99 adversaries planted in tier 'phone', which has 6 devices"),
    ({**ADVERSARY, "count": -1}, "adversaries.0.count: must be an integer >= 0"),
    ({**ADVERSARY, "bogus": 1}, "adversaries.0.bogus: unknown key"),
])
def test_bad_adversaries_name_the_dotted_key(entry, fragment):
    assert fragment in error_of(merged(TWO_TIERS, {"adversaries": [entry]}))


def test_adversaries_must_be_a_list():
    assert "adversaries: must be a list of entries" in error_of({"adversaries": {"tier": "x"}})


def test_adversary_override_by_index(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(merged(TWO_TIERS, {"adversaries": [ADVERSARY]})))
    assert load_scenario(path, ["adversaries.0.count=2"]).adversaries[0].count == 2
    with pytest.raises(InputError, match="no entry '3'"):
        load_scenario(path, ["adversaries.3.count=2"])
