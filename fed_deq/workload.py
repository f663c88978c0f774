"""What a client and the server compute each round, from a scenario (torch, no Flower).

The Flower adapters in ``clients/`` and ``server/`` only translate Messages to these calls and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fed_deq import adversary, data, fleet, quantize, seeding
from fed_deq.deq import build_classifier, is_fixed_depth
from fed_deq.scenario import Scenario, num_clients, resolve_tier
from fed_deq.training import LocalTrainConfig, evaluate, train_local

Arrays = dict[str, np.ndarray]


def scenario_data(scenario: Scenario) -> data.DataBundle:
    """The scenario's dataset with the server's validation split held back (memoised per process)."""
    ds = scenario.dataset
    bundle = data.load_dataset(ds.name, seed=scenario.seed, num_samples=ds.num_samples,
                               test_fraction=ds.test_fraction, image_key=ds.image_key, label_key=ds.label_key,
                               probe_samples=scenario.fusion.probe_samples)
    return data.hold_server_validation(bundle, ds.server_validation_samples, scenario.seed)


def build_scenario_model(scenario: Scenario, bundle: data.DataBundle) -> nn.Module:
    """The scenario's classifier (``model.kind``: the DEQ or a fixed-depth baseline), initialised from the
    scenario seed (global RNG state untouched); sparse masks are drawn from the same model seed."""
    m = scenario.model
    return build_classifier(m.kind, m.cell, tuple(bundle.input_shape), bundle.num_classes, depth=m.depth,
                            sparse_masks=m.sparse_masks, mask_density=m.mask_density, width=m.width,
                            contraction=m.contraction, spectral_gain=m.spectral_gain,
                            seed=int(seeding.rng(scenario.seed, "model-init").integers(2**31)))


def model_arrays(model: nn.Module) -> Arrays:
    """The model's state as numpy arrays (copies), keyed by state-dict name."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: Arrays) -> None:
    """Load numpy arrays into the model; missing or extra keys are an error."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)


def num_parameters(model: nn.Module) -> int:
    """Number of scalars the client downloads and uploads."""
    return sum(int(v.numel()) for v in model.state_dict().values())


def client_partition(scenario: Scenario, partition_id: int) -> data.ClientData:
    """The client's local train/validation data."""
    ds, part = scenario.dataset, scenario.dataset.partition
    return data.client_data(scenario_data(scenario), partition_id, num_partitions=fleet_size(scenario),
                            kind=part.kind, seed=scenario.seed, alpha=part.alpha,
                            classes_per_client=part.classes_per_client,
                            min_partition_size=part.min_partition_size,
                            validation_fraction=ds.validation_fraction)


def fleet_size(scenario: Scenario) -> int:
    """Total number of clients of the scenario's fleet (resolved from tier counts/shares; no fleet built)."""
    return num_clients(scenario)


def client_device(scenario: Scenario, partition_id: int, tier: str | None = None) -> fleet.Device:
    """The simulated device of a partition; a deployment may pin the tier through node config."""
    device = fleet.device_of(scenario, partition_id)
    if tier is None or tier == device.tier:
        return device
    return fleet.device_from_tier(resolve_tier(scenario, tier), partition_id)


def plan_client_budget(scenario: Scenario, device: fleet.Device, model: nn.Module, samples: int) -> fleet.Budget:
    """The per-solve iteration budget this device affords within the round deadline.

    A fixed-depth model (``model.kind`` weight_tied or explicit) needs its whole depth on every device: its
    budget is ``depth`` layers forward and ``depth`` back, and a device too slow for it straggles.
    """
    t, m = scenario.training, scenario.model
    if is_fixed_depth(m.kind):
        return fleet.Budget(forward=m.depth, backward=m.depth)
    comm = planned_comm_seconds(scenario, device, model)
    return fleet.plan_budget(device, deadline_s=t.deadline_s, comm_s=comm, samples=samples,
                             epochs=t.local_epochs, cell_flops=model.cell_flops(),
                             overhead_flops=model.overhead_flops(), backward=m.backward,
                             backward_iterations=m.backward_iterations, min_iterations=t.min_iterations,
                             max_iterations=t.max_iterations, batch_size=t.batch_size,
                             norm_flops=model.norm_flops(), solver_flops=model.solver_flops(m.solver),
                             **attack_cost(scenario))


