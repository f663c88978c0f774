"""Adversarial evaluation through the solver: exact at ε = 0, monotone in ε, gradients that match a long
unrolled solve, inputs kept in the ball, and the run's and attack-eval's figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.app import app as client_app
from fed_deq import adversarial, results, workload
from fed_deq.adversarial import AttackSettings, Solve
from fed_deq.deq.models import build_model
from fed_deq.scenario import load_scenario
from fed_deq.training import evaluate
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid
from tools.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny digits scenario and a model one client round trained, with its test set."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    scenario = load_scenario(path, overrides=["training.local_epochs=3"])
    bundle = workload.scenario_data(scenario)
    model = workload.build_scenario_model(scenario, bundle)
    arrays = workload.model_arrays(model)
    for pid in range(3):
        result = workload.run_client_round(scenario, pid, 1, arrays, budget=None)
        arrays = workload.quantize.decode(result.arrays, scenario.training.upload, arrays)
    workload.load_arrays(model, arrays)
    return scenario, model, bundle


def test_the_implicit_attack_gradient_matches_autograd_through_a_long_unrolled_solve():
    model = build_model(cell="mlp", input_shape=(6,), num_classes=3, width=5, contraction="spectral", seed=1)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    grad = adversarial.input_gradient(model, x, y, Solve("anderson", 100, 1e-7), adjoint_iterations=100)
    xu = x.clone().requires_grad_()
    u = model.inject(xu)
    f = model.cell.bind(u)
    z = torch.zeros_like(u)
    for _ in range(400):  # spectral gain 0.9: 0.9^400 of the start is left
        z = f(z)
    loss = torch.nn.functional.cross_entropy(model.readout(z), y, reduction="sum")
    (unrolled,) = torch.autograd.grad(loss, xu)
    assert unrolled.abs().max() > 1e-3
    np.testing.assert_allclose(grad.numpy(), unrolled.numpy(), rtol=1e-3, atol=1e-5)
    # The one-step gradient is not the same thing: the comparison can fail.
    one_step = adversarial.input_gradient(model, x, y, Solve("anderson", 100, 1e-7), adjoint_iterations=1)
    assert not np.allclose(one_step.numpy(), unrolled.numpy(), rtol=1e-3, atol=1e-5)


def test_the_intermediate_gradient_is_autograd_through_k_steps():
    model = build_model(cell="mlp", input_shape=(6,), num_classes=3, width=5, contraction="spectral", seed=2)
    x, y = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1])
    xu = x.clone().requires_grad_()
    z = model.cell.bind(model.inject(xu))(torch.zeros(3, 5))  # k = 1: one step from zero
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model.readout(z), y, reduction="sum"), xu)
    np.testing.assert_allclose(adversarial.intermediate_gradient(model, x, y, 1).numpy(), expected.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_its_ball_and_climbs_the_loss(trained, norm):
    scenario, model, bundle = trained
    x, y = torch.tensor(bundle.x_test[:64]), torch.tensor(bundle.y_test[:64])
    solve = Solve(scenario.model.solver, 10, scenario.model.tol)
    eps = 0.3 if norm == "linf" else 1.5

    def gradient(xa, step):
        return adversarial.input_gradient(model, xa, y, solve, 20)

    adv = adversarial.pgd(gradient, x, eps=eps, norm=norm, steps=5, step_size=eps / 2,
                          generator=torch.Generator().manual_seed(0))
    delta = (adv - x).reshape(len(x), -1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5) and float(size.max()) > 0.5 * eps

    def loss(inputs):
        with torch.no_grad():
            out = model(inputs, solver=solve.solver, max_iter=solve.budget, tol=solve.tol)
        return float(torch.nn.functional.cross_entropy(out.logits, y))

    assert loss(adv) > loss(x) + 0.1
    np.testing.assert_array_equal(adversarial.pgd(gradient, x, eps=0.0, norm=norm, steps=5, step_size=1.0).numpy(),
                                  x.numpy())


def test_eps_zero_is_the_clean_accuracy_exactly_and_accuracy_never_rises_with_eps(trained):
    scenario, model, bundle = trained
    settings = AttackSettings(eps=(0.2, 0.0, 0.05, 0.1), steps=4, samples=200)  # out of order on purpose
    budgets = {"eval": scenario.model.eval_iterations, **workload.tier_eval_budgets(scenario, model)}
    report = adversarial.evaluate_under_attack(model, bundle.x_test, bundle.y_test, solver=scenario.model.solver,
                                               tol=scenario.model.tol, budgets=budgets, settings=settings,
                                               seed=(scenario.seed, "test"), dynamics=True)
    n = report["samples"]
    assert n == 200 and report["attacks"] == ["pgd", "intermediate"]
    for name, budget in budgets.items():
        clean = evaluate(model, bundle.x_test[:n], bundle.y_test[:n], solver=scenario.model.solver,
                         max_iter=budget, tol=scenario.model.tol).accuracy
        by_attack = report["accuracy"][name]
        for attack, values in by_attack.items():
            assert values[1] == clean, (name, attack)
            ordered = [values[i] for i in (1, 2, 3, 0)]
            assert all(a >= b for a, b in zip(ordered, ordered[1:])), (name, attack, ordered)
            assert all(w <= v for w, v in zip(by_attack["worst"], values))
        assert by_attack["pgd"][0] < clean  # the attack bites at the largest radius
    again = adversarial.evaluate_under_attack(model, bundle.x_test, bundle.y_test, solver=scenario.model.solver,
                                              tol=scenario.model.tol, budgets=budgets, settings=settings,
                                              seed=(scenario.seed, "test"), dynamics=True)
    assert again == report  # seeded: the same model gives the same figures


def test_a_run_attacks_its_final_model_and_attack_eval_repeats_it(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    scenario = load_scenario(path, overrides=["evaluation.adversarial={eps: [0, 0.1], steps: 2, samples: 64}"])
    summary = run_federation(FakeGrid(client_app, 6), scenario, tmp_path / "run")
    records = results.read_metrics(tmp_path / "run")
    assert "adversarial" not in records[0] and records[-1]["adversarial"] == summary["adversarial"]
    report = summary["adversarial"]
    assert set(report["accuracy"]) == {"eval", "slow", "fast"}
    assert report["accuracy"]["eval"]["pgd"][0] == pytest.approx(report["accuracy"]["eval"]["worst"][0])
    saved = results.read_model(tmp_path / "run")
    assert set(saved) == set(workload.model_arrays(workload.build_scenario_model(scenario,
                                                                                  workload.scenario_data(scenario))))
    assert cli_main(["attack-eval", str(tmp_path / "run")]) == 0
    written = json.loads((tmp_path / "run" / "adversarial.json").read_text())
    assert written["accuracy"] == report["accuracy"]
    assert (tmp_path / "run" / "adversarial.png").stat().st_size > 0
    assert cli_main(["attack-eval", str(tmp_path / "run"), "--set", "evaluation.adversarial.eps=[0,0.05,0.2]",
                     "--set", "evaluation.adversarial.intermediate=false"]) == 0
    changed = json.loads((tmp_path / "run" / "adversarial.json").read_text())
    assert changed["eps"] == [0.0, 0.05, 0.2] and changed["attacks"] == ["pgd"]


def test_every_round_attacks_every_round(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    scenario = load_scenario(path, overrides=["evaluation.adversarial={eps: [0, 0.1], steps: 1, samples: 16, "
                                              "every_round: true, intermediate: false}"])
    run_federation(FakeGrid(client_app, 6), scenario, tmp_path / "run")
    assert all(r["adversarial"]["attacks"] == ["pgd"] for r in results.read_metrics(tmp_path / "run"))


def test_a_fixed_depth_model_is_attacked_by_backpropagation(trained):
    scenario, _, bundle = trained
    wt = scenario.model_copy(update={"model": scenario.model.model_copy(update={"kind": "weight_tied"})})
    model = workload.build_scenario_model(wt, bundle)
    report = workload.evaluate_adversarial(wt, model, workload.model_arrays(model), {},
                                           settings=AttackSettings(eps=(0.0, 0.1), steps=2, samples=32))
    assert report["attacks"] == ["pgd"] and report["gradient"].startswith("backpropagation")
    assert report["accuracy"]["eval"]["pgd"][1] <= report["accuracy"]["eval"]["pgd"][0]


@pytest.mark.parametrize("setup, argv_tail, message", [
    ("empty", [], "not a run folder"),
    ("no-model", [], "no saved model"),
    ("no-model", ["--set", "evaluation.adversarial.norm=l3"], "evaluation.adversarial.norm"),
    ("missing", [], "no such run folder"),
])
def test_attack_eval_bad_input_exits_2_naming_it(tmp_path, capsys, setup, argv_tail, message):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "no-model":
        (run / "scenario.yaml").write_text(TINY_SCENARIO)
    assert cli_main(["attack-eval", str(run), *argv_tail]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "adversarial.json").exists()
