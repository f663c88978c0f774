"""The round driver on real client replies (no Flower): server-side facts, cross-checks, attacks, containment."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fed_deq import adversary, fusion, screening
from fed_deq.rounds import Reply, RoundDriver
from fed_deq.scenario import load_scenario
from fed_deq.workload import run_client_round

#: Every client sampled, none unavailable or dropping out: each test sees the same six replies.
ALL_IN = ["training.clients_per_round=6", "fusion.rule=fedavg", "fleet.tiers.slow.compute_gflops=0.0015"]

#: What the server says about each attack: the words a rejection (or drop, or failure) must contain.
SYMPTOMS = {
    "inflate_examples": ("rejected", "num-examples"),
    "fake_residual": ("rejected", "val-rel-residual"),
    "fake_accuracy": ("rejected", "val-accuracy"),
    "fake_time": ("rejected", "sim-time-s"),
    "fake_steps": ("rejected", "local-steps"),
    "negative_metric": ("rejected", "rel-residual -0.01 out of range"),
    "nan_update": ("rejected", "non-finite"),
    "wrong_shape": ("rejected", "shape"),
    "crash": ("failed", "crash"),
    "silent": ("dropped", "no reply"),
}


def _driver(path, *overrides):
    return RoundDriver(load_scenario(path, overrides=[*ALL_IN, *overrides]))


def _replies(driver, open_round, attacks=None):
    """What each instructed client sends, mounting ``attacks[pid]`` if given (a raise becomes an error reply)."""
    replies = []
    for pid, instruction in open_round.instructions.items():
        try:
            result = run_client_round(driver.scenario, pid, open_round.server_round, open_round.reference,
                                      budget=instruction.budget, attack=(attacks or {}).get(pid))
        except adversary.AdversaryCrash as exc:
            replies.append(Reply(node_id=pid, partition_id=pid, error=str(exc)))
            continue
        replies.append(Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics)))
    return replies


@pytest.fixture(scope="module")
def honest(tmp_path_factory, single_torch_thread):
    """One honest round of the tiny scenario: the driver, its open round and the six replies."""
    from tests.conftest import TINY_SCENARIO

    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    driver = _driver(path)
    open_round = driver.open_round(1, driver.initial_arrays())
    return path, driver, _replies(driver, open_round)


def _reopen(driver):
    return driver.open_round(1, driver.initial_arrays())


def test_facts_are_derived_by_the_server_and_the_budget_travels_in_the_instruction(honest):
    _, driver, replies = honest
    open_round = _reopen(driver)
    assert sorted(open_round.instructions) == list(range(6))
    for reply in replies:
        facts = driver.facts[reply.partition_id]
        assert reply.metrics["num-examples"] == facts.num_examples
        assert reply.metrics["local-steps"] == facts.local_steps
        assert reply.metrics["budget-total"] == facts.budget.total
        assert open_round.instructions[reply.partition_id].budget.forward == facts.budget.forward
    # The slow tier gets a smaller budget than the fast one: the budget follows the device, not the client.
    by_tier = {driver.facts[p].tier: driver.facts[p].budget.total for p in range(6)}
    assert by_tier["slow"] < by_tier["fast"]


def test_honest_replies_are_all_accepted_with_fedavg_weights_from_server_known_sizes(honest):
    _, driver, replies = honest
    arrays, report = driver.close_round(_reopen(driver), replies)
    assert report.accepted == list(range(6)) and not report.rejected and not report.dropped
    sizes = {p: driver.facts[p].num_examples for p in range(6)}
    total = sum(sizes.values())
    assert report.fusion_weights == pytest.approx({p: n / total for p, n in sizes.items()})
    expected = fusion.weighted_average([r.arrays for r in sorted(replies, key=lambda r: r.partition_id)],
                                       [sizes[p] for p in range(6)])
    for key in expected:
        np.testing.assert_allclose(arrays[key], expected[key], rtol=1e-6, atol=1e-7)
    # The server's clock agrees with what the clients claim, and the round lasts as long as the slowest.
    claimed = {r.partition_id: r.metrics["sim-time-s"] for r in replies}
    assert report.client_sim_time_s == pytest.approx(claimed, rel=screening.TIME_TOLERANCE)
    assert report.round_sim_time_s == pytest.approx(max(claimed.values()), rel=screening.TIME_TOLERANCE)


def test_the_driver_matches_flowers_fedavg_on_the_same_replies(honest):
    from flwr.serverapp.strategy import FedAvg

    from server.strategies.flower_rules import _as_reply
    from wire.records import from_array_record

    _, driver, replies = honest
    arrays, _ = driver.close_round(_reopen(driver), replies)
    ordered = sorted(replies, key=lambda r: r.partition_id)
    messages = [_as_reply(r.arrays, driver.facts[r.partition_id].num_examples, i + 1) for i, r in enumerate(ordered)]
    flowers, _ = FedAvg().aggregate_train(1, messages)
    for key, value in from_array_record(flowers).items():
        np.testing.assert_allclose(arrays[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack", [a for a in adversary.REPLY_ATTACKS if a not in ("crash", "silent")])
def test_each_attack_alone_is_caught_with_its_symptom_and_gets_no_weight(honest, attack):
    _, driver, replies = honest
    victim = 2
    forged = []
    for reply in replies:
        if reply.partition_id == victim:
            arrays, metrics = adversary.apply(attack, reply.arrays, reply.metrics)
            reply = dataclasses.replace(reply, arrays=arrays, metrics=metrics)
        forged.append(reply)
    arrays, report = driver.close_round(_reopen(driver), forged)
    kind, words = SYMPTOMS[attack]
    assert words in getattr(report, kind)[victim], getattr(report, kind)
    assert victim not in report.fusion_weights and victim not in report.accepted
    assert report.accepted == [p for p in range(6) if p != victim]
    assert all(np.isfinite(v).all() for v in arrays.values())


def test_a_crashing_adversary_is_a_failure_and_the_round_goes_on(honest):
    _, driver, replies = honest
    with pytest.raises(adversary.AdversaryCrash, match="crash"):
        run_client_round(driver.scenario, 0, 1, driver.initial_arrays(), attack="crash")
    crashed = [Reply(node_id=0, partition_id=0, error="adversary: crash attack")] + replies[1:]
    _, report = driver.close_round(_reopen(driver), crashed)
    assert "crash" in report.failed[0] and report.accepted == [1, 2, 3, 4, 5]


def test_a_silent_adversary_is_never_asked_and_costs_the_round_its_deadline(honest):
    path, _, _ = honest
    driver = _driver(path, "adversaries=[{tier: fast, count: 1, attack: silent}]")
    (silent,) = driver.adversaries
    open_round = _reopen(driver)
    assert silent not in open_round.instructions
    _, report = driver.close_round(open_round, _replies(driver, open_round))
    assert report.dropped == {silent: "no reply by the deadline"}
    assert report.round_sim_time_s == driver.scenario.training.deadline_s


def test_adversaries_are_drawn_from_the_seed_within_their_tier(honest):
    path, _, _ = honest
    overrides = ["adversaries=[{tier: slow, count: 2, attack: fake_time}, {tier: fast, share: 0.34, attack: crash}]"]
    first = adversary.assign(load_scenario(path, overrides=overrides))
    assert first == adversary.assign(load_scenario(path, overrides=overrides))
    driver = _driver(path)
    tiers = {pid: driver.facts[pid].tier for pid in first}
    assert sorted(first.values()) == ["crash", "fake_time", "fake_time"]
    assert all(tiers[p] == ("slow" if a == "fake_time" else "fast") for p, a in first.items())
    others = {adversary.assign(load_scenario(path, overrides=[*overrides, f"seed={s}"])).__repr__() for s in range(8)}
    assert len(others) > 1  # a different seed plants them elsewhere


def test_duplicate_and_unknown_replies_are_rejected(honest):
    _, driver, replies = honest
    stranger = Reply(node_id=999, partition_id=None, arrays=replies[0].arrays, metrics=replies[0].metrics)
    _, report = driver.close_round(_reopen(driver), [*replies, replies[3], stranger])
    assert "second reply" in report.rejected[3]
    assert "no known partition" in report.rejected[999]


def _forge(replies, pid, **metrics):
    """The replies with partition ``pid``'s metrics overwritten (keys with '-' spelt with '_')."""
    changes = {k.replace("_", "-"): v for k, v in metrics.items()}
    return [dataclasses.replace(r, metrics={**r.metrics, **changes}) if r.partition_id == pid else r for r in replies]