def attack_cost(scenario: Scenario) -> dict:
    """What adversarial training adds to a round's work (``fleet.max_work``'s ``attack_steps`` and
    ``intermediate_states``): nothing without ``training.adversarial``."""
    a = scenario.training.adversarial
    if a is None:
        return {"attack_steps": 0, "intermediate_states": False}
    return {"attack_steps": a.steps, "intermediate_states": a.intermediate_states}


def client_max_work(scenario: Scenario, samples: int, budget: fleet.Budget) -> fleet.WorkCounts:
    """The most work a round on ``samples`` training samples can do with ``budget``: ``fleet.max_work`` for
    the DEQ, ``fleet.unroll_work`` (exact) for a fixed-depth model. The server caps what a reply claims by it."""
    t, m = scenario.training, scenario.model
    if is_fixed_depth(m.kind):
        return fleet.unroll_work(samples=samples, batch_size=t.batch_size, epochs=t.local_epochs, depth=m.depth,
                                 attack_steps=attack_cost(scenario)["attack_steps"])
    return fleet.max_work(samples=samples, batch_size=t.batch_size, epochs=t.local_epochs, forward=budget.forward,
                          backward=budget.backward, backward_mode=m.backward, **attack_cost(scenario))


def budget_share(scenario: Scenario, budget: fleet.Budget) -> float:
    """The share of the largest budget a device got: ``total / training.max_iterations`` for the DEQ, 1 for a
    fixed-depth model (every device runs all of it)."""
    if is_fixed_depth(scenario.model.kind):
        return 1.0
    return budget.total / scenario.training.max_iterations


@dataclass(frozen=True)
class ClientRound:
    """One client's reply for one round: new arrays, metrics, and the warm-start bank to keep.

    ``arrays`` is the upload as it goes on the wire, encoded as ``training.upload`` says (fed_deq/quantize.py);
    the server decodes it before screening.
    """

    arrays: Arrays
    metrics: dict[str, float]
    warm_start: np.ndarray


def arrays_nbytes(arrays: Arrays) -> int:
    """Bytes of a model on the wire: the tensor payload of its ArrayRecord (``quantize.payload_bytes``)."""
    return quantize.payload_bytes(arrays)


def transfer_seconds(device: fleet.Device, bytes_down: int, bytes_up: int) -> float:
    """Simulated seconds to download ``bytes_down`` and upload ``bytes_up`` at the device's bandwidth."""
    return (bytes_down + bytes_up) * fleet.BITS_PER_BYTE / device.bandwidth_bps


def planned_comm_seconds(scenario: Scenario, device: fleet.Device, model: nn.Module) -> float:
    """What a round's communication will cost: the model down in its own dtypes, up as ``training.upload``."""
    arrays = model_arrays(model)
    return transfer_seconds(device, arrays_nbytes(arrays), quantize.upload_bytes(arrays, scenario.training.upload))


def round_clock(scenario: Scenario, device: fleet.Device, model: nn.Module, work: fleet.WorkCounts, *,
                server_round: int, bytes_down: int, bytes_up: int) -> tuple[float, float]:
    """Simulated (compute, communication) seconds of one client round; the client and the server both use it.

    Compute: the FLOPs of the work done (fleet.work_flops) at the device's speed, times its straggler
    slowdown drawn from the scenario seed. Communication: the bytes downloaded and uploaded at its bandwidth.
    """
    flops = fleet.work_flops(work, cell_flops=model.cell_flops(), overhead_flops=model.overhead_flops(),
                             norm_flops=model.norm_flops(), solver_flops=model.solver_flops(scenario.model.solver))
    slowdown = fleet.straggler_slowdown(device, seed=scenario.seed, round=server_round)
    compute_s = fleet.compute_seconds(device, flops) * slowdown
    comm_s = transfer_seconds(device, bytes_down, bytes_up)
    return compute_s, comm_s


