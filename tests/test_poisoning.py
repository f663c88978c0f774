"""Model-poisoning attacks: each changes the update the way it claims, colluders read only colluders' updates,
the claims agree with the poisoned model, and no adversary ends a run."""

from __future__ import annotations

import dataclasses
import json
import statistics

import numpy as np
import pytest

from clients.app import app as client_app
from fed_deq import adversary, collusion, workload
from fed_deq.errors import InputError
from fed_deq.rounds import Reply, RoundDriver
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size, run_client_round
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid

#: Every client sampled, none dropping out: each test sees the same six clients.
ALL_IN = ["training.clients_per_round=6", "fusion.rule=fedavg", "fleet.tiers.slow.compute_gflops=0.0015"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path


def planted(path, attack: str, count: int = 1, tier: str = "fast", **parameter) -> RoundDriver:
    """A driver for the tiny scenario with ``count`` devices of ``tier`` mounting ``attack``."""
    extra = "".join(f", {k}: {v}" for k, v in parameter.items())
    return RoundDriver(load_scenario(path, overrides=[
        *ALL_IN, f"adversaries=[{{tier: {tier}, count: {count}, attack: {attack}{extra}}}]"]))


def client_round(driver: RoundDriver, pid: int, attack: str | None):
    """Round 1 of client ``pid`` from the starting model: (global arrays, the sent model decoded, metrics)."""
    arrays = driver.initial_arrays()
    budget = driver.facts[pid].budget
    result = run_client_round(driver.scenario, pid, 1, arrays, budget=budget, attack=attack)
    return arrays, result.arrays, result.metrics


def round_replies(driver: RoundDriver, open_round) -> list[Reply]:
    """What every instructed client sends in ``open_round``, planted adversaries mounting their attack."""
    replies = []
    for p, instruction in open_round.instructions.items():
        result = run_client_round(driver.scenario, p, open_round.server_round, open_round.reference,
                                  budget=instruction.budget, attack=adversary.attack_of(driver.scenario, p))
        replies.append(Reply(node_id=p, partition_id=p, arrays=result.arrays, metrics=dict(result.metrics)))
    return replies


def update(sent, reference):
    return {k: np.asarray(sent[k], np.float64) - np.asarray(reference[k], np.float64) for k in reference
            if np.issubdtype(np.asarray(reference[k]).dtype, np.floating)}


# --- each attack does what it says -------------------------------------------------------------------------


def test_sign_flip_negates_the_update(tiny_path):
    driver = planted(tiny_path, "sign_flip")
    (pid,) = driver.adversaries
    reference, honest, _ = client_round(driver, pid, None)
    _, flipped, _ = client_round(driver, pid, "sign_flip")
    honest_update, flipped_update = update(honest, reference), update(flipped, reference)
    assert any(np.abs(v).max() > 1e-4 for v in honest_update.values())  # there was an update to flip
    for key, value in honest_update.items():
        np.testing.assert_allclose(flipped_update[key], -value, atol=1e-6)


def test_scale_multiplies_the_update_by_its_factor(tiny_path):
    driver = planted(tiny_path, "scale", factor=3.0)
    (pid,) = driver.adversaries
    reference, honest, _ = client_round(driver, pid, None)
    _, scaled, _ = client_round(driver, pid, "scale")
    for key, value in update(honest, reference).items():
        np.testing.assert_allclose(update(scaled, reference)[key], 3.0 * value, atol=1e-5)
    assert adversary.ATTACKS["scale"].default == 10.0  # without a factor: the default


def test_gaussian_sends_noise_of_its_sigma_in_place_of_the_update_and_is_seeded(tiny_path):
    driver = planted(tiny_path, "gaussian", sigma=0.5)
    (pid,) = driver.adversaries
    reference, honest, _ = client_round(driver, pid, None)
    _, noisy, _ = client_round(driver, pid, "gaussian")
    _, again, _ = client_round(driver, pid, "gaussian")
    noise = np.concatenate([v.ravel() for v in update(noisy, reference).values()])
    assert noise.size > 500 and abs(noise.std() - 0.5) < 0.05 and abs(noise.mean()) < 0.05
    honest_update = np.concatenate([v.ravel() for v in update(honest, reference).values()])
    assert abs(np.corrcoef(noise, honest_update)[0, 1]) < 0.1  # in place of the update, not added to it
    for key in noisy:
        np.testing.assert_array_equal(noisy[key], again[key])


def test_a_free_rider_returns_the_global_model_and_claims_the_work(tiny_path):
    driver = planted(tiny_path, "free_rider")
    (pid,) = driver.adversaries
    reference, _, honest_metrics = client_round(driver, pid, None)
    _, sent, metrics = client_round(driver, pid, "free_rider")
    for key in reference:
        np.testing.assert_array_equal(sent[key], reference[key])
    for claim in ("local-steps", "forward-iterations", "work-solve-evals", "sim-time-s"):
        assert metrics[claim] == honest_metrics[claim] > 0


def test_label_flip_trains_on_permuted_labels_and_validates_on_the_true_ones(tiny_path, monkeypatch):
    labels = np.arange(10)
    flipped = adversary.flip_labels(labels, 10)
    assert sorted(flipped) == list(labels) and not np.any(flipped == labels)  # a permutation, no class kept
    driver = planted(tiny_path, "label_flip")
    (pid,) = driver.adversaries
    seen = []
    original = workload.train_local

    def spy(model, x, y, **kwargs):
        seen.append(np.array(y))
        return original(model, x, y, **kwargs)

    monkeypatch.setattr(workload, "train_local", spy)
    client_round(driver, pid, None)
    _, sent, metrics = client_round(driver, pid, "label_flip")
    true = workload.client_partition(driver.scenario, pid)
    np.testing.assert_array_equal(seen[0], true.y_train)
    np.testing.assert_array_equal(seen[1], 9 - true.y_train)
    assert not np.array_equal(seen[0], seen[1])
    val = driver.auditor.validation(sent, pid, driver.facts[pid].budget)
    assert metrics["val-accuracy"] == pytest.approx(val.accuracy)  # measured on the true labels


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "scale", "free_rider", "label_flip"])
def test_a_poisoner_s_claims_agree_with_its_model_so_only_fusion_stands_in_its_way(tiny_path, attack):
    driver = planted(tiny_path, attack, **({"factor": 1.5} if attack == "scale" else {}))
    (pid,) = driver.adversaries
    open_round = driver.open_round(1, driver.initial_arrays())
    replies = round_replies(driver, open_round)
    _, report = driver.close_round(open_round, replies)
    assert pid not in report.rejected or "update norm" in report.rejected[pid], report.rejected
    assert pid in report.accepted or "update norm" in report.rejected.get(pid, "")


