"""Adversarial training on the clients: PGD examples at the client's own budgets, Yang et al.'s loss on
intermediate states, and every step of the attack charged to the client's clock and budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_deq import fleet, workload
from fed_deq.errors import InputError
from fed_deq.rounds import Reply, RoundDriver
from fed_deq.scenario import load_scenario
from fed_deq.training import adversarial_batch, intermediate_state_loss
from tests.conftest import TINY_SCENARIO

pytestmark = pytest.mark.usefixtures("single_torch_thread")
ADV = "training.adversarial={eps: 0.1, steps: 2}"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path


def one_round(path, *overrides, budget=fleet.Budget(forward=5, backward=1)):
    """Client 3's round 1 at a fixed budget, every solve spending it (a tolerance float32 never reaches)."""
    scenario = load_scenario(path, overrides=["model.tol=1e-12", *overrides])
    arrays = workload.model_arrays(workload.build_scenario_model(scenario, workload.scenario_data(scenario)))
    return scenario, workload.run_client_round(scenario, 3, 1, arrays, budget=budget)


def test_each_attack_step_is_charged_as_one_more_training_pass(tiny_path):
    _, plain = one_round(tiny_path)
    scenario, attacked = one_round(tiny_path, ADV)
    for key in ("work-solve-evals", "work-samples", "work-norm-calls", "work-grad-evals"):
        assert attacked.metrics[key] == 3 * plain.metrics[key], key
    assert attacked.metrics["compute-s"] == pytest.approx(3 * plain.metrics["compute-s"], rel=1e-9)
    # The server's bound on what a reply may claim grows by as much.
    n = len(workload.client_partition(scenario, 3).y_train)
    bound = workload.client_max_work(scenario, n, fleet.Budget(forward=5, backward=1))
    assert attacked.metrics["work-solve-evals"] <= bound.solve_evals
    assert bound.solve_evals == 3 * fleet.max_work(samples=n, batch_size=32, epochs=1, forward=5, backward=1,
                                                   backward_mode="one-step").solve_evals


def test_the_intermediate_state_loss_is_charged_too(tiny_path):
    _, attacked = one_round(tiny_path, ADV)
    _, regulated = one_round(tiny_path, "training.adversarial={eps: 0.1, steps: 2, intermediate_states: true}")
    extra = regulated.metrics["work-grad-evals"] - attacked.metrics["work-grad-evals"]
    samples = regulated.metrics["work-samples"] - attacked.metrics["work-samples"]
    assert samples == attacked.metrics["work-samples"] / 3  # one more encoder + head pass per sample
    assert samples <= extra <= 5 * samples                  # k in 1..forward budget per batch


def test_budgets_shrink_so_the_attack_fits_the_deadline(tiny_path):
    plain = RoundDriver(load_scenario(tiny_path))
    attacked = RoundDriver(load_scenario(tiny_path, overrides=[ADV]))
    before = [plain.facts[p].budget.total for p in range(6)]
    after = [attacked.facts[p].budget.total for p in range(6)]
    assert all(a <= b for a, b in zip(after, before)) and after != before
    scenario = attacked.scenario
    for pid in range(6):
        facts, device = attacked.facts[pid], attacked.devices[pid]
        if facts.budget.total <= scenario.training.min_iterations:
            continue  # the floor: such a device straggles, on purpose
        work = workload.client_max_work(scenario, facts.num_examples, facts.budget)
        model = attacked.auditor.model
        seconds = fleet.compute_seconds(device, fleet.work_flops(
            work, cell_flops=model.cell_flops(), overhead_flops=model.overhead_flops(),
            norm_flops=model.norm_flops(), solver_flops=model.solver_flops(scenario.model.solver)))
        assert seconds <= scenario.training.deadline_s


def test_the_server_accepts_honest_adversarially_trained_replies(tiny_path):
    driver = RoundDriver(load_scenario(tiny_path, overrides=[ADV, "training.deadline_s=20",
                                                             "training.clients_per_round=6"]))
    open_round = driver.open_round(1, driver.initial_arrays())
    replies = []
    for pid, instruction in open_round.instructions.items():
        result = workload.run_client_round(driver.scenario, pid, 1, open_round.reference, budget=instruction.budget)
        replies.append(Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics)))
    _, report = driver.close_round(open_round, replies)
    assert report.rejected == {} and len(report.accepted) == len(replies) > 0


def test_adversarial_batches_stay_in_the_ball_and_raise_the_loss(tiny_path):
    scenario = load_scenario(tiny_path, overrides=[ADV])
    bundle = workload.scenario_data(scenario)
    model = workload.build_scenario_model(scenario, bundle)
    x, y = torch.tensor(bundle.x_test[:32]), torch.tensor(bundle.y_test[:32])
    cfg = workload.LocalTrainConfig(epochs=1, batch_size=32, learning_rate=0.1, optimizer="sgd", momentum=0.0,
                                    solver="anderson", tol=1e-3, backward="one-step",
                                    adversarial=scenario.training.adversarial)
    adv, work = adversarial_batch(model, x, y, cfg, 8, 1, torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and not torch.equal(adv, x)
    assert work.samples == 2 * 32 and work.norm_calls == 2

    def loss(inputs):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(inputs, max_iter=8).logits, y))

    assert loss(adv) > loss(x)
    extra, extra_work = intermediate_state_loss(model, x, y, 8, torch.Generator().manual_seed(1))
    extra.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cell.parameters())
    k = extra_work.grad_evals / 32
    assert k == int(k) and 1 <= k <= 8 and extra_work.vjp_evals == 32 * (k - 1)


@pytest.mark.parametrize("override, message", [
    ("training.adversarial={eps: 0}", "training.adversarial.eps"),
    ("training.adversarial={eps: 0.1, steps: 0}", "training.adversarial.steps"),
    ("training.adversarial={steps: 2}", "training.adversarial.eps"),
])
def test_bad_adversarial_training_is_an_error_naming_the_key(tiny_path, override, message):
    with pytest.raises(InputError, match=message):
        load_scenario(tiny_path, overrides=[override])


def test_intermediate_states_need_a_deq(tiny_path):
    with pytest.raises(InputError, match="training.adversarial.intermediate_states: needs model.kind deq"):
        load_scenario(tiny_path, overrides=["model.kind=weight_tied",
                                            "training.adversarial={eps: 0.1, intermediate_states: true}"])
    scenario, result = one_round(tiny_path, "model.kind=weight_tied", ADV)  # PGD alone is fine
    assert np.isfinite(result.metrics["train-loss"])
