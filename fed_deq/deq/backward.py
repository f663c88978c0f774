"""Gradient paths from a fixed point found without autograd.

The solver returns ``z* = f(z_eval)`` (see solvers.find_fixed_point). Every mode starts from the evaluated
point ``z_eval`` and recomputes ``f(z_eval)`` with autograd, so the value that reaches the head in training
is the solver's ``z*`` (for one-step and implicit) and training and evaluation agree at the same budget.
Each mode returns a tensor ``z`` that carries gradients to the parameters (and the injection) and fills a
``stats`` dict when ``loss.backward()`` reaches it. ``stats["iterations"]`` (int64, one entry per sample)
counts vector-Jacobian products through the cell f, the unit the device budgets charge for backward work:

- ``"one-step"`` (Jacobian-free): ``z = f(z_eval)``; 1 backward iteration.
- ``"phantom"``: ``k = backward_max_iter`` unrolled damped steps ``z <- (1 - lam) z + lam f(z)`` from
  ``z_eval`` (with ``lam = 1`` the first step reproduces z*); k backward iterations.
- ``"implicit"``: ``z = f(z_eval)`` and the incoming gradient g is replaced by the solution y of the adjoint
  fixed point ``y = J_f(z_eval)^T y + g``, solved with the forward solver under a budget of
  ``backward_max_iter - 1`` vector-Jacobian products (the last one of the budget is the product that carries
  y into the parameters). Iterations = adjoint iterations + 1, so they never exceed ``backward_max_iter``;
  with ``backward_max_iter = 1`` it is the one-step gradient.

What the gradient path costs is recorded in ``stats`` as well (the simulated clock charges it, see
fed_deq/fleet.py ``WorkCounts``), all counted on the whole batch because every call runs on the whole batch:

- ``grad_evals`` (int64, per sample): evaluations of f with autograd in the forward pass. Every one of them
  is differentiated into the cell's weights in backward (one weight-gradient product each).
- ``vjp_calls`` (0-dim int64): batch-wide vector-Jacobian products with respect to the state, ``J_f(z)^T y``.
  one-step 0 (its input ``z_eval`` is detached, only the weight gradient runs); phantom k - 1 (the first
  step's input is detached); implicit: one per call of the adjoint solver, plus 1 because the final backward
  through ``f(z_in)`` also fills the gradient of the leaf ``z_in`` (computed by autograd, not used).
- ``adjoint_f_calls`` (0-dim int64): calls of the adjoint map by the implicit adjoint solver (0 otherwise);
  they are included in ``vjp_calls`` and also cost the solver's own per-iteration work.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Callable

import torch
from torch import Tensor

from .solvers import solve

#: A gradient path: ``(f, z_star, *, backward_max_iter, solver, tol, solver_options, damping, stats) -> z``.
GradientPath = Callable[..., Tensor]


def check_backward(mode: str, backward_max_iter: int, damping: float) -> None:
    """Raise ValueError for an unknown backward mode, a bad budget or a bad phantom damping."""
    if mode not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {mode!r}; valid modes: {list(BACKWARD_MODES)}")
    if isinstance(backward_max_iter, bool) or not isinstance(backward_max_iter, int) or backward_max_iter < 1:
        raise ValueError(f"backward_max_iter must be an integer >= 1, got {backward_max_iter!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping <= 1:
        raise ValueError(f"phantom_damping must be in (0, 1], got {damping!r}")


def attach_gradient(f: Callable[[Tensor], Tensor], z_eval: Tensor, *, mode: str, backward_max_iter: int,
                    solver: str, tol: float, solver_options: dict, damping: float,
                    stats: dict) -> Tensor:
    """Return z (with autograd) built from the solver's evaluated point ``z_eval``; see the module docstring."""
    check_backward(mode, backward_max_iter, damping)
    return BACKWARD_MODES[mode](f, z_eval.detach(), backward_max_iter=backward_max_iter, solver=solver, tol=tol,
                                solver_options=solver_options, damping=damping, stats=stats)


