"""The simulated clock: whole-batch work counts, the max-work bound, and FLOPs checked against torch.

The key test (``test_work_flops_match_torch_flop_counter``) runs one real training step and compares what the
clock charges for it (``fleet.work_flops`` of ``LocalTrainResult.work``) with what
``torch.utils.flop_counter.FlopCounterMode`` counts over the same step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fed_deq.deq import build_model, find_fixed_point, iteration_flops, register_solver, solve
from fed_deq.deq import flops as fl
from fed_deq.deq.solvers import SOLVERS
from fed_deq.deq.tracker import FixedPointTracker
from fed_deq.fleet import (
    NO_WORK,
    Budget,
    Device,
    WorkCounts,
    compute_seconds,
    local_steps,
    max_work,
    plan_budget,
    split_budget,
    work_flops,
)
from fed_deq.training import LocalTrainConfig, LocalTrainResult, train_local
from tests import test_fleet

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def training_flops(samples, epochs, overhead_flops, cell_flops, forward_iters, backward_iters) -> float:
    """The clock before the honest cost model (mean per-sample iterations, nothing else), for comparison."""
    return float(epochs) * float(samples) * (3 * overhead_flops + forward_iters * cell_flops
                                             + 2 * backward_iters * cell_flops)

MODES = ("one-step", "phantom", "implicit")
SOLVER_NAMES = ("picard", "anderson", "broyden")


# ----------------------------------------------------------------------------------------------- FLOP counting


def _raw(formula):
    """Mark a FlopCounterMode formula as taking the op's real arguments (tensors), not just their shapes."""
    formula._get_raw = True
    return formula


def _points(t: torch.Tensor, dims) -> int:
    return math.prod(t.shape[d] for d in dims)


