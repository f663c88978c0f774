"""Batched fixed-point solvers with per-sample stopping and a hard iteration budget.

Public contract (docs/design.md)::

    z, stats = solve(f, z0, solver="anderson", max_iter=30, tol=1e-4, **options)

Every solver sees a flattened problem ``f: [B, D] -> [B, D]`` and keeps per-sample state with masks, so a
sample stops (its iterate frozen) as soon as its relative residual is below ``tol`` while the others go on.
One call of ``f`` is one iteration for every sample still active; the number of calls never exceeds
``max_iter``.

What a solver returns for each sample is the ``f`` output at the evaluated point with the lowest relative
residual (for a converged sample: the point where it converged), and the stats describe that point:
``abs_residual = ||f(z) - z||``, ``rel_residual = ||f(z) - z|| / ||f(z)||`` where ``z`` is the evaluated point.
For a contraction, the returned ``f(z)`` is at least as close to the fixed point as ``z``.

Cost: per-sample ``iterations`` say how long each sample was active, but ``f`` always runs on the whole batch,
so a batched solve costs ``f_calls`` (a 0-dim int64 stat: the number of times ``f`` was called, counted by
:func:`find_fixed_point` around the solver, whatever the solver does) whole-batch evaluations, i.e. until its
slowest sample stops. :func:`iteration_flops` is the solver's own per-sample linear algebra per iteration.

A sample whose ``f`` output is non-finite, or whose residual grows beyond ``divergence_factor`` times the
problem's scale ``max(||z0||, ||f(z0)||, 1)``, is stopped as divergent: ``converged=False``, residuals ``inf``,
and its returned iterate is its best finite one (``z0`` itself if the very first evaluation blew up).

:func:`find_fixed_point` returns the same plus the evaluated point ``z_eval`` whose image is the returned
``z`` (``z = f(z_eval)``); gradient paths recompute ``f(z_eval)`` with autograd, so a model's training output
equals its evaluation output at the same budget.

A new solver is one function registered with :func:`register_solver`; it receives ``(f, z0, *, max_iter,
tol, **its_options)`` on flattened ``[B, D]`` tensors, drives a :class:`FixedPointTracker` (one
``observe`` per f call) and returns ``tracker.result()``; optionally with a FLOP formula for its own work per
iteration (``register_solver(name, fn, iteration_flops=...)``).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from .flops import lu_solve_flops, matmul_flops
from .tracker import FixedPoint, FixedPointTracker


SolverFn = Callable[..., FixedPoint]

# Name -> solver function. Filled at import time by @register_solver below.
SOLVERS: dict[str, SolverFn] = {}
# Name -> flops(dim, **options): the solver's own per-sample FLOPs per iteration (see iteration_flops).
_ITERATION_FLOPS: dict[str, Callable[..., float]] = {}

_REQUIRED_KEYWORDS = ("max_iter", "tol")


def register_solver(name: str, fn: SolverFn | None = None, *,
                    iteration_flops: Callable[..., float] | None = None):
    """Register ``fn`` under ``name`` (usable as ``@register_solver("name")``).

    ``fn(f, z0, *, max_iter, tol, **options)`` must take ``max_iter`` and ``tol`` as keyword-only
    parameters; its other keyword-only parameters (with defaults) are the options ``solve`` accepts.
    ``iteration_flops(dim, **options)``, if given, is an upper bound of the FLOPs the solver itself spends
    per sample and iteration on ``[B, dim]`` states besides calling ``f`` (see :func:`iteration_flops`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")

    def _register(func: SolverFn) -> SolverFn:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        params = inspect.signature(func).parameters
        missing = [k for k in _REQUIRED_KEYWORDS
                   if k not in params or params[k].kind is not inspect.Parameter.KEYWORD_ONLY]
        if missing:
            raise ValueError(f"solver {name!r} must take keyword-only parameters {missing}")
        SOLVERS[name] = func
        if iteration_flops is not None:
            _ITERATION_FLOPS[name] = iteration_flops
        else:
            _ITERATION_FLOPS.pop(name, None)
        return func

    return _register if fn is None else _register(fn)


def solver_options(name: str) -> dict[str, object]:
    """The options (name -> default) that solver ``name`` accepts besides ``max_iter`` and ``tol``."""
    fn = _lookup(name)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _REQUIRED_KEYWORDS}


def iteration_flops(name: str, dim: int, **options) -> float:
    """Upper bound of the FLOPs solver ``name`` spends per sample on one step to its next iterate, besides
    calling ``f``. A solve that calls f n times makes n - 1 such steps (after the last call it only returns).

    Counted like torch's FlopCounterMode: matrix products at 2 FLOPs per multiply-add (elementwise work and
    norms are not charged), with a full history (the first steps, with a shorter one, cost less).
    ``dim`` is the per-sample state size D.
    picard: 0. anderson (history m): 4 m D (Gram row and mixing products) + an m x m solve. broyden
    (memory m): 12 m D (the step's two products and the update's four). A solver registered without a
    formula costs 0. ``options`` are the solver's options (defaults apply for missing ones).
    """
    defaults = solver_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {name!r}; valid options: {sorted(defaults)}")
    formula = _ITERATION_FLOPS.get(name)
    return 0.0 if formula is None else float(formula(int(dim), **(defaults | options)))


