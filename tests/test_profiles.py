"""Device profiles: the shipped table, ``fleet.tiers[].profile`` in the schema, and the scenarios that use them."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import yaml

from fed_deq import profiles
from fed_deq.errors import InputError
from fed_deq.fleet import build_fleet
from fed_deq.profiles import PROFILES, link_mbps, training_gflops
from fed_deq.scenario import dump_scenario, load_scenario, parse_scenario, parse_scenario_text, scenario_json_schema

SRC = "scenarios/x.yaml"
SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def fleet_of(*tiers: dict) -> dict:
    return {"fleet": {"tiers": list(tiers)}}


# ----------------------------------------------------------------------------------------------- the table


def test_the_conversions_follow_the_documented_conventions():
    # 3 x forward, forward = 2 x MACs: 1e9 MACs per sample, batch 10, 2 s per batch -> 30 GFLOP/s.
    assert training_gflops(forward_macs=1e9, batch=10, seconds_per_batch=2.0) == pytest.approx(30.0)
    # The harmonic mean moves a model down at d and up at u in the same total time as 2 moves at one rate.
    down, up = 85.73, 45.74
    assert 2 / link_mbps(down, up) == pytest.approx(1 / down + 1 / up)


def test_every_figure_is_its_cited_measurement_converted():
    assert profiles.FEMNIST_CNN_MACS == 17_211_904  # the FLASH/LEAF FEMNIST CNN, layer by layer
    expected = {
        "phone-low": (1.033 / 1.642, 59.7), "phone-mid": (1.033 / 0.588, 59.7),
        "phone-flagship": (1.033 / 0.179, 59.7), "rpi-4": (172.8 / 10.92, 59.7), "rpi-5": (172.8 / 5.84, 59.7),
        "laptop-cpu": (4176.2 / 6463.2 * 1000, 59.7), "edge-server": (4176.2 / 345.0 * 1000, 1000.0),
    }
    assert set(PROFILES) == set(expected)
    for name, (gflops, mbps) in expected.items():
        assert PROFILES[name].compute_gflops == pytest.approx(gflops, rel=2e-3), name
        assert PROFILES[name].bandwidth_mbps == pytest.approx(mbps, rel=1e-3), name
        assert PROFILES[name].description


def test_phones_sit_in_the_published_range_and_set_only_sourced_keys():
    phones = [PROFILES[name] for name in ("phone-low", "phone-mid", "phone-flagship")]
    # Published on-device federated training: about 0.6 to 6 GFLOP/s, slow to fast.
    assert [p.compute_gflops for p in phones] == sorted(p.compute_gflops for p in phones)
    assert 0.6 <= phones[0].compute_gflops and phones[-1].compute_gflops <= 6.0
    assert all(p.dropout == 0.08 for p in phones)
    # No public per-round reachability exists: no profile sets availability, boards and servers no dropout.
    assert all("availability" not in p.figures() for p in PROFILES.values())
    assert "dropout" not in PROFILES["rpi-5"].figures()
    assert set(PROFILES["rpi-5"].figures()) == {"compute_gflops", "bandwidth_mbps"}


def test_the_table_is_read_only():
    with pytest.raises(TypeError):
        PROFILES["toaster"] = PROFILES["rpi-5"]  # type: ignore[index]


# ----------------------------------------------------------------------------------------------- the schema


def test_a_profile_fills_the_keys_the_tier_leaves_out():
    scenario = parse_scenario(fleet_of({"name": "p", "count": 3, "profile": "phone-mid"}), SRC)
    tier = scenario.fleet.tiers[0]
    assert (tier.profile, tier.compute_gflops, tier.bandwidth_mbps, tier.dropout) == ("phone-mid", 1.76, 59.7, 0.08)
    assert tier.availability == 1.0 and tier.straggler_prob == 0.0  # not in the profile: schema defaults
    assert {d.compute_flops for d in build_fleet(scenario)} == {1.76e9}


def test_keys_given_in_the_tier_win_even_when_they_equal_the_default():
    tier = {"name": "p", "count": 3, "profile": "phone-mid", "dropout": 0.0, "compute_gflops": 2.5}
    parsed = parse_scenario(fleet_of(tier), SRC).fleet.tiers[0]
    assert (parsed.dropout, parsed.compute_gflops, parsed.bandwidth_mbps) == (0.0, 2.5, 59.7)


def test_a_tier_without_a_profile_keeps_the_old_defaults():
    tier = parse_scenario(fleet_of({"name": "p", "count": 3}), SRC).fleet.tiers[0]
    assert (tier.profile, tier.compute_gflops, tier.bandwidth_mbps, tier.dropout) == (None, 1.0, 10.0, 0.0)


@pytest.mark.parametrize("value, message", [
    ("phone-mdi", "fleet.tiers.1.profile: must be one of phone-low, phone-mid, phone-flagship, rpi-4, rpi-5, "
                  "laptop-cpu, edge-server, got 'phone-mdi'; did you mean 'phone-mid'?"),
    ("toaster", "fleet.tiers.1.profile: must be one of"),
    (3, "fleet.tiers.1.profile: must be a string or null, got 3 (an integer)"),
])
def test_an_unknown_profile_is_one_line_naming_its_key(value, message):
    data = fleet_of({"name": "a", "count": 1}, {"name": "b", "count": 1, "profile": value})
    with pytest.raises(InputError) as info:
        parse_scenario(data, SRC)
    assert str(info.value).startswith(f"{SRC}: {message}")
    assert "\n" not in str(info.value)


def test_an_unknown_profile_is_exit_2_from_the_command_line(tmp_path, capsys):
    from tools.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("fleet:\n  tiers:\n    - {name: a, count: 2, profile: rpi-6}\n", encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "fleet.tiers.0.profile" in err and "did you mean 'rpi-5'?" in err


def test_a_dumped_scenario_parses_back_to_the_same_scenario():
    data = fleet_of({"name": "p", "share": 0.6, "profile": "phone-low", "availability": 0.7},
                    {"name": "q", "share": 0.4})
    data["fleet"]["num_clients"] = 10
    scenario = parse_scenario(data, SRC)
    text = dump_scenario(scenario)
    tiers = yaml.safe_load(text)["fleet"]["tiers"]
    assert tiers[0]["profile"] == "phone-low" and tiers[0]["compute_gflops"] == 0.629  # resolved figures kept
    assert "profile" not in tiers[1]  # no profile: no key, as a hand-written file would read
    assert parse_scenario_text(text, "dumped") == scenario


def test_set_can_switch_a_tier_to_a_profile(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("fleet:\n  tiers:\n    - {name: board, count: 2}\n", encoding="utf-8")
    tier = load_scenario(path, ["fleet.tiers.board.profile=rpi-5"]).fleet.tiers[0]
    assert (tier.profile, tier.compute_gflops) == ("rpi-5", 29.6)


def test_the_json_schema_lists_the_profiles():
    prop = scenario_json_schema()["$defs"]["TierConfig"]["properties"]["profile"]
    [names] = [option["enum"] for option in prop["anyOf"] if "enum" in option]
    assert names == list(PROFILES)
    assert {"type": "null"} in prop["anyOf"]


# ----------------------------------------------------------------------------------------------- shipped scenarios


@pytest.mark.parametrize("name", ["default.yaml", "heterogeneous-fleet.yaml", "large-fleet.yaml", "digits-iid.yaml"])
def test_shipped_fleets_are_built_from_profiles(name):
    scenario = load_scenario(SCENARIOS / name)
    for tier in scenario.fleet.tiers:
        assert tier.profile in PROFILES, tier.name
        figures = PROFILES[tier.profile].figures()
        assert tier.compute_gflops == figures["compute_gflops"], f"{name}: {tier.name} overrides its speed"


def test_the_flagship_fleet_gives_each_tier_a_different_budget():
    from fed_deq.rounds import RoundDriver

    scenario = load_scenario(SCENARIOS / "heterogeneous-fleet.yaml")
    budgets: dict[str, list[int]] = {}
    for facts in RoundDriver(scenario).facts.values():
        budgets.setdefault(facts.tier, []).append(facts.budget.total)
    medians = [statistics.median(budgets[tier.name]) for tier in scenario.fleet.tiers]
    # Tiers are listed slow to fast; the header comment states these medians: 2, 5, 29, 30.
    assert medians == sorted(medians) and len(set(medians)) == len(medians), medians
    assert medians[0] == scenario.training.min_iterations
    assert medians[-1] == scenario.training.max_iterations
