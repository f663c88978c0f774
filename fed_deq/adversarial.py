"""Robust accuracy of a model under input attacks, with gradients taken through the fixed-point solve.

Two attacks, both projected gradient ascent on the cross-entropy within an ℓ∞ or ℓ2 ball of radius ε around
each test input (Madry et al.'s PGD: ``steps`` steps of ``step_size``, default 2.5·ε/steps, from a seeded
random start in the ball):

- ``pgd`` attacks the prediction the model makes at the budget under test. Its gradient is the implicit one
  (``backward="implicit"``, fed_deq/deq/backward.py): the adjoint fixed point y = J_fᵀ y + g solved at the
  point the solver reached, with ``adjoint_iterations`` vector-Jacobian products — the gradient of the
  equilibrium by the implicit function theorem, which an attacker who knows the model computes at no device
  cost. tests/test_adversarial.py checks it against autograd through a long unrolled solve. Fixed-depth
  models (``weight_tied``, ``explicit``) take their ordinary backpropagation gradient.
- ``intermediate`` (Yang et al., "Improving Adversarial Robustness of DEQs with Explicit Regulations Along
  the Neural Dynamics"): each step differentiates the loss of the head on a random intermediate state z_k of
  the unrolled dynamics z ← f(z, x) from z = 0 (k uniform in 1..budget, seeded), by autograd through those k
  steps. Yang et al. show that attacks on the final state alone under-estimate a DEQ's vulnerability
  (gradients at the equilibrium can be obfuscated) while intermediate states expose it. DEQ models only.

The adversarial inputs are then classified as clean inputs are: at the budget, from a cold start, in batches
of 512 as ``training.evaluate`` does, so ε = 0 (no perturbation, no gradient) gives exactly the clean
accuracy. Robust accuracy at ε counts a sample as correct only if it is classified correctly at every
ε' ≤ ε: an adversarial input found in a smaller ball lies in every larger one, so robust accuracy never
increases with ε. ``worst`` counts a sample correct only if it survives both attacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_deq import seeding
from fed_deq.scenario.schema import AdversarialEvalConfig as AttackSettings

#: Inputs classified (and attacked) together, as training.evaluate batches them.
BATCH = 512
ATTACKS = ("pgd", "intermediate")


def step_size(settings: AttackSettings, eps: float) -> float:
    """The step size at ``eps``: the configured one, else Madry et al.'s 2.5·ε/steps."""
    return settings.step_size if settings.step_size is not None else 2.5 * eps / settings.steps


@dataclass(frozen=True)
class Solve:
    """How the model under attack solves: the scenario's solver and tolerance at a forward ``budget``."""

    solver: str
    budget: int
    tol: float