def solve(f: Callable[[Tensor], Tensor], z0: Tensor, *, solver: str, max_iter: int, tol: float,
          **options) -> tuple[Tensor, dict[str, Tensor]]:
    """Find z with f(z) = z for every sample of the batch-first ``z0``, under no_grad.

    Returns ``(z, stats)``: ``z`` has the shape of ``z0``; ``stats`` holds 1-D tensors of length B:
    ``iterations`` (int64, f evaluations spent on the sample), ``abs_residual``, ``rel_residual`` and
    ``converged`` (bool); and ``f_calls``, a 0-dim int64 tensor: how many times f was called on the batch
    (each call evaluates every sample, active or not). Raises ValueError for an unknown solver, an unknown
    option, a bad budget or tolerance, or a ``z0`` that is not a finite floating tensor.
    """
    found = find_fixed_point(f, z0, solver=solver, max_iter=max_iter, tol=tol, **options)
    return found.z, found.stats


def find_fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor, *, solver: str, max_iter: int, tol: float,
                     **options) -> FixedPoint:
    """Like :func:`solve`, but also returns the evaluated point ``z_eval`` with ``z = f(z_eval)``."""
    fn = _lookup(solver)
    _check_options(solver, options)
    _check_budget(max_iter, tol)
    _check_start(z0)
    shape = z0.shape
    batch = shape[0]

    calls = [0]

    def flat_f(z_flat: Tensor) -> Tensor:
        calls[0] += 1
        out = f(z_flat.view(shape))
        if out.shape != shape:
            raise ValueError(f"f changed the shape of z: got {tuple(out.shape)}, expected {tuple(shape)}")
        return out.reshape(batch, -1)

    with torch.no_grad():
        found = fn(flat_f, z0.detach().reshape(batch, -1), max_iter=int(max_iter), tol=float(tol), **options)
    stats = dict(found.stats)
    stats["f_calls"] = torch.tensor(calls[0], dtype=torch.int64, device=z0.device)
    return FixedPoint(found.z.view(shape), found.z_eval.view(shape), stats)


def _lookup(name: str) -> SolverFn:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {sorted(SOLVERS)}")
    return SOLVERS[name]


def _check_options(name: str, options: dict) -> None:
    valid = solver_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {name!r}; valid options: {sorted(valid)}")


def _check_budget(max_iter, tol) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")


def _check_start(z0) -> None:
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got {type(z0).__name__}"
                         f"{'' if not isinstance(z0, Tensor) else ' of dtype ' + str(z0.dtype)}")
    if z0.dim() < 1 or z0.shape[0] == 0 or z0.numel() == 0:
        raise ValueError(f"z0 must be batch-first with at least one sample, got shape {tuple(z0.shape)}")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains non-finite values (NaN or inf)")