# --- colluders ---------------------------------------------------------------------------------------------


def test_ipm_and_alie_by_hand():
    updates = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 4.0])}]
    np.testing.assert_allclose(adversary.collude("ipm", 0.5, updates, 8)["w"], [-1.0, -1.5])
    np.testing.assert_allclose(adversary.collude("alie", 1.0, updates, 8)["w"], [1.0, 2.0])  # mean 2,3; std 1,1
    # Baruch et al.: n = 8, f = 2 → s = 8 // 2 + 1 − 2 = 3, z = Φ⁻¹(5/8).
    assert adversary.alie_z(8, 2) == pytest.approx(statistics.NormalDist().inv_cdf(5 / 8))
    z = adversary.alie_z(8, 2)
    np.testing.assert_allclose(adversary.collude("alie", None, updates, 8)["w"], [2.0 - z, 3.0 - z])
    assert adversary.alie_z(4, 10) == pytest.approx(statistics.NormalDist().inv_cdf(3 / 4))  # s kept at 1


@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_colluders_read_only_colluders_updates(tiny_path, attack):
    driver = planted(tiny_path, attack, count=2, tier="fast")
    channel = collusion.SideChannel(driver.scenario)
    colluders = set(driver.adversaries)
    assert set(channel.members) == colluders and len(colluders) == 2
    open_round = driver.open_round(1, driver.initial_arrays())
    replies = round_replies(driver, open_round)
    rewritten = channel.rewrite(open_round, replies)
    # Change every honest client's model: the colluders' rewritten replies must not move.
    noisy = [r if r.partition_id in colluders else
             dataclasses.replace(r, arrays={k: v + 1.0 for k, v in r.arrays.items()}) for r in replies]
    again = channel.rewrite(open_round, noisy)
    by_pid = {r.partition_id: r for r in rewritten}
    for reply in again:
        if reply.partition_id in colluders:
            for key, value in reply.arrays.items():
                np.testing.assert_array_equal(value, by_pid[reply.partition_id].arrays[key])
        else:
            assert reply is noisy[[r.partition_id for r in noisy].index(reply.partition_id)]  # untouched
    # Every colluder sends the group's one update, computed from the colluders' honest updates alone.
    honest = [update(r.arrays, open_round.reference) for r in replies if r.partition_id in colluders]
    expected = adversary.collude(attack, adversary.ATTACKS[attack].default, honest, len(open_round.instructions))
    for pid in colluders:
        for key, value in update(by_pid[pid].arrays, open_round.reference).items():
            np.testing.assert_allclose(value, expected[key], atol=1e-6)
    # Their claims agree with the rewritten model: the server's validation check passes.
    _, report = driver.close_round(open_round, rewritten)
    assert not any("val-" in reason for reason in report.rejected.values()), report.rejected


