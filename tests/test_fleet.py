"""Devices, budgets, the simulated clock and the seeded fleet draws."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fed_deq.seeding import rng
from fed_deq.fleet import (
    Budget,
    Device,
    build_fleet,
    comm_seconds,
    compute_seconds,
    max_work,
    model_bytes,
    plan_budget,
    plan_round,
    round_time,
    split_budget,
    straggler_slowdown,
    work_flops,
)
from fed_deq.scenario import load_scenario, parse_scenario, tier_counts

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"

# Cost figures of the default model, build_model(cell="conv1d", input_shape=(40,), width=32): per sample,
# cell_flops() = 2*32*32*3*40 = 245,760 and overhead_flops() = 38,400; per call of the spectral normalisation
# (forward + backward) norm_flops() ~ 14.0 MFLOP; Anderson's own work per sample and step (m = 5, D = 1280)
# solver_flops("anderson") ~ 25.7 kFLOP; 16,138 parameters. Kept as numbers so this file stays free of torch
# (tests/test_clock.py checks them against the model); default.yaml is calibrated against them.
CELL_FLOPS = 245_760
OVERHEAD_FLOPS = 38_400
NORM_FLOPS = 14_007_754
SOLVER_FLOPS = 25_733
DEFAULT_MODEL_PARAMS = 16_138
BATCH_SIZE = 32


def device(gflops: float = 0.1, mbps: float = 10.0, *, pid: int = 0, availability: float = 1.0,
           dropout: float = 0.0, straggler_prob: float = 0.0, slowdown: float = 1.0) -> Device:
    return Device(partition_id=pid, tier="t", compute_flops=gflops * 1e9, bandwidth_bps=mbps * 1e6,
                  availability=availability, dropout=dropout, straggler_prob=straggler_prob,
                  straggler_slowdown=slowdown)


def budget_for(dev: Device, *, deadline_s: float = 10.0, comm_s: float = 0.1, backward: str = "one-step",
               backward_iterations: int = 4, min_iterations: int = 2, max_iterations: int = 30,
               samples: int = 160) -> Budget:
    return plan_budget(dev, deadline_s=deadline_s, comm_s=comm_s, samples=samples, epochs=1,
                       cell_flops=CELL_FLOPS, overhead_flops=OVERHEAD_FLOPS, backward=backward,
                       backward_iterations=backward_iterations, min_iterations=min_iterations,
                       max_iterations=max_iterations, batch_size=BATCH_SIZE, norm_flops=NORM_FLOPS,
                       solver_flops=SOLVER_FLOPS)


def bound_flops(budget: Budget, *, backward: str = "one-step", samples: int = 160, epochs: int = 1) -> float:
    """What the planner charges for a budget: the FLOPs of the most work it allows."""
    counts = max_work(samples=samples, batch_size=BATCH_SIZE, epochs=epochs, forward=budget.forward,
                      backward=budget.backward, backward_mode=backward)
    return work_flops(counts, cell_flops=CELL_FLOPS, overhead_flops=OVERHEAD_FLOPS, norm_flops=NORM_FLOPS,
                      solver_flops=SOLVER_FLOPS)


def tiered_scenario(seed: int = 0, **tier_extra) -> object:
    tiers = [{"name": "weak", "count": 12, **tier_extra}, {"name": "mid", "count": 5}, {"name": "strong", "count": 3}]
    return parse_scenario({"seed": seed, "fleet": {"tiers": tiers}}, "test")


# ----------------------------------------------------------------------------------------------- rng


def test_rng_is_deterministic_and_keyed():
    assert rng(3, "a", 1).random() == rng(3, "a", 1).random()
    draws = {rng(3, "a", 1).random(), rng(4, "a", 1).random(), rng(3, "b", 1).random(), rng(3, "a", 2).random()}
    assert len(draws) == 4


def test_rng_keys_do_not_collide_on_padding_or_type():
    # SeedSequence alone would treat [s, "x", 0] like [s, "x"] and cannot tell "1" from 1.
    assert rng(0, "x", 0).random() != rng(0, "x").random()
    assert rng(0, 1).random() != rng(0, "1").random()
    assert rng(0, "ab").random() != rng(0, "a", "b").random()


def test_rng_accepts_numpy_ints_and_rejects_bad_keys():
    assert rng(np.int64(5), np.int64(2)).random() == rng(5, 2).random()
    with pytest.raises(ValueError):
        rng(-1)
    with pytest.raises(TypeError):
        rng(0, True)
    with pytest.raises(TypeError):
        rng(0, 1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- fleet


def test_build_fleet_matches_tiers_and_mixes_them():
    scenario = tiered_scenario()
    fleet = build_fleet(scenario)
    assert [d.partition_id for d in fleet] == list(range(20))
    assert Counter(d.tier for d in fleet) == Counter(tier_counts(scenario))
    labels = [d.tier for d in fleet]
    assert labels != sorted(labels, key=["weak", "mid", "strong"].index), "tiers must be shuffled over ids"


def test_build_fleet_converts_units():
    scenario = parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 2, "compute_gflops": 0.5,
                                                    "bandwidth_mbps": 8, "availability": 0.7, "dropout": 0.1,
                                                    "straggler_prob": 0.2, "straggler_slowdown": 3}]}}, "t")
    dev = build_fleet(scenario)[1]
    assert dev == Device(1, "a", 0.5e9, 8e6, 0.7, 0.1, 0.2, 3.0)


def test_build_fleet_is_deterministic_per_seed():
    assert build_fleet(tiered_scenario(0)) == build_fleet(tiered_scenario(0))
    tiers_by_seed = {tuple(d.tier for d in build_fleet(tiered_scenario(seed))) for seed in range(5)}
    assert len(tiers_by_seed) > 1


# ----------------------------------------------------------------------------------------------- costs


def test_model_bytes_and_comm_seconds():
    assert model_bytes(25_000) == 100_000
    # 100 kB down + 100 kB up = 1.6 Mbit at 8 Mbit/s
    assert comm_seconds(device(mbps=8), 100_000) == pytest.approx(0.2)


def test_compute_seconds():
    assert compute_seconds(device(gflops=1.0), 2e9) == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("total, backward, k, expected", [
    (8, "one-step", 4, Budget(7, 1)),
    (2, "one-step", 4, Budget(1, 1)),
    (8, "phantom", 4, Budget(4, 4)),
    (3, "phantom", 4, Budget(1, 2)),
    (1, "phantom", 4, Budget(1, 0)),
    (8, "implicit", 3, Budget(5, 3)),
    (5, "implicit", 4, Budget(3, 2)),
    (1, "implicit", 4, Budget(1, 0)),
])
def test_split_rules_per_backward_mode(total, backward, k, expected):
    budget = split_budget(total, backward, k)
    assert budget == expected
    assert budget.total == total and budget.forward >= 1


def test_split_rejects_impossible_budgets():
    with pytest.raises(ValueError):
        split_budget(1, "one-step", 4)
    with pytest.raises(ValueError):
        split_budget(5, "adjoint", 4)


@pytest.mark.parametrize("backward", ["one-step", "phantom", "implicit"])
def test_budget_is_monotone_in_speed_and_deadline_and_bounded(backward):
    speeds = np.geomspace(0.005, 5.0, 25)
    totals = [budget_for(device(g), backward=backward).total for g in speeds]
    assert totals == sorted(totals)
    assert totals[0] == 2 and totals[-1] == 30, "slowest pinned to the min, fastest to the max"
    deadlines = np.linspace(0.5, 60, 25)
    totals = [budget_for(device(0.1), deadline_s=d, backward=backward).total for d in deadlines]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert all(2 <= t <= 30 for t in totals)


@pytest.mark.parametrize("backward", ["one-step", "phantom", "implicit"])
def test_budget_is_the_largest_that_fits(backward):
    dev = device(0.1)
    budget = budget_for(dev, backward=backward)
    assert 2 < budget.total < 30

    def seconds(total: int) -> float:
        return compute_seconds(dev, bound_flops(split_budget(total, backward, 4), backward=backward))

    assert seconds(budget.total) <= 10.0 - 0.1 < seconds(budget.total + 1)
    assert budget == split_budget(budget.total, backward, 4)


def test_budget_falls_back_to_min_when_nothing_fits():
    budget = budget_for(device(0.0001), min_iterations=3)
    assert budget == Budget(2, 1)
    assert budget_for(device(1.0), comm_s=20.0, min_iterations=3).total == 3  # communication eats the deadline


def test_budget_respects_max():
    assert budget_for(device(100.0), max_iterations=12, backward="implicit") == Budget(8, 4)


def test_default_scenario_tiers_get_increasing_budgets_within_bounds():
    # With the whole-batch clock (fleet.work_flops of fleet.max_work) default.yaml's device profiles give the
    # budgets its comment states: phone-low 3-4, phone-mid 14-18, phone-flagship 24 = max_iterations (at about
    # 110 samples; iid sizes vary a little).
    scenario = load_scenario(DEFAULT_YAML)
    training = scenario.training
    for samples in (106, 110, 114):  # 122 per client (after the server's probe and validation sets) minus 10%
        for num_params in (DEFAULT_MODEL_PARAMS, 2 * DEFAULT_MODEL_PARAMS):
            totals = []
            for tier in scenario.fleet.tiers:
                dev = next(d for d in build_fleet(scenario) if d.tier == tier.name)
                comm = comm_seconds(dev, model_bytes(num_params))
                budget = plan_budget(
                    dev, deadline_s=training.deadline_s, comm_s=comm,
                    samples=samples, epochs=training.local_epochs, cell_flops=CELL_FLOPS,
                    overhead_flops=OVERHEAD_FLOPS, backward=scenario.model.backward,
                    backward_iterations=scenario.model.backward_iterations,
                    min_iterations=training.min_iterations, max_iterations=training.max_iterations,
                    batch_size=training.batch_size, norm_flops=NORM_FLOPS, solver_flops=SOLVER_FLOPS)
                totals.append(budget.total)
                bound = bound_flops(budget, backward=scenario.model.backward, samples=samples,
                                    epochs=training.local_epochs)
                assert comm + compute_seconds(dev, bound) <= training.deadline_s, f"{tier.name} overruns"
            assert totals == sorted(set(totals)), f"not strictly increasing weak->strong: {totals}"
            assert all(training.min_iterations <= t <= training.max_iterations for t in totals)
            weak, middle, strong = totals
            assert 3 <= weak <= 4 and 14 <= middle <= 18 and strong == training.max_iterations == 24, totals


# ----------------------------------------------------------------------------------------------- rounds


def test_plan_round_is_consistent_and_deterministic():
    fleet = build_fleet(tiered_scenario(availability=0.5, dropout=0.3))
    plan = plan_round(fleet, seed=0, round=1, clients_per_round=8)
    assert plan == plan_round(fleet, seed=0, round=1, clients_per_round=8)
    assert plan.sampled == sorted(plan.sampled) and plan.available == sorted(plan.available)
    assert set(plan.sampled) <= set(plan.available)
    assert set(plan.dropped_out) <= set(plan.sampled)
    assert len(plan.sampled) == min(8, len(plan.available))
    assert plan.active == [p for p in plan.sampled if p not in plan.dropped_out]
    assert all(isinstance(p, int) for p in plan.sampled)


def test_plan_round_differs_across_seeds_and_rounds():
    fleet = build_fleet(tiered_scenario())
    by_seed = {tuple(plan_round(fleet, seed=s, round=1, clients_per_round=8).sampled) for s in range(6)}
    by_round = {tuple(plan_round(fleet, seed=0, round=r, clients_per_round=8).sampled) for r in range(6)}
    assert len(by_seed) > 1 and len(by_round) > 1


def test_plan_round_does_not_depend_on_call_order():
    fleet = build_fleet(tiered_scenario(availability=0.6, dropout=0.2))
    forward = [plan_round(fleet, seed=2, round=r, clients_per_round=5) for r in range(1, 6)]
    backward = [plan_round(fleet, seed=2, round=r, clients_per_round=5) for r in reversed(range(1, 6))]
    assert forward == list(reversed(backward))


def test_unavailable_tier_is_never_sampled():
    fleet = build_fleet(tiered_scenario(availability=1e-9))
    weak = {d.partition_id for d in fleet if d.tier == "weak"}
    for r in range(100):
        plan = plan_round(fleet, seed=0, round=r, clients_per_round=8)
        assert not weak & set(plan.available)
        assert len(plan.sampled) == 8  # the other 8 devices are always there


def test_plan_round_fraction_and_shortage():
    fleet = build_fleet(tiered_scenario())
    quarter = parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 20}]},
                              "training": {"fraction_per_round": 0.25}}, "test")
    assert quarter.training.clients_per_round == 5  # the fraction resolved to a count for the planner
    assert len(plan_round(fleet, seed=0, round=0, clients_per_round=quarter.training.clients_per_round).sampled) == 5
    assert plan_round(fleet, seed=0, round=0, clients_per_round=20).sampled == list(range(20))
    assert plan_round(fleet, seed=0, round=0, clients_per_round=25).sampled == list(range(20))
    scarce = build_fleet(tiered_scenario(availability=1e-9))
    assert len(plan_round(scarce, seed=0, round=0, clients_per_round=19).sampled) == 8


@pytest.mark.parametrize("fraction", [0.25, 1.0, True])
def test_plan_round_takes_a_count_only(fraction):
    with pytest.raises(ValueError, match="integer count"):
        plan_round(build_fleet(tiered_scenario()), seed=0, round=0, clients_per_round=fraction)


def test_dropout_extremes():
    always = build_fleet(parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 6, "dropout": 1.0}]}}, "t"))
    plan = plan_round(always, seed=0, round=3, clients_per_round=4)
    assert plan.dropped_out == plan.sampled and plan.active == []
    never = build_fleet(parse_scenario({"fleet": {"tiers": [{"name": "a", "count": 6}]}}, "t"))
    assert plan_round(never, seed=0, round=3, clients_per_round=4).dropped_out == []


# ----------------------------------------------------------------------------------------------- stragglers and clock


def test_straggler_draws():
    never = device(straggler_prob=0.0, slowdown=3.0)
    always = device(straggler_prob=1.0, slowdown=3.0)
    assert {straggler_slowdown(never, seed=0, round=r) for r in range(50)} == {1.0}
    assert {straggler_slowdown(always, seed=0, round=r) for r in range(50)} == {3.0}
    sometimes = device(straggler_prob=0.3, slowdown=2.0)
    hits = [straggler_slowdown(sometimes, seed=1, round=r) for r in range(2000)]
    assert set(hits) == {1.0, 2.0}
    assert 0.25 < hits.count(2.0) / len(hits) < 0.35


def test_straggler_draws_are_keyed_not_ordered():
    devices = [device(pid=i, straggler_prob=0.5, slowdown=2.0) for i in range(30)]
    first = [straggler_slowdown(d, seed=4, round=2) for d in devices]
    second = [straggler_slowdown(d, seed=4, round=2) for d in reversed(devices)][::-1]
    assert first == second
    other_seed = [straggler_slowdown(d, seed=5, round=2) for d in devices]
    other_round = [straggler_slowdown(d, seed=4, round=3) for d in devices]
    assert first != other_seed and first != other_round


def test_round_time():
    accepted, seconds = round_time([3.0, 7.5, 5.0], 10.0)
    assert accepted.tolist() == [True, True, True] and seconds == 7.5
    accepted, seconds = round_time([3.0, 12.0, float("inf")], 10.0)
    assert accepted.tolist() == [True, False, False] and seconds == 10.0
    accepted, seconds = round_time([11.0, 30.0], 10.0)
    assert not accepted.any() and seconds == 10.0
    accepted, seconds = round_time([], 10.0)
    assert accepted.size == 0 and seconds == 10.0
    with pytest.raises(ValueError):
        round_time([-1.0], 10.0)


def test_a_slowed_device_becomes_a_straggler():
    dev = device(0.075, 20, straggler_prob=1.0, slowdown=3.0)
    comm = comm_seconds(dev, model_bytes(30_000))
    budget = budget_for(dev, comm_s=comm)
    nominal = comm + compute_seconds(dev, bound_flops(budget))
    slowed = comm + (nominal - comm) * straggler_slowdown(dev, seed=0, round=1)
    accepted, seconds = round_time([nominal, slowed], 10.0)
    assert nominal <= 10.0 < slowed
    assert accepted.tolist() == [True, False] and seconds == 10.0