# --- gradients through the solve ------------------------------------------------------------------------------


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, solve: Solve, adjoint_iterations: int) -> Tensor:
    """∂ CE(model(x), y) / ∂x (summed over the batch), through the fixed-point solve by the implicit
    gradient with ``adjoint_iterations`` vector-Jacobian products; the parameters get no gradient."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        out = model(x, solver=solve.solver, max_iter=solve.budget, tol=solve.tol, backward="implicit",
                    backward_max_iter=adjoint_iterations)
        loss = F.cross_entropy(out.logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def intermediate_gradient(model: nn.Module, x: Tensor, y: Tensor, k: int) -> Tensor:
    """∂ CE(head(z_k), y) / ∂x, with z_k the k-th state of z ← f(z, x) from z = 0, by autograd through the k
    steps (Yang et al.'s attack on the neural dynamics)."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        u = model.inject(x)
        f = model.cell.bind(u)
        z = torch.zeros_like(u)
        for _ in range(k):
            z = f(z)
        loss = F.cross_entropy(model.readout(z), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


# --- projected gradient ascent ----------------------------------------------------------------------------------


def pgd(gradient: Callable[[Tensor, int], Tensor], x: Tensor, *, eps: float, norm: str, steps: int,
        step_size: float, generator: torch.Generator | None = None) -> Tensor:
    """x + δ with ‖δ‖ ≤ eps (per sample), δ grown by ``steps`` ascent steps on ``gradient(x + δ, step)``.

    ``norm``: "linf" (sign steps, clipping) or "l2" (normalised steps, rescaling). With ``generator`` the
    start is a random point of the ball; eps = 0 returns x itself (a copy), no gradient taken.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    delta = _random_start(x, eps, norm, generator) if generator is not None else torch.zeros_like(x)
    for step in range(steps):
        grad = gradient(x + delta, step)
        delta = _project(delta + step_size * _direction(grad, norm), eps, norm)
    return (x + delta).detach()


def _direction(grad: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return grad / flat.reshape(-1, *([1] * (grad.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1).norm(dim=1)
    factor = (eps / flat.clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.reshape(-1, *([1] * (delta.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    radius = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype) * eps
    return _project(_direction(direction, "l2") * radius.reshape(-1, *([1] * (x.dim() - 1))), eps, "l2")


# --- robust accuracy ------------------------------------------------------------------------------------------


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor, solve: Solve) -> np.ndarray:
    """Per sample, whether the model classifies it correctly at the budget (cold start, batches as evaluate)."""
    model.eval()
    hits = []
    for start in range(0, len(x), BATCH):
        out = model(x[start:start + BATCH], solver=solve.solver, max_iter=solve.budget, tol=solve.tol,
                    backward="one-step")
        hits.append((out.logits.argmax(dim=1) == y[start:start + BATCH]).numpy())
    return np.concatenate(hits) if hits else np.zeros(0, bool)


def attacked(model: nn.Module, x: Tensor, y: Tensor, solve: Solve, settings: AttackSettings, attack: str,
             eps: float, seed: Sequence[int | str]) -> Tensor:
    """The adversarial inputs of ``attack`` at ``eps`` for every sample, batch by batch, seeded by ``seed``."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    out = []
    for index, start in enumerate(range(0, len(x), BATCH)):
        xb, yb = x[start:start + BATCH], y[start:start + BATCH]
        rng = seeding.rng(*seed, attack, repr(float(eps)), index)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        if attack == "pgd":
            def gradient(xa: Tensor, step: int, yb=yb) -> Tensor:
                return input_gradient(model, xa, yb, solve, settings.adjoint_iterations)
        else:
            depths = rng.integers(1, solve.budget + 1, size=settings.steps)

            def gradient(xa: Tensor, step: int, yb=yb, depths=depths) -> Tensor:
                return intermediate_gradient(model, xa, yb, int(depths[step]))
        out.append(pgd(gradient, xb, eps=eps, norm=settings.norm, steps=settings.steps,
                       step_size=step_size(settings, eps), generator=generator))
    return torch.cat(out) if out else x.clone()


def robust_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, solve: Solve, settings: AttackSettings,
                    seed: Sequence[int | str], *, attacks: Sequence[str] = ATTACKS,
                    on_step: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Attack → robust accuracy at each of ``settings.eps`` (in the order given), and ``worst`` over the
    attacks; non-increasing in ε by construction (see the module docstring). ``on_step`` is called after
    each (attack, ε), for progress."""
    xt, yt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
    order = sorted(range(len(settings.eps)), key=lambda i: settings.eps[i])
    survived = {attack: np.ones(len(yt), bool) for attack in attacks}
    accuracy = {attack: [math.nan] * len(settings.eps) for attack in [*attacks, "worst"]}
    for i in order:
        eps = float(settings.eps[i])
        for attack in attacks:
            xa = xt if eps == 0 else attacked(model, xt, yt, solve, settings, attack, eps, seed)
            survived[attack] &= correct(model, xa, yt, solve)
            accuracy[attack][i] = float(survived[attack].mean()) if len(yt) else math.nan
            if on_step is not None:
                on_step()
        worst = np.logical_and.reduce([survived[a] for a in attacks])
        accuracy["worst"][i] = float(worst.mean()) if len(yt) else math.nan
    return accuracy


def evaluate_under_attack(model: nn.Module, x: np.ndarray, y: np.ndarray, *, solver: str, tol: float,
                          budgets: Mapping[str, int], settings: AttackSettings, seed: Sequence[int | str],
                          dynamics: bool, on_step: Callable[[], None] | None = None) -> dict:
    """Robust accuracy at every named budget (``{"eval": 30, "phone-low": 2, ...}``) on the first
    ``settings.samples`` samples; each distinct budget is attacked once. ``dynamics``: whether the model has
    solver dynamics to attack along (a DEQ); fixed-depth models get ``pgd`` only. ``on_step``: called
    ``attack_steps(...)`` times in all, for progress."""
    n = min(settings.samples, len(y))
    x, y = np.asarray(x)[:n], np.asarray(y)[:n]
    attacks = attack_names(settings, dynamics)
    by_budget = {}
    for budget in sorted(set(budgets.values())):
        by_budget[budget] = robust_accuracy(model, x, y, Solve(solver, int(budget), tol), settings,
                                            (*seed, "budget", int(budget)), attacks=attacks, on_step=on_step)
    return {"norm": settings.norm, "eps": [float(e) for e in settings.eps], "steps": settings.steps,
            "step_size": [step_size(settings, float(e)) for e in settings.eps], "samples": n,
            "gradient": (f"implicit (adjoint fixed point, {settings.adjoint_iterations} iterations)"
                         if dynamics else "backpropagation through the fixed depth"),
            "budgets": dict(budgets), "attacks": list(attacks),
            "accuracy": {name: by_budget[budget] for name, budget in budgets.items()}}


def attack_names(settings: AttackSettings, dynamics: bool) -> tuple[str, ...]:
    """The attacks run: ``pgd``, and ``intermediate`` for a model with solver dynamics if the settings ask."""
    return ATTACKS if settings.intermediate and dynamics else ("pgd",)


def attack_steps(settings: AttackSettings, budgets: Mapping[str, int], dynamics: bool) -> int:
    """How many times ``evaluate_under_attack`` calls ``on_step``: distinct budgets x radii x attacks."""
    return len(set(budgets.values())) * len(settings.eps) * len(attack_names(settings, dynamics))