def run_client_round(
    scenario: Scenario,
    partition_id: int,
    server_round: int,
    global_arrays: Arrays,
    *,
    budget: fleet.Budget | None = None,
    tier: str | None = None,
    warm_start: np.ndarray | None = None,
    proximal_mu: float = 0.0,
    attack: str | None = None,
) -> ClientRound:
    """Train the global model on this client's data within its budget and report what it cost.

    ``budget`` is the one the server assigned (the train message carries it); without one the client plans
    its own from its device. ``attack`` makes the client misbehave (fed_deq/adversary.py).
    """
    torch.set_num_threads(1)  # one simulated device per core; also keeps float sums reproducible
    bundle = scenario_data(scenario)
    local = client_partition(scenario, partition_id)
    device = client_device(scenario, partition_id, tier)
    model = build_scenario_model(scenario, bundle)
    load_arrays(model, global_arrays)
    if budget is None:
        budget = plan_client_budget(scenario, device, model, len(local.y_train))
    t, m = scenario.training, scenario.model
    cfg = LocalTrainConfig(epochs=t.local_epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                           optimizer=t.optimizer, momentum=t.momentum, solver=m.solver, tol=m.tol,
                           backward=m.backward, proximal_mu=proximal_mu, adversarial=t.adversarial)
    if warm_start is not None and (not t.warm_start or len(warm_start) != len(local.y_train)):
        warm_start = None
    gen = torch.Generator().manual_seed(int(seeding.rng(scenario.seed, "shuffle", server_round,
                                                      partition_id).integers(2**31)))
    stage = adversary.stage_of(attack)
    y_train = adversary.flip_labels(local.y_train, bundle.num_classes) if stage == "data" else local.y_train
    result, bank = train_local(model, local.x_train, y_train, cfg=cfg, forward_budget=budget.forward,
                               backward_budget=budget.backward, generator=gen, warm_start=warm_start,
                               reuse_fixed_points=t.warm_start)
    if stage == "update":
        poison_model(scenario, attack, model, global_arrays, server_round, partition_id)
    wire, sent = encode_upload(model, t.upload)
    val = validate(scenario, model, local, budget)
    compute_s, comm_s = round_clock(scenario, device, model, result.work, server_round=server_round,
                                    bytes_down=arrays_nbytes(global_arrays), bytes_up=arrays_nbytes(wire))
    metrics = _round_metrics(scenario, budget, result, val, server_round, partition_id, compute_s, comm_s)
    if stage == "reply":
        # The attack rewrites what an honest client would send; what it sends is then encoded like any upload.
        attacked, metrics = adversary.apply(attack, sent, metrics)
        wire = quantize.encode(attacked, t.upload)
    keep = bank if t.warm_start else np.zeros((0,), np.float32)  # nothing to carry to the next round
    return ClientRound(arrays=wire, metrics=metrics, warm_start=keep)


def poison_model(scenario: Scenario, attack: str, model: nn.Module, global_arrays: Arrays, server_round: int,
                 partition_id: int) -> None:
    """Replace the trained model by the one a model-poisoning attacker sends (fed_deq/adversary.py), before it
    is validated and encoded, so every claim the client makes agrees with the poisoned model."""
    rng = seeding.rng(scenario.seed, "attack", server_round, partition_id)
    value = adversary.parameter_value(scenario, partition_id, attack)
    load_arrays(model, adversary.poison(attack, value, model_arrays(model), global_arrays, rng))


def encode_upload(model: nn.Module, encoding: str) -> tuple[Arrays, Arrays]:
    """The trained model as it goes on the wire and as the server will decode it; ``model`` is left holding
    the decoded arrays, so the client validates (and reports on) exactly the model the server re-evaluates."""
    arrays = model_arrays(model)
    wire = quantize.encode(arrays, encoding)
    sent = quantize.decode(wire, encoding, arrays)
    load_arrays(model, sent)
    return wire, sent


def validate(scenario: Scenario, model: nn.Module, local: data.ClientData, budget: fleet.Budget):
    """The model on the client's validation split at the client's forward budget, from a cold start.

    The server repeats exactly this call to check what the client reports (rounds.py).
    """
    m = scenario.model
    return evaluate(model, local.x_val, local.y_val, solver=m.solver, max_iter=budget.forward, tol=m.tol)