@_raw
def _fft_r2c(x, dim, *args, out_val=None, **kwargs):
    n = _points(x, dim)
    return int(fl.fft_flops(n, kind="r2c", signals=x.numel() // n))


@_raw
def _fft_c2c(x, dim, *args, out_val=None, **kwargs):
    n = _points(x, dim)
    return int(fl.fft_flops(n, kind="c2c", signals=x.numel() // n))


@_raw
def _fft_c2r(x, dim, *args, out_val=None, **kwargs):
    n = _points(out_val, dim)
    return int(fl.fft_flops(n, kind="c2r", signals=out_val.numel() // n))


def _autograd_needs(a: torch.Tensor) -> bool:
    # torch computes eigen/singular vectors for eigvalsh/svdvals/matrix_norm(ord=2) only when autograd may
    # need them -- or whenever a dispatch mode is active, which FlopCounterMode is. Charge what a normal run
    # computes: the formula sees the caller's grad mode and the input's requires_grad.
    return torch.is_grad_enabled() and a.requires_grad


@_raw
def _eigh(a, UPLO="L", compute_v=True, *, out_val=None):
    n = a.shape[-1]
    return int(fl.eigh_flops(n, is_complex=a.is_complex(), vectors=compute_v and _autograd_needs(a),
                             batch=a.numel() // (n * n)))


@_raw
def _svd(a, full_matrices=False, compute_uv=True, *, driver=None, out_val=None):
    m, n = a.shape[-2:]
    return int(fl.svd_flops(m, n, is_complex=a.is_complex(), vectors=compute_uv and _autograd_needs(a),
                            batch=a.numel() // (m * n)))


@_raw
def _solve_ex(a, b, *args, out_val=None, **kwargs):
    n = a.shape[-1]
    rhs = b.shape[-1] if b.dim() == a.dim() else 1
    return int(fl.lu_solve_flops(n, rhs, is_complex=a.is_complex(), batch=a.numel() // (n * n)))


@_raw
def _mm(a, b, *args, out_val=None, **kwargs):
    return int(fl.matmul_flops(a.shape[0], a.shape[1], b.shape[1], is_complex=a.is_complex()))


@_raw
def _bmm(a, b, *args, out_val=None, **kwargs):
    return int(fl.matmul_flops(a.shape[1], a.shape[2], b.shape[2], is_complex=a.is_complex(), batch=a.shape[0]))


aten = torch.ops.aten
# FlopCounterMode counts convolutions and real matrix products (2 FLOPs per multiply-add) and nothing else;
# the spectral normalisation's FFTs, Hermitian eigensolve and SVD, and Anderson's small solve, get the
# standard estimates of fed_deq/deq/flops.py from the shapes each op really sees, and complex matrix products
# are counted at 8 FLOPs per multiply-add (torch's formula counts 2 whatever the dtype).
FLOP_FORMULAS = {
    aten._fft_r2c: _fft_r2c, aten._fft_c2c: _fft_c2c, aten._fft_c2r: _fft_c2r,
    aten._linalg_eigh: _eigh, aten._linalg_svd: _svd, aten._linalg_solve_ex: _solve_ex,
    aten.mm: _mm, aten.bmm: _bmm,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def charged_flops(model, work: WorkCounts, solver: str = "anderson") -> float:
    return work_flops(work, cell_flops=model.cell_flops(), overhead_flops=model.overhead_flops(),
                      norm_flops=model.norm_flops(), solver_flops=model.solver_flops(solver))


# ----------------------------------------------------------------------------------------------- cost model


def test_work_flops_is_the_documented_formula():
    counts = WorkCounts(solve_evals=10, grad_evals=3, vjp_evals=2, samples=4, norm_calls=5, solver_steps=7)
    flops = work_flops(counts, cell_flops=100, overhead_flops=10, norm_flops=1000, solver_flops=1)
    assert flops == 10 * 100 + 3 * 2 * 100 + 2 * 100 + 4 * 3 * 10 + 5 * 1000 + 7 * 1
    assert work_flops(NO_WORK, cell_flops=100, overhead_flops=10, norm_flops=1000) == 0.0
    assert counts + counts == WorkCounts(20, 6, 4, 8, 10, 14)
    assert LocalTrainResult(1, 1, 1.0, 1.0, 0.1, 0.5).work == NO_WORK


def test_local_steps_counts_the_short_last_batch():
    assert local_steps(40, 16, 2) == 6
    assert local_steps(32, 32, 3) == 3 and local_steps(0, 8, 2) == 0
    with pytest.raises(ValueError):
        local_steps(10, 0, 1)


@pytest.mark.parametrize("mode, grad, vjp, steps", [
    ("one-step", 1, 0, 4),          # forward - 1 solver steps
    ("phantom", 3, 2, 4),
    ("implicit", 1, 3, 4 + 1),      # + the adjoint solver's (k - 1) - 1 steps
])
def test_max_work_per_backward_mode(mode, grad, vjp, steps):
    bound = max_work(samples=40, batch_size=16, epochs=2, forward=5, backward=3, backward_mode=mode)
    passes = 80
    assert bound == WorkCounts(solve_evals=passes * 5, grad_evals=passes * grad, vjp_evals=passes * vjp,
                               samples=passes, norm_calls=6, solver_steps=passes * steps)
    with pytest.raises(ValueError):
        max_work(samples=40, batch_size=16, epochs=2, forward=5, backward=3, backward_mode="adjoint")


def test_the_planner_charges_the_normalisation_and_more_than_the_old_clock():
    dev = Device(0, "t", 0.1e9, 10e6, 1.0, 0.0, 0.0, 1.0)
    args = dict(deadline_s=10.0, comm_s=0.1, samples=160, epochs=1, cell_flops=test_fleet.CELL_FLOPS,
                overhead_flops=test_fleet.OVERHEAD_FLOPS, backward="one-step", backward_iterations=4,
                min_iterations=2, max_iterations=30, batch_size=32)
    free = plan_budget(dev, norm_flops=0.0, **args)
    normalised = plan_budget(dev, norm_flops=test_fleet.NORM_FLOPS, **args)
    assert normalised.total < free.total
    budget = Budget(7, 1)
    bound = max_work(samples=160, batch_size=32, epochs=1, forward=7, backward=1, backward_mode="one-step")
    old = training_flops(160, 1, test_fleet.OVERHEAD_FLOPS, test_fleet.CELL_FLOPS, budget.forward, budget.backward)
    assert work_flops(bound, cell_flops=test_fleet.CELL_FLOPS, overhead_flops=test_fleet.OVERHEAD_FLOPS,
                      norm_flops=test_fleet.NORM_FLOPS) > old


def test_torch_free_constants_of_test_fleet_match_the_default_model():
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10, width=32)
    assert model.cell_flops() == test_fleet.CELL_FLOPS
    assert model.overhead_flops() == test_fleet.OVERHEAD_FLOPS
    assert model.norm_flops() == pytest.approx(test_fleet.NORM_FLOPS, rel=1e-6)
    assert model.solver_flops("anderson") == pytest.approx(test_fleet.SOLVER_FLOPS, rel=1e-4)
    assert sum(p.numel() for p in model.parameters()) == test_fleet.DEFAULT_MODEL_PARAMS


# ----------------------------------------------------------------------------------------------- batch-level counts


class Counting:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def _late_sample_problem():
    """Sample 0 converges after a few steps, sample 1 (a slow contraction) much later."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64)
    w *= 0.97 / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(16, generator=g, dtype=torch.float64)

    def f(z):
        return torch.cat([0.05 * z[:1] + 1.0, torch.tanh(z[1:] @ w.T + b)])

    return f, torch.zeros(2, 16, dtype=torch.float64)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_a_late_sample_makes_the_whole_batch_pay(solver):
    f, z0 = _late_sample_problem()
    counting = Counting(f)
    found = find_fixed_point(counting, z0, solver=solver, max_iter=80, tol=1e-6)
    iterations = found.stats["iterations"]
    calls = found.stats["f_calls"]
    assert calls.dtype == torch.int64 and calls.dim() == 0
    assert int(calls) == counting.calls == int(iterations.max())
    easy, hard = iterations.tolist()
    assert easy < hard
    # The batch is charged batch_size x f-calls, not the per-sample mean (which misses hard - easy evaluations).
    assert 2 * int(calls) == 2 * hard > int(iterations.sum()) == easy + hard


def test_f_calls_count_every_call_a_solver_makes():
    name = "test-picard-with-extra-call"

    def extra(f, z0, *, max_iter, tol):
        tracker = FixedPointTracker(z0, tol=tol, divergence_factor=1e4)
        z = z0
        for _ in range(max_iter):
            fz = tracker.observe(z, f(z))
            if tracker.done():
                break
            z = tracker.hold(fz, z)
        f(z)   # e.g. one more evaluation to return f(z_eval): not an iteration of any sample, still paid for
        return tracker.result()

    register_solver(name, extra)
    try:
        counting = Counting(lambda v: 0.5 * v + 1.0)
        _, stats = solve(counting, torch.zeros(3, 2), solver=name, max_iter=4, tol=0.0)
        assert int(stats["iterations"].max()) == 4
        assert int(stats["f_calls"]) == counting.calls == 5
        assert iteration_flops(name, 100) == 0.0
    finally:
        SOLVERS.pop(name, None)


def test_solver_iteration_flops():
    assert iteration_flops("picard", 1280) == 0.0
    assert iteration_flops("anderson", 1280) == pytest.approx(4 * 5 * 1280 + 2 / 3 * 125 + 2 * 25)
    assert iteration_flops("anderson", 1280, m=3) < iteration_flops("anderson", 1280)
    assert iteration_flops("broyden", 1280, m=2) == 12 * 2 * 1280
    with pytest.raises(ValueError, match="unknown option"):
        iteration_flops("picard", 10, m=3)


def _cfg(backward: str, tol: float, batch_size: int = 16) -> LocalTrainConfig:
    return LocalTrainConfig(epochs=2, batch_size=batch_size, learning_rate=0.05, optimizer="sgd", momentum=0.9,
                            solver="anderson", tol=tol, backward=backward)


def _record_outputs(model) -> list:
    """Make ``model`` keep every DEQOutput it returns (train_local does not expose them)."""
    outputs, forward = [], model.forward

    def keep(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append(out)
        return out

    model.forward = keep
    return outputs


def test_train_local_charges_whole_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 40)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
    with torch.no_grad():   # warm starts at the fixed points: every sample converges at once ...
        bank = model(torch.tensor(x), solver="anderson", max_iter=50, tol=1e-7).z.numpy().copy()
    bank[0] = 0.0           # ... except sample 0, which starts cold and needs several iterations
    outputs = _record_outputs(model)
    cfg = dataclasses.replace(_cfg("one-step", 1e-3), epochs=1)
    result, _ = train_local(model, x, y, cfg=cfg, forward_budget=30, backward_budget=1,
                            generator=torch.Generator().manual_seed(0), warm_start=bank)
    (out,) = outputs
    iterations = out.forward_stats["iterations"]
    assert int(iterations.min()) == 1 < int(iterations.max()) == int(out.forward_stats["f_calls"])
    assert int((iterations == 1).sum()) == 15
    work = result.work
    assert work.solve_evals == 16 * int(out.forward_stats["f_calls"]) > float(iterations.sum())
    assert result.forward_iterations == pytest.approx(float(iterations.float().mean()))
    assert work.samples == 16 and work.norm_calls == 1 and work.grad_evals == 16 and work.vjp_evals == 0


@pytest.mark.parametrize("mode, k", [("one-step", 1), ("phantom", 3), ("implicit", 4)])
def test_backward_stats_say_what_the_gradient_path_evaluated(mode, k):
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    out = model(x, solver="anderson", max_iter=10, tol=1e-3, backward=mode, backward_max_iter=k)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    stats = out.backward_stats
    grad_evals = stats["grad_evals"]
    assert grad_evals.dtype == torch.int64 and grad_evals.shape == (4,)
    assert stats["vjp_calls"].dim() == 0 and stats["adjoint_f_calls"].dim() == 0
    if mode == "one-step":
        assert grad_evals.tolist() == [1] * 4 and int(stats["vjp_calls"]) == 0
    elif mode == "phantom":
        assert grad_evals.tolist() == [k] * 4 and int(stats["vjp_calls"]) == k - 1
    else:
        adjoint = int(stats["adjoint_f_calls"])
        assert grad_evals.tolist() == [1] * 4 and 1 <= adjoint <= k - 1
        assert int(stats["vjp_calls"]) == adjoint + 1 >= int(stats["iterations"].max())


# ----------------------------------------------------------------------------------------------- the max-work bound


def _small_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, 12)) + y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


@pytest.mark.parametrize("mode", MODES)
def test_max_work_bounds_what_train_local_does(mode):
    x, y = _small_data()
    forward, backward = 5, (1 if mode == "one-step" else 3)
    bound = max_work(samples=len(x), batch_size=16, epochs=2, forward=forward, backward=backward,
                     backward_mode=mode)
    for tol, tight in ((1e-3, False), (0.0, True)):
        model = build_model(cell="conv1d", input_shape=(12,), num_classes=3, width=8, seed=1)
        result, _ = train_local(model, x, y, cfg=_cfg(mode, tol), forward_budget=forward,
                                backward_budget=backward, generator=torch.Generator().manual_seed(0))
        work = result.work
        assert result.local_steps == local_steps(len(x), 16, 2) == work.norm_calls == 6
        for name in ("solve_evals", "grad_evals", "vjp_evals", "samples", "norm_calls", "solver_steps"):
            assert getattr(work, name) <= getattr(bound, name), name
        assert charged_flops(model, work) <= charged_flops(model, bound)
        if tight:   # tol = 0: nothing converges, every solve spends its whole budget, the bound is reached
            assert work == bound
        else:       # warm starts converge early: the bound is strictly above
            assert work.solve_evals < bound.solve_evals


# ----------------------------------------------------------------------------------------------- torch agreement


def test_norm_flops_match_the_flop_counter_on_the_normalisation_alone():
    """norm_flops() against FlopCounterMode (with the formulas above) on exactly what bind computes for it."""
    for cell, shape in (("mlp", (16,)), ("conv1d", (40,)), ("conv2d", (12, 12))):
        for contraction in ("none", "spectral", "monotone"):
            model = build_model(cell=cell, input_shape=shape, num_classes=10, contraction=contraction)
            c = model.cell
            counter = flop_counter()
            with counter:
                if contraction == "spectral":
                    (c.spectral_gain / c.operator_norm(c.weight)).backward()
                elif contraction == "monotone" and cell != "mlp":
                    c.bind(torch.zeros(1, *c.state_shape))      # two norms without autograd, nothing else
                else:
                    continue
            assert counter.get_total_flops() == pytest.approx(model.norm_flops(), rel=1e-6), (cell, contraction)
            assert 0 < model.norm_flops(training=False) <= model.norm_flops()
        assert build_model(cell=cell, input_shape=shape, num_classes=10, contraction="none").norm_flops() == 0


@pytest.mark.parametrize("contraction, mode", [
    ("spectral", "one-step"), ("spectral", "phantom"), ("spectral", "implicit"),
    ("none", "one-step"), ("none", "phantom"), ("monotone", "one-step"),
])
def test_work_flops_match_torch_flop_counter(contraction, mode):
    """One training step of the default model (conv1d, width 32, anderson, input (40,), 10 classes): the
    clock's FLOPs for the work train_local reports agree with FlopCounterMode over the same step within 15%.

    FlopCounterMode counts only convolutions and matrix products; the FFTs, eigvalsh and SVD of the spectral
    normalisation and Anderson's small linear solve are counted with formulas registered through its
    ``custom_mapping`` (the standard estimates of fed_deq/deq/flops.py that norm_flops also uses, applied to
    the shapes the ops really see), and complex matrix products at 8 FLOPs per multiply-add. Elementwise work
    (ReLU, GroupNorm, norms, the optimizer step) is not counted on either side.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 40)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int64)
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10, width=32, contraction=contraction)
    counter = flop_counter()
    with counter:
        result, _ = train_local(model, x, y, cfg=dataclasses.replace(_cfg(mode, 1e-3, batch_size=32), epochs=1),
                                forward_budget=6, backward_budget=(1 if mode == "one-step" else 4),
                                generator=torch.Generator().manual_seed(0))
    measured = counter.get_total_flops()
    charged = charged_flops(model, result.work)
    assert result.local_steps == 1 and result.work.norm_calls == 1
    assert abs(charged / measured - 1) <= 0.15, f"charged {charged:.4g} vs counted {measured:.4g}"
    if contraction == "spectral" and mode == "one-step":
        # The old clock (mean iterations, no recompute, no normalisation) misses far more than 15%.
        old = training_flops(32, 1, model.overhead_flops(), model.cell_flops(), result.forward_iterations,
                             result.backward_iterations)
        assert old / measured < 0.85
