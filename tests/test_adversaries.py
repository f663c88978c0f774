"""Every attack, alone and mixed, on the default scenario: caught, named, never weighted, never fatal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from clients.app import app as client_app
from fed_deq import adversary
from fed_deq.rounds import Reply, RoundDriver
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size, run_client_round
from server.federation import run_federation
from tests.fakegrid import FakeGrid
from tests.test_rounds import SYMPTOMS

DEFAULT = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"
#: Attacks that only forge a claim: the fleet with them must train exactly as the fleet without them.
LIES = ("inflate_examples", "fake_residual", "fake_accuracy", "fake_time", "fake_steps")
#: All ten attacks at once, spread over the three tiers of the default fleet.
MIXED = ("adversaries=[{tier: phone-low, count: 1, attack: inflate_examples},"
         " {tier: phone-low, count: 1, attack: fake_time},"
         " {tier: phone-low, count: 1, attack: nan_update}, {tier: phone-low, count: 1, attack: silent},"
         " {tier: phone-mid, count: 1, attack: fake_residual}, {tier: phone-mid, count: 1, attack: fake_accuracy},"
         " {tier: phone-mid, count: 1, attack: crash}, {tier: phone-flagship, count: 1, attack: fake_steps},"
         " {tier: phone-flagship, count: 1, attack: negative_metric},"
         " {tier: phone-flagship, count: 1, attack: wrong_shape}]")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def default_round():
    """Round 1 of the default scenario: the driver, the global model and every instructed client's honest reply."""
    driver = RoundDriver(load_scenario(DEFAULT))
    arrays = driver.initial_arrays()
    open_round = driver.open_round(1, arrays)
    replies = {}
    for pid, instruction in open_round.instructions.items():
        result = run_client_round(driver.scenario, pid, 1, arrays, budget=instruction.budget)
        replies[pid] = Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics))
    return driver, arrays, replies


def _close(driver, arrays, replies):
    return driver.close_round(driver.open_round(1, arrays), list(replies.values()))


def _mount(attack, reply):
    try:
        forged_arrays, forged_metrics = adversary.apply(attack, reply.arrays, reply.metrics)
    except adversary.AdversaryCrash as exc:
        return Reply(node_id=reply.node_id, partition_id=reply.partition_id, error=str(exc))
    return dataclasses.replace(reply, arrays=forged_arrays, metrics=forged_metrics)


@pytest.mark.parametrize("attack", [a for a in adversary.REPLY_ATTACKS if a != "silent"])
def test_each_attack_alone_on_the_default_scenario(default_round, attack):
    driver, arrays, replies = default_round
    victim = max(replies)  # any instructed client will do
    honest_arrays, honest = _close(driver, arrays, replies)
    forged_arrays, report = _close(driver, arrays, {**replies, victim: _mount(attack, replies[victim])})
    kind, words = SYMPTOMS[attack]
    assert words in getattr(report, kind)[victim], (attack, report.to_record())
    # No weight for the adversary, and its share goes to the honest clients it would have shared with.
    assert victim not in report.fusion_weights and victim in honest.fusion_weights
    assert sum(report.fusion_weights.values()) == pytest.approx(1.0)
    for pid, weight in report.fusion_weights.items():
        assert weight >= honest.fusion_weights[pid]
    assert all(np.isfinite(v).all() for v in forged_arrays.values())


@pytest.mark.parametrize("attack", LIES)
def test_a_liar_changes_the_model_exactly_as_much_as_its_absence(default_round, attack):
    """The fleet with a caught liar fuses exactly what it fuses when that client does not reply at all."""
    driver, arrays, replies = default_round
    victim = min(replies)
    forged, _ = _close(driver, arrays, {**replies, victim: _mount(attack, replies[victim])})
    absent, _ = _close(driver, arrays, {p: r for p, r in replies.items() if p != victim})
    for key in absent:
        np.testing.assert_array_equal(forged[key], absent[key])


def test_a_silent_adversary_on_the_default_scenario_costs_the_deadline():
    scenario = load_scenario(DEFAULT, overrides=["adversaries=[{tier: phone-flagship, count: 1, attack: silent}]",
                                                 "training.clients_per_round=20"])
    driver = RoundDriver(scenario)
    (silent,) = driver.adversaries
    open_round = driver.open_round(1, driver.initial_arrays())
    assert silent not in open_round.instructions
    _, report = driver.close_round(open_round, [])
    assert report.dropped[silent] == "no reply by the deadline"
    assert report.round_sim_time_s == scenario.training.deadline_s


def test_all_attacks_mixed_on_the_default_scenario_run_to_the_end(tmp_path):
    """Ten adversaries among twenty devices, every device sampled, through the real ClientApp."""
    scenario = load_scenario(DEFAULT, overrides=[MIXED, "training.rounds=2", "training.clients_per_round=20"])
    summary = run_federation(FakeGrid(client_app, fleet_size(scenario)), scenario, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    planted = summary["adversaries"]
    assert sorted(planted.values()) == sorted(adversary.REPLY_ATTACKS)
    assert len(records) == 2 and summary["faults"]["rounds_not_fused"] == 0
    seen = set()
    for record in records:
        for pid, attack in planted.items():
            kind, words = SYMPTOMS[attack]
            reason = record[kind].get(pid)
            if reason is None:  # not sampled this round, or dropped out before it could misbehave
                assert pid in record["dropped"] or pid not in _sampled(record)
                continue
            assert words in reason, (attack, reason)
            seen.add(attack)
        assert not set(planted) & set(record["fusion_weights"])
        assert record["clients_completed"] >= 5 and sum(record["fusion_weights"].values()) == pytest.approx(1.0)
    assert seen == set(adversary.REPLY_ATTACKS)  # every attack was mounted at least once and named
    assert summary["final_accuracy"] > summary["initial_accuracy"]


def _sampled(record) -> set[str]:
    return {*record["fusion_weights"], *record["dropped"], *record["rejected"], *record["failed"]}