def _one_step(f, z_star: Tensor, *, stats: dict, **_) -> Tensor:
    z = f(z_star)
    record_on_backward(z, stats, path_cost(z_star.shape[0], z_star.device, iterations=1, grad_evals=1, vjp_calls=0))
    return z


def _phantom(f, z_star: Tensor, *, backward_max_iter: int, damping: float, stats: dict, **_) -> Tensor:
    z = z_star
    for _ in range(backward_max_iter):
        z = torch.lerp(z, f(z), damping) if damping != 1.0 else f(z)
    record_on_backward(z, stats, path_cost(z_star.shape[0], z_star.device, iterations=backward_max_iter,
                                           grad_evals=backward_max_iter, vjp_calls=backward_max_iter - 1))
    return z


def _implicit(f, z_star: Tensor, *, backward_max_iter: int, solver: str, tol: float, solver_options: dict,
              stats: dict, **_) -> Tensor:
    z_in = z_star.clone().requires_grad_()
    z_out = f(z_in)
    if not z_out.requires_grad:
        return z_out
    adjoint_budget = backward_max_iter - 1
    # autograd.grad(z_out, ...) inside the hook fires this same hook again; the flag lets those inner calls
    # pass their vector through untouched instead of recursing.
    solving = [False]

    def adjoint_hook(grad: Tensor) -> Tensor | None:
        if solving[0]:
            return None
        if adjoint_budget == 0 or not bool(torch.isfinite(grad).all()):
            # The one-step gradient: no adjoint solve, but the final backward still fills z_in's gradient.
            stats.update(path_cost(grad.shape[0], grad.device, iterations=1, grad_evals=1, vjp_calls=1))
            return grad

        def adjoint_map(y: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(z_out, z_in, y, retain_graph=True)
            return vjp + grad

        solving[0] = True
        try:
            y, adjoint_stats = solve(adjoint_map, grad, solver=solver, max_iter=adjoint_budget, tol=tol,
                                     **solver_options)
        finally:
            solving[0] = False
        stats.update(path_cost(grad.shape[0], grad.device, iterations=1, grad_evals=1,
                           vjp_calls=int(adjoint_stats["f_calls"]) + 1,
                           adjoint_f_calls=int(adjoint_stats["f_calls"])))
        stats["iterations"] = adjoint_stats["iterations"] + 1
        stats["adjoint_rel_residual"] = adjoint_stats["rel_residual"]
        stats["adjoint_converged"] = adjoint_stats["converged"]
        return y

    z_out.register_hook(adjoint_hook)
    return z_out


def record_on_backward(z: Tensor, stats: dict, values: dict[str, Tensor]) -> None:
    """Copy ``values`` into ``stats`` when the backward pass reaches ``z`` (nothing if it never does)."""
    if z.requires_grad:
        def record(grad: Tensor) -> None:
            stats.update(values)
        z.register_hook(record)


def path_cost(batch: int, device, *, iterations: int, grad_evals: int, vjp_calls: int,
              adjoint_f_calls: int = 0) -> dict[str, Tensor]:
    """The backward stats of a gradient path: per-sample ``iterations``/``grad_evals``, batch-level counts."""
    return {
        "iterations": torch.full((batch,), iterations, dtype=torch.int64, device=device),
        "grad_evals": torch.full((batch,), grad_evals, dtype=torch.int64, device=device),
        "vjp_calls": torch.tensor(vjp_calls, dtype=torch.int64, device=device),
        "adjoint_f_calls": torch.tensor(adjoint_f_calls, dtype=torch.int64, device=device),
    }


#: Backward mode → its gradient path. The scenario's ``model.backward`` is checked against these names.
BACKWARD_MODES: Mapping[str, GradientPath] = MappingProxyType({
    "one-step": _one_step,
    "implicit": _implicit,
    "phantom": _phantom,
})
