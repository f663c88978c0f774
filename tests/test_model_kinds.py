"""Model kinds: the DEQ and its fixed-depth baselines (weight-tied, with or without sparse masks, and explicit)
through the same training, cost model, budgets, screening and runners."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.app import app as client_app
from fed_deq import fleet, workload
from fed_deq.deq import MODEL_KINDS, build_classifier, build_model
from fed_deq.results import read_metrics
from fed_deq.rounds import RoundDriver
from fed_deq.scenario import load_scenario, names
from fed_deq.training import LocalTrainConfig, evaluate, train_local
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid
from tests.test_clock import charged_flops, flop_counter
from tests.test_rounds import ALL_IN, _replies
from tools.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DIGITS = Path(__file__).resolve().parent.parent / "scenarios" / "digits-iid.yaml"
DEPTH = 4
SHAPE = dict(cell="conv1d", input_shape=(40,), num_classes=10)
CFG = LocalTrainConfig(epochs=1, batch_size=16, learning_rate=0.05, optimizer="sgd", momentum=0.9,
                       solver="anderson", tol=1e-3, backward="one-step")


def data(n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 40)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def build(kind: str, **options) -> torch.nn.Module:
    return build_classifier(kind, **SHAPE, depth=DEPTH, seed=7, **options)


def params(module: torch.nn.Module) -> int:
    return sum(int(v.numel()) for v in module.state_dict().values())


def train(model, x, y, *, forward=6, backward=1):
    return train_local(model, x, y, cfg=CFG, forward_budget=forward, backward_budget=backward,
                       generator=torch.Generator().manual_seed(0))


# --- the models ------------------------------------------------------------------------------------------------


def test_the_registry_is_the_schema_choice_and_the_default_is_the_deq():
    assert names("model_kind") == tuple(MODEL_KINDS) == ("deq", "weight_tied", "explicit")
    assert load_scenario(DIGITS).model.kind == "deq"
    assert [k for k, v in MODEL_KINDS.items() if v.fixed_depth] == ["weight_tied", "explicit"]


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_each_kind_trains_a_step_and_the_parameter_counts_relate(kind):
    x, y = data()
    deq = build_model(**SHAPE, seed=7)
    model = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, _ = train(model, x, y)
    assert result.local_steps == 2 and np.isfinite(result.train_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    cell = params(deq.cell)
    expected = params(deq) + (DEPTH - 1) * cell if kind == "explicit" else params(deq)
    assert params(model) == expected
    assert list(model.state_dict())[: len(deq.state_dict())] == list(deq.state_dict())
    if kind != "deq":
        # Same seed, same draws: the shared parts (and the first cell) start where the DEQ's do.
        fresh = build(kind)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in deq.state_dict().items())


def test_a_weight_tied_forward_is_a_hand_written_loop_of_the_cell():
    x = torch.tensor(data(8)[0])
    model = build("weight_tied")
    u = model.inject(x)
    f = model.cell.bind(u)
    z = torch.zeros_like(u)
    for _ in range(DEPTH):
        z = f(z)
    out = model(x)
    assert torch.equal(out.logits, model.readout(z)) and torch.equal(out.z, z.detach())
    # Budgets, solver, backward mode and warm starts change nothing: the depth is always run from z = 0.
    other = model(x, solver="picard", max_iter=1, backward="implicit", backward_max_iter=9, z0=torch.ones_like(u))
    assert torch.equal(other.logits, out.logits)
    assert out.forward_stats["iterations"].tolist() == [DEPTH] * 8


def test_an_explicit_forward_applies_one_untied_cell_per_layer():
    x = torch.tensor(data(8)[0])
    model = build("explicit")
    cells = model.layer_cells()
    assert len(cells) == DEPTH and len({id(c) for c in cells}) == DEPTH
    assert not torch.equal(cells[0].weight, cells[1].weight)
    u = model.inject(x)
    z = torch.zeros_like(u)
    for cell in cells:
        z = cell.bind(u)(z)
    assert torch.equal(model(x).logits, model.readout(z))


def test_stats_say_what_the_unroll_evaluated():
    x = torch.tensor(data(8)[0])
    model = build("weight_tied")
    out = model(x)
    assert int(out.forward_stats["f_calls"]) == 0 and out.backward_stats == {}  # filled by backward
    out.logits.sum().backward()
    bwd = out.backward_stats
    assert bwd["grad_evals"].tolist() == [DEPTH] * 8 and bwd["iterations"].tolist() == [DEPTH] * 8
    assert int(bwd["vjp_calls"]) == DEPTH - 1 and int(bwd["adjoint_f_calls"]) == 0
    with torch.no_grad():
        plain = model(x)
    assert int(plain.forward_stats["f_calls"]) == DEPTH and plain.backward_stats == {}
    # The residual is the last layer's step, the DEQ's residual with z_{d-1} as the evaluated point.
    u = model.inject(x).detach()
    f = model.cell.bind(u)
    z = torch.zeros_like(u)
    for _ in range(DEPTH - 1):
        z = f(z)
    step = torch.linalg.vector_norm((f(z) - z).flatten(1), dim=1).detach()
    assert torch.allclose(plain.forward_stats["abs_residual"], step)


# --- sparse masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contraction", ["spectral", "monotone"])
def test_sparse_masks_have_the_density_differ_per_layer_and_stay_off_the_wire(contraction):
    model = build("weight_tied", sparse_masks=True, mask_density=0.3, contraction=contraction)
    weights = [name for name in ("weight", "A", "B") if hasattr(model.cell, name)]
    size = model.cell.weight.numel() if contraction == "spectral" else model.cell.A.numel()
    for name in weights:
        masks = getattr(model, f"mask_{name}")
        assert masks.shape == (DEPTH, *model.cell.weight_shape)
        assert set(masks.unique().tolist()) == {0.0, 1.0}
        assert masks.flatten(1).sum(1).tolist() == [round(0.3 * size)] * DEPTH
        assert all(not torch.equal(masks[i], masks[j]) for i in range(DEPTH) for j in range(i))
    assert not any(key.startswith("mask_") for key in model.state_dict())
    assert params(model) == params(build("weight_tied", contraction=contraction))
    # The same seed gives every client and the server the same masks; another seed other masks.
    again = build("weight_tied", sparse_masks=True, mask_density=0.3, contraction=contraction)
    assert all(torch.equal(getattr(model, f"mask_{n}"), getattr(again, f"mask_{n}")) for n in weights)
    other = build_classifier("weight_tied", **SHAPE, depth=DEPTH, seed=8, sparse_masks=True, mask_density=0.3,
                             contraction=contraction)
    assert not torch.equal(getattr(model, f"mask_{weights[0]}"), getattr(other, f"mask_{weights[0]}"))


def test_masked_layers_are_the_hand_written_loop_and_stay_sparse_after_training():
    x, y = data()
    model = build("weight_tied", sparse_masks=True, mask_density=0.5)
    masks = model.mask_weight
    never_used = (masks.sum(0) == 0)           # entries no layer keeps
    assert bool(never_used.any())
    before = model.cell.weight.detach().clone()
    result, _ = train(model, x, y)
    assert result.work.norm_calls == result.local_steps
    after = model.cell.weight.detach()
    assert not torch.equal(before, after)
    assert torch.equal(after[never_used], before[never_used])   # no layer ever sees them: no gradient
    xt = torch.tensor(x[:8])
    u = model.inject(xt)
    z = torch.zeros_like(u)
    for layer in range(DEPTH):
        applied = model.layer_weights(layer)["weight"]
        assert bool((applied[masks[layer] == 0] == 0).all())
        z = model.cell.bind(u, {"weight": masks[layer]})(z)
    out = model(xt)
    assert torch.equal(out.logits, model.readout(z))
    assert not torch.allclose(build("weight_tied")(xt).logits, out.logits)


def test_masks_need_a_weight_tied_model():
    with pytest.raises(ValueError, match="weight-tied"):
        build("explicit", sparse_masks=True)
    with pytest.raises(ValueError, match="weight-tied"):
        build("deq", sparse_masks=True)
    with pytest.raises(ValueError, match="density"):
        build("weight_tied", sparse_masks=True, mask_density=0.0)


# --- the cost model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, masks", [("weight_tied", False), ("weight_tied", True), ("explicit", False)])
def test_the_clock_charges_an_unroll_what_torch_counts(kind, masks):
    """One training step of a depth-4 conv1d unroll: work_flops of the reported work within 15% of
    FlopCounterMode (the same formulas test_clock.py registers for the spectral normalisation)."""
    x, y = data(32)
    model = build(kind, sparse_masks=masks)
    counter = flop_counter()
    with counter:
        result, _ = train_local(model, x, y, cfg=dataclasses.replace(CFG, batch_size=32), forward_budget=6,
                                backward_budget=1, generator=torch.Generator().manual_seed(0))
    measured = counter.get_total_flops()
    charged = charged_flops(model, result.work)
    assert abs(charged / measured - 1) <= 0.15, f"charged {charged:.4g} vs counted {measured:.4g}"
    assert result.work == fleet.unroll_work(samples=32, batch_size=32, epochs=1, depth=DEPTH)
    binds = 1 if kind == "weight_tied" and not masks else DEPTH
    assert model.norm_flops() == binds * model.cell.norm_flops()


def test_unroll_work_is_exact_whatever_the_budget():
    x, y = data(40)
    model = build("weight_tied")
    small, _ = train(model, x, y, forward=1, backward=1)
    large, _ = train(build("weight_tied"), x, y, forward=30, backward=30)
    bound = fleet.unroll_work(samples=40, batch_size=16, epochs=1, depth=DEPTH)
    assert small.work == large.work == bound
    assert bound.grad_evals == 40 * DEPTH and bound.vjp_evals == 40 * (DEPTH - 1) and bound.norm_calls == 3
    assert small.forward_iterations == small.backward_iterations == DEPTH
    assert evaluate(model, x, y, solver="anderson", max_iter=1, tol=1e-3).mean_iterations == DEPTH


# --- budgets, screening, stragglers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path


def test_a_fixed_depth_budget_is_the_depth_on_every_device_and_tier(tiny_path):
    scenario = load_scenario(tiny_path, ["model.kind=weight_tied", "model.depth=5"])
    model = workload.build_scenario_model(scenario, workload.scenario_data(scenario))
    for pid in range(6):
        device = workload.client_device(scenario, pid)
        assert workload.plan_client_budget(scenario, device, model, 100) == fleet.Budget(5, 5)
    assert set(workload.tier_eval_budgets(scenario, model).values()) == {5}
    assert workload.budget_share(scenario, fleet.Budget(5, 5)) == 1.0


@pytest.mark.parametrize("kind", ["weight_tied", "explicit"])
def test_screening_accepts_honest_fixed_depth_replies_and_rejects_inflated_ones(tiny_path, kind):
    driver = RoundDriver(load_scenario(tiny_path, [*ALL_IN, f"model.kind={kind}", "model.depth=3",
                                                   "fleet.tiers.slow.compute_gflops=0.02"]))
    open_round = driver.open_round(1, driver.initial_arrays())
    replies = _replies(driver, open_round)
    for reply in replies:
        facts = driver.facts[reply.partition_id]
        assert reply.metrics["work-grad-evals"] == facts.max_work.grad_evals == 3 * facts.num_examples
        assert reply.metrics["forward-iterations"] == reply.metrics["backward-iterations"] == 3
    _, report = driver.close_round(driver.open_round(1, driver.initial_arrays()), replies)
    assert sorted(report.accepted) == list(range(6)), report.rejected
    first = replies[0]
    for name, symptom in (("work-grad-evals", "exceeds what the assigned budget allows"),
                          ("work-vjp-evals", "exceeds what the assigned budget allows"),
                          ("forward-iterations", "out of range")):
        forged = dataclasses.replace(first, metrics={**first.metrics, name: first.metrics[name] + 1.0})
        _, report = driver.close_round(driver.open_round(1, driver.initial_arrays()), [forged])
        assert name in report.rejected[first.partition_id] and symptom in report.rejected[first.partition_id]


def test_a_slow_device_straggles_with_a_deep_unroll_but_not_with_the_deq(tiny_path):
    def run(*overrides):
        driver = RoundDriver(load_scenario(tiny_path, [*ALL_IN, "fleet.tiers.slow.compute_gflops=0.002",
                                                       *overrides]))
        open_round = driver.open_round(1, driver.initial_arrays())
        _, report = driver.close_round(open_round, _replies(driver, open_round))
        return driver, report

    deq, deq_report = run()
    slow = [pid for pid, facts in deq.facts.items() if facts.tier == "slow"]
    assert slow and all(pid in deq_report.accepted for pid in slow)
    tied, tied_report = run("model.kind=weight_tied", "model.depth=30")
    assert all("straggler" in tied_report.dropped.get(pid, "") for pid in slow)
    assert sorted(tied_report.accepted) == sorted(set(range(6)) - set(slow))
    # The same device, the same cost model: the unroll needs more than the deadline, the DEQ's budget less.
    assert min(tied_report.client_sim_time_s[p] for p in slow) > 2.0 > max(deq_report.client_sim_time_s[p]
                                                                             for p in slow)


# --- every runner: the ServerApp and ClientApp in process, the CLI's schema errors --------------------------------


@pytest.mark.parametrize("kind", ["weight_tied", "weight_tied,masks", "explicit"])
def test_a_fixed_depth_kind_runs_two_rounds_through_the_apps(tmp_path, tiny_path, kind):
    """The ServerApp and the ClientApp (Flower Messages, in process): what simulate, compare, tune and
    deploy-local run. A deadline every device meets: every sampled client's reply is accepted."""
    name, _, masks = kind.partition(",")
    scenario = load_scenario(tiny_path, [f"model.kind={name}", f"model.sparse_masks={bool(masks)}",
                                         "model.depth=3", "training.deadline_s=30"])
    grid = FakeGrid(client_app, workload.fleet_size(scenario), seed=scenario.seed)
    summary = run_federation(grid, scenario, tmp_path, name=name)
    rows = read_metrics(tmp_path)
    assert [row["round"] for row in rows] == [1, 2] and summary["rounds"] == 2
    assert all(row["clients_completed"] == row["clients_sampled"] > 0 for row in rows), rows
    assert all(row["mean_iterations"] == 6.0 for row in rows)
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["final_accuracy"] == rows[-1]["accuracy"]


@pytest.mark.parametrize("setting, key", [
    ("model.kind=recurrent", "model.kind: must be one of deq, weight_tied, explicit"),
    ("model.sparse_masks=true", "model.sparse_masks: needs model.kind weight_tied"),
    ("model.depth=0", "model.depth: must be an integer >= 1"),
    ("model.mask_density=0", "model.mask_density: must be a number in (0, 1]"),
])
def test_schema_errors_exit_2_naming_the_key(capsys, setting, key):
    assert cli_main(["validate", str(DIGITS), "--set", setting]) == 2
    assert key in capsys.readouterr().err


def test_explicit_masks_are_refused_by_the_schema(capsys):
    assert cli_main(["validate", str(DIGITS), "--set", "model.kind=explicit", "--set", "model.sparse_masks=true"]) == 2
    assert "model.sparse_masks: needs model.kind weight_tied" in capsys.readouterr().err
    assert load_scenario(DIGITS, ["model.kind=weight_tied", "model.sparse_masks=true"]).model.sparse_masks