def _round_metrics(scenario, budget, result, val, server_round, partition_id, compute_s,
                   comm_s) -> dict[str, float]:
    """The reply metrics the server screens (names are the wire contract; docs/design.md lists them)."""
    work = result.work
    return {
        "num-examples": float(result.num_examples),
        "local-steps": float(result.local_steps),
        "forward-iterations": result.forward_iterations,
        "backward-iterations": result.backward_iterations,
        "budget-total": float(budget.total),
        "budget-share": budget_share(scenario, budget),
        "rel-residual": result.rel_residual,
        "val-accuracy": float(val.accuracy) if val.num_examples else 0.0,
        "val-rel-residual": float(val.rel_residual),
        "train-loss": result.train_loss,
        "work-solve-evals": float(work.solve_evals),
        "work-grad-evals": float(work.grad_evals),
        "work-vjp-evals": float(work.vjp_evals),
        "work-samples": float(work.samples),
        "work-norm-calls": float(work.norm_calls),
        "work-solver-steps": float(work.solver_steps),
        "compute-s": compute_s,
        "comm-s": comm_s,
        "sim-time-s": compute_s + comm_s,
        "server-round": float(server_round),
        "partition-id": float(partition_id),
    }


def tier_eval_budgets(scenario: Scenario, model: nn.Module) -> dict[str, int]:
    """Forward budget a typical device of each tier affords (mean partition size), for per-tier evaluation."""
    layout = fleet.tier_layout(scenario)
    bundle = scenario_data(scenario)
    samples = max(1, int(len(bundle.y_train) * (1 - scenario.dataset.validation_fraction) / len(layout)))
    tiers = {tier.name: tier for tier in scenario.fleet.tiers}
    budgets: dict[str, int] = {}
    for pid, name in enumerate(layout):  # tiers in the order their first device appears, as before
        if name not in budgets:
            device = fleet.device_from_tier(tiers[name], pid)
            budgets[name] = plan_client_budget(scenario, device, model, samples).forward
    return budgets


def evaluate_global(scenario: Scenario, model: nn.Module, arrays: Arrays,
                    tier_budgets: dict[str, int], *, server_validation: bool = True) -> dict:
    """Centralised test accuracy at the evaluation budget and at each tier's own budget, and the accuracy on
    the server's validation split at the evaluation budget (None without one, or with ``server_validation``
    false): tuning reads only that."""
    bundle = scenario_data(scenario)
    load_arrays(model, arrays)
    m = scenario.model
    main = evaluate(model, bundle.x_test, bundle.y_test, solver=m.solver, max_iter=m.eval_iterations, tol=m.tol)
    # Each distinct budget is evaluated once: tiers often share one (the cap), or the evaluation budget.
    at_budget = {m.eval_iterations: main.accuracy}
    for k in sorted(set(tier_budgets.values()) - set(at_budget)):
        at_budget[k] = evaluate(model, bundle.x_test, bundle.y_test, solver=m.solver, max_iter=k, tol=m.tol).accuracy
    by_tier = {tier: at_budget[k] for tier, k in tier_budgets.items()}
    server_val = None
    if server_validation and bundle.y_server_val is not None and len(bundle.y_server_val):
        server_val = evaluate(model, bundle.x_server_val, bundle.y_server_val, solver=m.solver,
                              max_iter=m.eval_iterations, tol=m.tol).accuracy
    return {"accuracy": main.accuracy, "loss": main.loss, "eval_iterations": main.mean_iterations,
            "eval_rel_residual": main.rel_residual, "accuracy_by_tier": by_tier, "server_val_accuracy": server_val}


def evaluate_adversarial(scenario: Scenario, model: nn.Module, arrays: Arrays, tier_budgets: dict[str, int],
                         settings=None, on_step=None) -> dict:
    """Robust test accuracy of the global model ``arrays`` under the scenario's attacks (``settings``: an
    ``evaluation.adversarial`` section to use instead of the scenario's), at the evaluation budget ("eval")
    and at each tier's budget; see fed_deq/adversarial.py. Seeded by the scenario: the same model gives the
    same figures."""
    from fed_deq.adversarial import evaluate_under_attack

    settings = settings or scenario.evaluation.adversarial
    if settings is None:
        raise ValueError("the scenario has no evaluation.adversarial section and no settings were given")
    bundle = scenario_data(scenario)
    load_arrays(model, arrays)
    m = scenario.model
    return evaluate_under_attack(model, bundle.x_test, bundle.y_test, solver=m.solver, tol=m.tol,
                                 budgets={"eval": m.eval_iterations, **tier_budgets}, settings=settings,
                                 seed=(scenario.seed, "adversarial-eval"), dynamics=not is_fixed_depth(m.kind),
                                 on_step=on_step)