def test_a_claimed_partition_id_that_is_not_the_nodes_is_rejected(honest):
    _, driver, replies = honest
    _, report = driver.close_round(_reopen(driver), _forge(replies, 1, partition_id=5.0))
    assert "partition-id 5 claimed by the node serving partition 1" in report.rejected[1]


def test_claiming_more_solver_work_than_the_budget_allows_is_rejected(honest):
    _, driver, replies = honest
    _, report = driver.close_round(_reopen(driver), _forge(replies, 4, work_solve_evals=1e9))
    assert "work-solve-evals" in report.rejected[4] and "budget allows" in report.rejected[4]


def test_anything_that_raises_while_screening_one_reply_rejects_only_that_reply(honest, monkeypatch):
    _, driver, replies = honest
    real = driver.auditor.validation

    def flaky(arrays, pid, budget):
        if pid == 3:
            raise RuntimeError("boom")
        return real(arrays, pid, budget)

    monkeypatch.setattr(driver.auditor, "validation", flaky)
    _, report = driver.close_round(_reopen(driver), replies)
    assert report.rejected == {3: "screening failed: RuntimeError: boom"}
    assert report.accepted == [0, 1, 2, 4, 5]


def test_a_round_whose_fusion_fails_keeps_the_previous_model_and_says_why(honest, monkeypatch):
    _, driver, replies = honest
    open_round = _reopen(driver)

    def broken(*args, **kwargs):
        raise FloatingPointError("overflow")

    monkeypatch.setattr(fusion, "weighted_average", broken)
    arrays, report = driver.close_round(open_round, replies)
    assert report.fusion_error == "FloatingPointError: overflow"
    assert all(np.array_equal(arrays[k], open_round.reference[k]) for k in arrays)
    assert report.fusion_weights == {} and report.previous_model_weight == 1.0


