"""fusion.tier_weights: the quality rule's per-tier multipliers, checked by hand on tiny arrays; what happens when
every accepted client weighs 0; the scenario key and its errors; the driver handing each client's tier over."""

from __future__ import annotations

import numpy as np
import pytest

from clients.app import app as client_app
from fed_deq import fleet
from fed_deq.errors import InputError
from fed_deq.fusion import quality_weights, tier_multipliers
from fed_deq.results import read_metrics
from fed_deq.rules import FUSION_RULES, FusionInputs
from fed_deq.scenario import load_scenario, parse_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid
from tools.cli import main as cli_main

SRC = "s.yaml"


def test_tier_multipliers_default_to_one():
    np.testing.assert_array_equal(tier_multipliers(["slow", "fast", "slow"], {"fast": 3.0}), [1.0, 3.0, 1.0])
    np.testing.assert_array_equal(tier_multipliers(["slow"], {}), [1.0])


def test_quality_weights_by_hand_with_tier_multipliers():
    # n * q: 10, 10, 20 (equal scores); times tiers 2, 0, 1: 20, 0, 20 -> 0.5, 0, 0.5
    w = quality_weights([10, 10, 20], [0.5, 0.5, 0.5], size_exponent=1.0, quality_exponent=1.0, floor=0.0,
                        multipliers=[2.0, 0.0, 1.0])
    np.testing.assert_allclose(w, [0.5, 0.0, 0.5])
    # Multipliers of 1 change nothing.
    plain = quality_weights([10, 30], [0.2, 0.6], size_exponent=1.0, quality_exponent=1.0, floor=0.0)
    ones = quality_weights([10, 30], [0.2, 0.6], size_exponent=1.0, quality_exponent=1.0, floor=0.0,
                           multipliers=[1.0, 1.0])
    np.testing.assert_array_equal(plain, ones)


def test_every_accepted_client_weighing_zero_is_an_error_not_a_division_by_zero():
    with pytest.raises(InputError, match="tier weight is 0"):
        quality_weights([10, 20], [1.0, 1.0], size_exponent=1.0, quality_exponent=1.0, floor=0.05,
                        multipliers=[0.0, 0.0])
    with pytest.raises(InputError, match="fusion.tier_weights"):
        quality_weights([10, 20], [1.0, 1.0], size_exponent=1.0, quality_exponent=1.0, floor=0.05,
                        multipliers=[1.0, -1.0])
    with pytest.raises(InputError, match="one per client"):
        quality_weights([10, 20], [1.0, 1.0], size_exponent=1.0, quality_exponent=1.0, floor=0.05,
                        multipliers=[1.0])


def test_the_quality_rule_fuses_with_its_tier_weights():
    scenario = parse_scenario({"fleet": {"tiers": [{"name": "slow", "count": 1}, {"name": "fast", "count": 1}]},
                               "fusion": {"tier_weights": {"fast": 3.0}, "floor": 0.0}}, SRC)
    inputs = FusionInputs(reference={"w": np.zeros(2, np.float32)},
                          arrays=[{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 1.0], np.float32)}],
                          sizes=np.array([10.0, 10.0]), local_steps=[1, 1], scores=np.array([1.0, 1.0]),
                          fusion=scenario.fusion, training=scenario.training, tiers=("slow", "fast"))
    fused = FUSION_RULES["quality"].fuse(inputs)
    np.testing.assert_allclose(fused.weights, [0.25, 0.75])  # 10 x 1 : 10 x 3
    np.testing.assert_allclose(fused.arrays["w"], [0.25, 0.75])


def test_tier_weights_key_errors_name_the_dotted_key(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    assert cli_main(["validate", str(path), "--set", "fusion.tier_weights={fsat: 2}"]) == 2
    err = capsys.readouterr().err
    assert "fusion.tier_weights.fsat: unknown tier 'fsat'; did you mean 'fast'?" in err
    assert "valid tiers: slow, fast" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["validate", str(path), "--set", "fusion.tier_weights={slow: -1}"]) == 2
    assert "fusion.tier_weights.slow: must be a number >= 0, got -1.0" in capsys.readouterr().err
    assert cli_main(["validate", str(path), "--set", "fusion.tier_weights={slow: 0, fast: 2.5}"]) == 0
    assert load_scenario(path, ["fusion.tier_weights={fast: 2}"]).fusion.tier_weights == {"fast": 2.0}
    assert parse_scenario({}, SRC).fusion.tier_weights == {}


def run_tiny(tmp_path, weights: str):
    scenario = load_scenario(tmp_path / "tiny.yaml", [f"fusion.tier_weights={weights}"])
    run_federation(FakeGrid(client_app, fleet_size(scenario), seed=scenario.seed), scenario, tmp_path / "run")
    return read_metrics(tmp_path / "run")


def test_a_zero_tier_weight_silences_that_tier_in_a_real_round(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SCENARIO)
    metrics = run_tiny(tmp_path, "{slow: 0}")
    layout = {str(pid): tier for pid, tier in enumerate(fleet.tier_layout(load_scenario(tmp_path / "tiny.yaml")))}
    weighed = [(layout[pid], w) for m in metrics for pid, w in m["fusion_weights"].items()]
    assert {tier for tier, _ in weighed} == {"slow", "fast"}  # both tiers were fused, one of them at 0
    assert all(w == 0.0 for tier, w in weighed if tier == "slow")
    for m in metrics:
        if any(layout[pid] == "fast" for pid in m["fusion_weights"]):
            assert sum(m["fusion_weights"].values()) == pytest.approx(1.0)


def test_a_round_where_every_client_weighs_zero_keeps_the_previous_model_and_says_why(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SCENARIO)
    metrics = run_tiny(tmp_path, "{slow: 0, fast: 0}")
    assert all("tier weight is 0" in m["fusion_error"] for m in metrics)
    assert all(m["previous_model_weight"] == 1.0 and m["fusion_weights"] == {} for m in metrics)
    assert metrics[0]["accuracy"] == metrics[-1]["accuracy"]  # the model never moved


def test_one_tier_weight_can_be_set_from_the_command_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("fleet:\n  tiers:\n    - {name: slow, count: 2}\n    - {name: fast, count: 2}\n"
                    "fusion: {tier_weights: {slow: 0.5}}\n")
    scenario = load_scenario(path, ["fusion.tier_weights.fast=2"])
    assert dict(scenario.fusion.tier_weights) == {"slow": 0.5, "fast": 2}
    with pytest.raises(InputError, match=r"fusion.tier_weights.fsat: unknown tier 'fsat'; did you mean 'fast'"):
        load_scenario(path, ["fusion.tier_weights.fsat=2"])
    with pytest.raises(InputError, match="takes one level of names"):
        load_scenario(path, ["fusion.tier_weights.fast.x=2"])