def test_a_colluder_with_a_broken_reply_is_left_for_the_server(tiny_path):
    driver = planted(tiny_path, "ipm", count=2, tier="fast")
    channel = collusion.SideChannel(driver.scenario)
    first, second = sorted(driver.adversaries)
    open_round = driver.open_round(1, driver.initial_arrays())
    broken = Reply(node_id=first, partition_id=first, arrays={"nonsense": np.zeros(3, np.float32)}, metrics={})
    failed = Reply(node_id=second, partition_id=second, error="client raised")
    assert channel.rewrite(open_round, [broken, failed]) == [broken, failed]


# --- the schema and whole runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("entry, message", [
    ("{tier: fast, count: 1, attack: sign_flip, sigma: 1}",
     "adversaries.0.sigma: the sign_flip attack has no sigma (it takes no parameter)"),
    ("{tier: fast, count: 1, attack: gaussian, factor: 2}",
     "adversaries.0.factor: the gaussian attack has no factor (it takes sigma)"),
    ("{tier: fast, count: 1, attack: gaussian, sigma: 0}", "adversaries.0.sigma"),
    ("{tier: fast, count: 1, attack: ipm, epsilon: -1}", "adversaries.0.epsilon"),
    ("{tier: fast, count: 1, attack: alie, z: .nan}", "adversaries.0.z"),
    ("{tier: fast, count: 1, attack: sign_flp}", "did you mean 'sign_flip'"),
])
def test_attack_parameters_are_checked_strictly(tiny_path, entry, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_scenario(tiny_path, overrides=[f"adversaries=[{entry}]"])


@pytest.mark.parametrize("attack", adversary.POISONING_ATTACKS)
def test_every_poisoning_attack_runs_to_the_end_through_the_client_app(tiny_path, tmp_path, attack):
    """Two of the three fast devices poisoned, through the ClientApp and the round loop: the run finishes."""
    scenario = load_scenario(tiny_path, overrides=[
        *ALL_IN, f"adversaries=[{{tier: fast, count: 2, attack: {attack}}}]", "fusion.rule=quality"])
    summary = run_federation(FakeGrid(client_app, fleet_size(scenario)), scenario, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and len(records) == 2
    assert sorted(summary["adversaries"].values()) == [attack, attack]
    assert all(r["clients_failed"] == 0 for r in records)
    assert all(np.isfinite(r["accuracy"]) for r in records)


def test_only_colluders_get_a_side_channel(tiny_path):
    assert collusion.side_channel(load_scenario(tiny_path)) is None
    assert collusion.side_channel(planted(tiny_path, "sign_flip").scenario) is None
    channel = collusion.side_channel(planted(tiny_path, "alie", count=2).scenario)
    assert channel is not None and sorted(channel.members.values()) == [("alie", None), ("alie", None)]


def test_building_a_robust_rule_does_not_warn_that_federated_evaluation_is_off(tiny_path):
    import logging

    from flwr.serverapp.strategy import FedMedian

    from server.strategies.flower_rules import flower_strategy

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("flwr"), Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        FedMedian(fraction_evaluate=0.0)  # Flower's own warning, to show the handler hears it
        heard = [m for m in seen if "Federated evaluation will be skipped" in m]
        for rule in ("fedmedian", "fedtrimmedavg", "krum"):
            assert flower_strategy(load_scenario(tiny_path, overrides=[*ALL_IN, f"fusion.rule={rule}"])) is not None
    finally:
        logger.removeHandler(handler)
    assert len(heard) == 1 and [m for m in seen if "Federated evaluation will be skipped" in m] == heard