def test_a_straggler_by_the_servers_clock_is_dropped(honest):
    path, _, _ = honest
    # The slow tier at a tenth of its speed cannot fit even the minimum budget into the deadline.
    driver = _driver(path, "fleet.tiers.slow.compute_gflops=0.0002")
    open_round = _reopen(driver)
    _, report = driver.close_round(open_round, _replies(driver, open_round))
    slow = [p for p in range(6) if driver.facts[p].tier == "slow"]
    assert all(report.dropped[p].startswith("straggler") and "server's clock" in report.dropped[p] for p in slow)
    assert report.round_sim_time_s == driver.scenario.training.deadline_s


def test_fednova_records_its_effective_weights_and_equal_steps_give_fedavg(honest):
    path, driver, replies = honest
    nova = _driver(path, "fusion.rule=fednova")
    arrays_nova, report_nova = nova.close_round(_reopen(nova), replies)
    arrays_avg, report_avg = driver.close_round(_reopen(driver), replies)
    steps = {nova.facts[p].local_steps for p in range(6)}
    assert len(steps) == 1  # IID digits: equal partitions, equal step counts
    assert report_nova.fusion_weights == pytest.approx(report_avg.fusion_weights)
    assert report_nova.previous_model_weight == pytest.approx(0.0, abs=1e-12)
    for key in arrays_avg:
        np.testing.assert_allclose(arrays_nova[key], arrays_avg[key], rtol=1e-5, atol=1e-6)


def test_probe_score_measures_each_model_and_reports_its_cost(honest):
    path, _, replies = honest
    driver = _driver(path, "fusion.rule=quality", "fusion.score=probe")
    open_round = _reopen(driver)
    # A client that sends back the untrained model (with the claims such a model earns) is measured as worse.
    lazy = [_reclaim(driver, dataclasses.replace(r, arrays=dict(open_round.reference))) if r.partition_id == 0
            else r for r in replies]
    _, report = driver.close_round(open_round, lazy)
    assert report.accepted == list(range(6))
    assert report.probe["clients"] == 6 and report.probe["samples"] == 256
    assert report.probe["wall_s"] > 0 and report.probe["flops"] > 0
    assert all(0 < s <= 1 for s in report.scores.values())
    assert report.scores[0] < min(report.scores[p] for p in range(1, 6))
    assert report.fusion_weights[0] == min(report.fusion_weights.values())


def _reclaim(driver, reply):
    """The validation claims an honest client would make for ``reply.arrays``."""
    val = driver.auditor.validation(reply.arrays, reply.partition_id, driver.facts[reply.partition_id].budget)
    return dataclasses.replace(reply, metrics={**reply.metrics, "val-accuracy": float(val.accuracy),
                                               "val-rel-residual": float(val.rel_residual)})


def test_quality_scores_use_server_measurements_not_claims(honest):
    path, _, replies = honest
    driver = _driver(path, "fusion.rule=quality", "fusion.score=product")
    _, report = driver.close_round(_reopen(driver), replies)
    for pid, score in report.scores.items():
        facts = driver.facts[pid]
        reply = next(r for r in replies if r.partition_id == pid)
        expected = facts.budget_share * math.exp(-reply.metrics["val-rel-residual"]) * reply.metrics["val-accuracy"]
        assert score == pytest.approx(expected, rel=1e-6, abs=1e-12)
