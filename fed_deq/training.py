"""Local training and evaluation of a DEQ classifier under a solver-iteration budget (torch, no Flower)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fed_deq.fleet import NO_WORK, WorkCounts


@dataclass(frozen=True)
class LocalTrainConfig:
    """How one client trains in one round."""

    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    solver: str
    tol: float
    backward: str
    proximal_mu: float = 0.0
    adversarial: Any = None
    """the scenario's ``training.adversarial`` section (PGD examples, intermediate-state loss), or None"""


@dataclass(frozen=True)
class LocalTrainResult:
    """What one round of local training did, averaged over the solves it ran.

    ``work`` is what it evaluated, counted on whole batches (fed_deq/fleet.py ``WorkCounts``): the input of
    the simulated clock, unlike the per-sample mean iterations above.
    """

    num_examples: int
    local_steps: int
    forward_iterations: float
    backward_iterations: float
    rel_residual: float
    train_loss: float
    work: WorkCounts = field(default=NO_WORK)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and solver behaviour of a model on a labelled set at one budget."""

    accuracy: float
    loss: float
    mean_iterations: float
    rel_residual: float
    num_examples: int


def _sgd(params, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)


def _adam(params, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.learning_rate)


#: Optimizer name → its factory ``(params, cfg) -> torch.optim.Optimizer``. The scenario's
#: ``training.optimizer`` is checked against these names.
OPTIMIZERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = MappingProxyType({"sgd": _sgd, "adam": _adam})


def make_optimizer(params, cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by the scenario (validated upstream)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def _mean_stat(stats: dict, key: str) -> float:
    """Mean of a per-sample stat (tensor or number); non-finite residuals count as their finite cap."""
    value = torch.as_tensor(stats.get(key, 0.0), dtype=torch.float64)
    if value.numel() == 0:
        return 0.0
    return float(value.mean())


def _finite_mean_residual(stats: dict) -> float:
    """Mean relative residual over the batch; a diverged sample (inf) counts as 1.0 (no progress)."""
    residual = torch.as_tensor(stats["rel_residual"], dtype=torch.float64)
    residual = torch.where(torch.isfinite(residual), residual, torch.ones_like(residual))
    return float(residual.mean())


def _batch_work(out, batch: int) -> WorkCounts:
    """Whole-batch work of one training step from a model output whose backward has run."""
    fwd, bwd = out.forward_stats, out.backward_stats
    f_calls = int(fwd["f_calls"])
    adjoint_calls = int(bwd.get("adjoint_f_calls", 0))
    grad_evals = bwd.get("grad_evals")
    return WorkCounts(
        solve_evals=float(batch * f_calls),
        grad_evals=float(grad_evals.sum()) if grad_evals is not None else 0.0,
        vjp_evals=float(batch * int(bwd.get("vjp_calls", 0))),
        samples=float(batch),
        norm_calls=1.0,
        solver_steps=float(batch * (max(f_calls - 1, 0) + max(adjoint_calls - 1, 0))),
    )


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's μ/2 ‖w − w_global‖², which keeps local models near the round's global model."""
    total = torch.zeros(())
    for param, ref in zip(model.parameters(), anchor):
        total = total + (param - ref).pow(2).sum()
    return 0.5 * mu * total


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    cfg: LocalTrainConfig,
    forward_budget: int,
    backward_budget: int,
    generator: torch.Generator,
    warm_start: np.ndarray | None = None,
    reuse_fixed_points: bool = True,
) -> tuple[LocalTrainResult, np.ndarray]:
    """Train ``model`` in place on (x, y) within the given per-solve budgets.

    Returns the round's result and the per-sample fixed points reached (the warm start for next round;
    indexed like ``x``). ``warm_start`` must have one fixed point per sample of ``x`` or be None. With
    ``reuse_fixed_points`` False every solve starts cold, also in the round's later epochs.
    """
    xt, yt = torch.tensor(x), torch.tensor(y)  # copies: cached datasets are read-only
    z_bank = torch.from_numpy(warm_start).clone() if warm_start is not None else None
    optimizer = make_optimizer(model.parameters(), cfg)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else []
    fwd_iters, bwd_iters, residuals, losses, steps = [], [], [], [], 0
    work = NO_WORK
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            z0 = z_bank[idx] if z_bank is not None and reuse_fixed_points else None
            xb = xt[idx]
            if cfg.adversarial is not None:
                xb, attack_work = adversarial_batch(model, xb, yt[idx], cfg, forward_budget, backward_budget,
                                                    generator)
                work = work + attack_work
            out = model(xb, solver=cfg.solver, max_iter=forward_budget, tol=cfg.tol,
                        backward=cfg.backward, backward_max_iter=backward_budget, z0=z0)
            loss = F.cross_entropy(out.logits, yt[idx])
            if cfg.adversarial is not None and cfg.adversarial.intermediate_states:
                extra, extra_work = intermediate_state_loss(model, xb, yt[idx], forward_budget, generator)
                loss, work = loss + extra, work + extra_work
            objective = loss + _proximal_term(model, anchor, cfg.proximal_mu) if anchor else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            # A diverging step must not poison the weights we send back.
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
            optimizer.step()
            steps += 1
            work = work + _batch_work(out, len(idx))
            losses.append(float(loss.detach()))
            fwd_iters.append(_mean_stat(out.forward_stats, "iterations"))
            bwd_iters.append(_mean_stat(out.backward_stats, "iterations"))
            residuals.append(_finite_mean_residual(out.forward_stats))
            z_bank = _store_fixed_points(z_bank, idx, out.z, len(xt))
    result = LocalTrainResult(
        num_examples=len(xt), local_steps=steps,
        forward_iterations=float(np.mean(fwd_iters)) if fwd_iters else 0.0,
        backward_iterations=float(np.mean(bwd_iters)) if bwd_iters else 0.0,
        rel_residual=float(np.mean(residuals)) if residuals else 0.0,
        train_loss=float(np.mean(losses)) if losses else 0.0,
        work=work,
    )
    return result, z_bank.numpy() if z_bank is not None else np.zeros((0,), np.float32)


def adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LocalTrainConfig, forward_budget: int,
                      backward_budget: int, generator: torch.Generator) -> tuple[torch.Tensor, WorkCounts]:
    """PGD examples for one batch, made with the client's own model at its own budgets and backward mode
    (fed_deq/adversarial.py ``pgd``), and the work they took: each step is a model call whose gradient path
    runs to the input, counted as a training step is."""
    from fed_deq.adversarial import pgd, step_size

    a = cfg.adversarial
    work = [NO_WORK]

    def gradient(xa: torch.Tensor, step: int) -> torch.Tensor:
        xa = xa.detach().requires_grad_()
        with torch.enable_grad():
            out = model(xa, solver=cfg.solver, max_iter=forward_budget, tol=cfg.tol, backward=cfg.backward,
                        backward_max_iter=backward_budget)
            (grad,) = torch.autograd.grad(F.cross_entropy(out.logits, y, reduction="sum"), xa)
        work[0] = work[0] + _batch_work(out, len(y))
        return grad

    adv = pgd(gradient, x, eps=a.eps, norm=a.norm, steps=a.steps, step_size=step_size(a, a.eps),
              generator=generator)
    return adv, work[0]


def intermediate_state_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward_budget: int,
                            generator: torch.Generator) -> tuple[torch.Tensor, WorkCounts]:
    """Yang et al.'s regulation along the dynamics: the head's loss on z_k, the k-th state of z <- f(z, x) from
    0 with k uniform in 1..forward_budget, by autograd through the k steps; and its work."""
    k = int(torch.randint(1, forward_budget + 1, (1,), generator=generator))
    u = model.inject(x)
    f = model.cell.bind(u)
    z = torch.zeros_like(u)
    for _ in range(k):
        z = f(z)
    batch = float(len(y))
    work = WorkCounts(solve_evals=0.0, grad_evals=batch * k, vjp_evals=batch * (k - 1), samples=batch, norm_calls=1.0)
    return F.cross_entropy(model.readout(z), y), work


def _store_fixed_points(bank: torch.Tensor | None, idx: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    """Write a batch's fixed points into the per-sample bank, creating it on first use."""
    z = z.detach().to(torch.float32)
    if bank is None:
        bank = torch.zeros((n, *z.shape[1:]), dtype=torch.float32)
    bank[idx] = z
    return bank


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    solver: str,
    max_iter: int,
    tol: float,
    batch_size: int = 512,
) -> EvalResult:
    """Accuracy, loss and solver statistics of ``model`` on (x, y) at forward budget ``max_iter``."""
    if len(x) == 0:
        return EvalResult(accuracy=float("nan"), loss=float("nan"), mean_iterations=0.0,
                          rel_residual=0.0, num_examples=0)
    model.eval()
    correct, loss_sum, iters, residual = 0, 0.0, 0.0, 0.0
    for start in range(0, len(x), batch_size):
        xb = torch.tensor(x[start : start + batch_size])  # a copy: cached datasets are read-only
        yb = torch.tensor(y[start : start + batch_size])
        out = model(xb, solver=solver, max_iter=max_iter, tol=tol, backward="one-step")
        correct += int((out.logits.argmax(dim=1) == yb).sum())
        loss_sum += float(F.cross_entropy(out.logits, yb, reduction="sum"))
        iters += _mean_stat(out.forward_stats, "iterations") * len(xb)
        residual += _finite_mean_residual(out.forward_stats) * len(xb)
    n = len(x)
    return EvalResult(accuracy=correct / n, loss=loss_sum / n, mean_iterations=iters / n,
                      rel_residual=residual / n, num_examples=n)