def _check_positive(name: str, value, *, upper: float | None = None, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and value > 0
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        bound = f" and <= {upper}" if upper is not None else ""
        what = "an integer" if integer else "a number"
        raise ValueError(f"option {name} must be {what} > 0{bound}, got {value!r}")


def _anderson_flops(dim: int, *, m: int, **_) -> float:
    # Per iteration with a full history: Gram row bmm [m, D] x [D, 1], mixing bmm [1, m] x [m, D], m x m solve.
    return matmul_flops(m, dim, 1) + matmul_flops(1, m, dim) + lu_solve_flops(m)


def _broyden_flops(dim: int, *, m: int, **_) -> float:
    # Step: V g and U^T (V g); update: U^T dz, (.) V, V g, U (.): six [m, D] products per iteration.
    return 6 * matmul_flops(1, m, dim)


@register_solver("picard", iteration_flops=lambda dim, **_: 0.0)
def picard(f, z0: Tensor, *, max_iter: int, tol: float, relaxation: float = 1.0,
           divergence_factor: float = 1e4):
    """Fixed-point (Picard) iteration z <- z + relaxation * (f(z) - z)."""
    _check_positive("relaxation", relaxation, upper=1.0)
    _check_positive("divergence_factor", divergence_factor)
    tracker = FixedPointTracker(z0, tol=tol, divergence_factor=divergence_factor)
    z = z0
    for _ in range(max_iter):
        fz = tracker.observe(z, f(z))
        if tracker.done():
            break
        z_next = fz if relaxation == 1.0 else torch.lerp(z, fz, relaxation)
        z = tracker.hold(z_next, z)
    return tracker.result()


@register_solver("anderson", iteration_flops=_anderson_flops)
def anderson(f, z0: Tensor, *, max_iter: int, tol: float, m: int = 5, lam: float = 1e-4,
             relaxation: float = 1.0, divergence_factor: float = 1e4):
    """Anderson acceleration (type II) with a history of ``m`` points.

    The mixing weights minimise ||sum_i a_i g_i|| subject to sum_i a_i = 1 over the stored residuals
    g_i = f(x_i) - x_i; they solve (G G^T + lam * mean(diag) I) b = 1, a = b / sum(b), one small batched
    m x m system per iteration. The Gram matrix is updated one row per iteration. The regulariser is
    relative to the residual scale, so it does not swamp the system once residuals are small.
    """
    _check_positive("m", m, integer=True)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"option lam must be a number >= 0, got {lam!r}")
    _check_positive("relaxation", relaxation, upper=1.0)
    _check_positive("divergence_factor", divergence_factor)
    tracker = FixedPointTracker(z0, tol=tol, divergence_factor=divergence_factor)
    batch, dim = z0.shape
    fs = z0.new_zeros(batch, m, dim)      # f(x_i)
    gs = z0.new_zeros(batch, m, dim)      # g_i = f(x_i) - x_i
    gram = torch.zeros(batch, m, m, dtype=torch.float64, device=z0.device)
    ones = torch.ones(batch, m, 1, dtype=torch.float64, device=z0.device)
    eye = torch.eye(m, dtype=torch.float64, device=z0.device)
    z = z0
    for k in range(max_iter):
        slot, n = k % m, min(k + 1, m)
        fz = f(z)
        g = fz - z
        fz = tracker.observe(z, fz, g)
        if tracker.done() or k == max_iter - 1:
            break
        if bool(tracker.diverged.any()):
            g = fz - z
        fs[:, slot] = fz
        gs[:, slot] = g
        row = torch.bmm(gs[:, :n], g.unsqueeze(2)).squeeze(2).double()
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        if n == 1:
            z_next = z + relaxation * g
        else:
            weights = _anderson_weights(gram[:, :n, :n], ones[:, :n], eye[:n, :n], lam, slot)
            mix = fs[:, :n] if relaxation == 1.0 else fs[:, :n] - (1.0 - relaxation) * gs[:, :n]
            z_next = torch.bmm(weights.to(z.dtype).unsqueeze(1), mix).squeeze(1)
        z = tracker.hold(z_next, z)
    return tracker.result()


def _anderson_weights(gram: Tensor, ones: Tensor, eye: Tensor, lam: float, newest: int) -> Tensor:
    """Mixing weights summing to 1; samples whose system fails fall back to a plain step from ``newest``."""
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
    system = gram + (lam * scale)[:, None, None] * eye
    b, _ = torch.linalg.solve_ex(system, ones)
    b = b.squeeze(2)
    weights = b / b.sum(1, keepdim=True)
    ok = torch.isfinite(weights).all(1, keepdim=True)
    fallback = torch.zeros_like(weights)
    fallback[:, newest] = 1.0
    return torch.where(ok, weights, fallback)


@register_solver("broyden", iteration_flops=_broyden_flops)
def broyden(f, z0: Tensor, *, max_iter: int, tol: float, m: int = 8, divergence_factor: float = 1e4):
    """Limited-memory ("good") Broyden root finding on g(z) = f(z) - z, without line search.

    The inverse Jacobian of g is approximated as H = -I + sum_i u_i v_i^T with at most ``m`` rank-one
    terms (a ring buffer); the first step is a plain fixed-point step.
    """
    _check_positive("m", m, integer=True)
    _check_positive("divergence_factor", divergence_factor)
    tracker = FixedPointTracker(z0, tol=tol, divergence_factor=divergence_factor)
    batch, dim = z0.shape
    us = z0.new_zeros(batch, m, dim)
    vs = z0.new_zeros(batch, m, dim)
    z, g_prev, z_prev = z0, None, None
    for k in range(max_iter):
        fz = tracker.observe(z, f(z))
        if tracker.done() or k == max_iter - 1:
            break
        g = fz - z
        if g_prev is not None:
            _broyden_update(us, vs, z - z_prev, g - g_prev, (k - 1) % m)
        # Newton-like step dz = -H g = g - U^T (V g).
        step = g - torch.einsum("bmd,bm->bd", us, torch.einsum("bmd,bd->bm", vs, g))
        z_prev, g_prev = z, g
        z = tracker.hold(z + step, z)
    return tracker.result()


def _broyden_update(us: Tensor, vs: Tensor, dz: Tensor, dg: Tensor, slot: int) -> None:
    """Sherman-Morrison update H += u v^T with v = H^T dz, u = (dz - H dg) / (v . dg), in place."""
    v = -dz + torch.einsum("bm,bmd->bd", torch.einsum("bmd,bd->bm", us, dz), vs)
    h_dg = -dg + torch.einsum("bmd,bm->bd", us, torch.einsum("bmd,bd->bm", vs, dg))
    denom = (v * dg).sum(1, keepdim=True)
    # Stopped samples have dz = dg = 0: skip their update rather than divide by zero.
    ok = denom.abs() > 1e-30
    safe = torch.where(ok, denom, torch.ones_like(denom))
    us[:, slot] = torch.where(ok, (dz - h_dg) / safe, 0.0)
    vs[:, slot] = torch.where(ok, v, 0.0)
