"""Fixed-point solvers: convergence, agreement, hard budgets, per-sample stopping, divergence, errors."""

import pytest
import torch

from fed_deq.deq import SOLVERS, find_fixed_point, register_solver, solve, solver_options
from fed_deq.deq.tracker import FixedPointTracker


pytestmark = pytest.mark.usefixtures("single_torch_thread")


ALL_SOLVERS = ["picard", "anderson", "broyden"]


def contraction(batch=6, dim=20, gain=0.9, dtype=torch.float64, seed=0):
    """f(z) = tanh(W z + b) with ||W|| = gain: a contraction with factor <= gain."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=dtype)
    w *= gain / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(batch, dim, generator=g, dtype=dtype)
    return lambda z: torch.tanh(z @ w.T + b), torch.zeros(batch, dim, dtype=dtype)


class Counting:
    """Wraps f, counts calls and records the inputs it was called with."""

    def __init__(self, f):
        self.f, self.calls, self.inputs = f, 0, []

    def __call__(self, z):
        self.calls += 1
        self.inputs.append(z.clone())
        return self.f(z)


def test_registry_lists_the_three_solvers():
    assert set(ALL_SOLVERS) <= set(SOLVERS)
    assert "m" in solver_options("anderson") and "m" in solver_options("broyden")


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_contractive_map_reaches_tolerance(solver):
    f, z0 = contraction(dtype=torch.float32)
    found = find_fixed_point(f, z0, solver=solver, max_iter=200, tol=1e-4)
    stats = found.stats
    assert bool(stats["converged"].all())
    assert float(stats["rel_residual"].max()) <= 1e-4
    # The stats describe z_eval, and the returned z is its image.
    residual = torch.linalg.vector_norm(f(found.z_eval) - found.z_eval, dim=1)
    assert torch.allclose(residual, stats["abs_residual"], rtol=1e-3, atol=1e-6)
    assert torch.allclose(f(found.z_eval), found.z, atol=1e-6)
    # For a contraction the returned z is at least as good as z_eval.
    rel_z = torch.linalg.vector_norm(f(found.z) - found.z, dim=1) / torch.linalg.vector_norm(f(found.z), dim=1)
    assert float(rel_z.max()) <= 1e-4


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_accelerated_solvers_agree_with_long_picard(solver):
    f, z0 = contraction(gain=0.95, seed=1)
    reference, ref_stats = solve(f, z0, solver="picard", max_iter=5000, tol=1e-14)
    assert bool(ref_stats["converged"].all())
    z, stats = solve(f, z0, solver=solver, max_iter=300, tol=1e-12)
    assert bool(stats["converged"].all())
    assert float((z - reference).abs().max()) <= 1e-8
    # Acceleration pays off: fewer evaluations than Picard on a slow contraction.
    _, picard_stats = solve(f, z0, solver="picard", max_iter=5000, tol=1e-12)
    assert stats["iterations"].float().mean() < picard_stats["iterations"].float().mean()


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("budget", [1, 2, 3, 7])
def test_budget_is_a_hard_limit(solver, budget):
    f, z0 = contraction(gain=0.99, dtype=torch.float32)
    counting = Counting(f)
    z, stats = solve(counting, z0, solver=solver, max_iter=budget, tol=0.0)
    assert counting.calls == budget == int(stats["f_calls"])
    assert stats["iterations"].dtype == torch.int64
    assert torch.equal(stats["iterations"], torch.full((6,), budget))
    assert not bool(stats["converged"].any())
    assert bool(torch.isfinite(z).all())


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_per_sample_stopping_freezes_converged_samples(solver):
    hard_f, _ = contraction(batch=1, dim=16, gain=0.97, dtype=torch.float32, seed=4)

    def mixed(z):   # sample 0: an easy linear contraction; sample 1: a slow nonlinear one
        return torch.cat([0.05 * z[:1] + 1.0, hard_f(z[1:])])

    f = Counting(mixed)
    z0 = torch.zeros(2, 16)
    z, stats = solve(f, z0, solver=solver, max_iter=80, tol=1e-5)
    easy, hard = stats["iterations"].tolist()
    assert easy < hard
    assert stats["converged"].tolist() == [True, True]
    # After its last iteration the easy sample is never moved again.
    for later in f.inputs[easy:]:
        assert torch.equal(later[0], f.inputs[easy - 1][0])
    # Its returned iterate is the one it had when it stopped.
    z_stopped, _ = solve(mixed, z0, solver=solver, max_iter=easy, tol=1e-5)
    assert torch.equal(z[0], z_stopped[0])
    assert torch.allclose(z[0], torch.full((16,), 1 / 0.95), rtol=1e-4)


def test_whole_batch_stops_early_when_all_converge():
    f, z0 = contraction(gain=0.5)
    counting = Counting(f)
    _, stats = solve(counting, z0, solver="picard", max_iter=500, tol=1e-6)
    assert counting.calls == int(stats["iterations"].max()) < 500


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_warm_start_from_fixed_point_needs_one_iteration(solver):
    f, z0 = contraction()
    z_star, _ = solve(f, z0, solver=solver, max_iter=200, tol=1e-10)
    _, stats = solve(f, z_star, solver=solver, max_iter=200, tol=1e-8)
    assert torch.equal(stats["iterations"], torch.ones(6, dtype=torch.int64))


def check_no_nan(z, stats):
    assert bool(torch.isfinite(z).all())
    for key in ("abs_residual", "rel_residual"):
        assert not bool(torch.isnan(stats[key]).any())


def test_growing_iteration_is_reported_divergent():
    z, stats = solve(lambda v: 2 * v + 1, torch.zeros(3, 5), solver="picard", max_iter=30, tol=1e-4)
    check_no_nan(z, stats)
    assert not bool(stats["converged"].any())
    assert bool(torch.isinf(stats["abs_residual"]).all()) and bool(torch.isinf(stats["rel_residual"]).all())
    assert int(stats["iterations"].max()) < 30          # stopped once declared divergent


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_blow_up_to_inf_and_nan_is_contained(solver):
    # Row 0 is a contraction; row 1 overflows to inf within a few steps; row 2 is NaN at once.
    def f(z):
        out = torch.stack([0.5 * z[0] + 1.0, torch.exp(torch.exp(z[1])), z[2] * float("nan")])
        return out

    z0 = torch.ones(3, 4)
    z, stats = solve(f, z0, solver=solver, max_iter=30, tol=1e-6)
    check_no_nan(z, stats)
    assert stats["converged"].tolist() == [True, False, False]
    assert torch.allclose(z[0], torch.full((4,), 2.0), atol=1e-5)
    assert bool(torch.isinf(stats["rel_residual"][1:]).all())
    assert torch.equal(z[2], z0[2])                     # nothing finite beyond the start


def test_adjoint_style_linear_problem_in_float64():
    # A non-symmetric linear fixed point y = A^T y + g, as solved in the implicit backward pass.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10, 10, generator=g, dtype=torch.float64)
    a *= 0.8 / torch.linalg.matrix_norm(a, ord=2)
    rhs = torch.randn(4, 10, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(10, dtype=torch.float64) - a.T, rhs.T).T
    for solver in ALL_SOLVERS:
        y, stats = solve(lambda v: v @ a + rhs, rhs.clone(), solver=solver, max_iter=400, tol=1e-12)
        assert float((y - exact).abs().max()) <= 1e-9, solver


def test_outputs_never_require_grad():
    w = torch.full((3, 3), 0.1, requires_grad=True)
    z, stats = solve(lambda v: v @ w + 1.0, torch.zeros(2, 3), solver="anderson", max_iter=20, tol=1e-6)
    assert not z.requires_grad and not stats["abs_residual"].requires_grad


def test_any_batch_first_shape_round_trips():
    f = lambda v: 0.5 * v + 1.0
    z, stats = solve(f, torch.zeros(2, 3, 4, 5), solver="broyden", max_iter=10, tol=1e-6)
    assert z.shape == (2, 3, 4, 5) and stats["iterations"].shape == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="newton"), r"unknown solver 'newton'.*anderson.*broyden.*picard"),
        (dict(solver="anderson", beta=0.5), r"unknown option.*'beta'.*valid options.*lam"),
        (dict(solver="picard", stop_mode="abs"), r"unknown option.*stop_mode"),
        (dict(solver="picard", max_iter=0), r"max_iter must be an integer >= 1"),
        (dict(solver="picard", max_iter=2.5), r"max_iter"),
        (dict(solver="picard", tol=-1.0), r"tol must be a number >= 0"),
        (dict(solver="anderson", m=0), r"option m must be an integer > 0"),
        (dict(solver="picard", relaxation=1.5), r"relaxation"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(solver="picard", max_iter=5, tol=1e-3) | kwargs
    with pytest.raises(ValueError, match=match):
        solve(lambda v: 0.5 * v, torch.zeros(2, 3), **args)


def test_bad_start_and_bad_f_raise_value_error():
    with pytest.raises(ValueError, match="floating"):
        solve(lambda v: v, torch.zeros(2, 3, dtype=torch.int64), solver="picard", max_iter=3, tol=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        solve(lambda v: v, torch.tensor([[float("nan")]]), solver="picard", max_iter=3, tol=0.0)
    with pytest.raises(ValueError, match="changed the shape"):
        solve(lambda v: v[:, :2], torch.zeros(2, 3), solver="picard", max_iter=3, tol=0.0)


def test_a_new_solver_is_one_registered_function():
    name = "test-halving-picard"

    def halving(f, z0, *, max_iter, tol, step=0.5):
        tracker = FixedPointTracker(z0, tol=tol, divergence_factor=1e4)
        z = z0
        for _ in range(max_iter):
            fz = tracker.observe(z, f(z))
            if tracker.done():
                break
            z = tracker.hold(z + step * (fz - z), z)
        return tracker.result()

    register_solver(name, halving)
    try:
        z, stats = solve(lambda v: 0.5 * v + 1.0, torch.zeros(2, 3), solver=name, max_iter=100, tol=1e-6,
                         step=0.8)
        assert bool(stats["converged"].all()) and torch.allclose(z, torch.full((2, 3), 2.0), atol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            register_solver(name, halving)
        with pytest.raises(ValueError, match="unknown option"):
            solve(lambda v: v, torch.zeros(1, 1), solver=name, max_iter=1, tol=0.0, m=3)
    finally:
        SOLVERS.pop(name, None)
    with pytest.raises(ValueError, match="keyword-only"):
        register_solver("test-bad-signature", lambda f, z0, max_iter, tol: None)
    assert "test-bad-signature" not in SOLVERS


def test_best_iterate_is_returned_when_residuals_are_not_monotone():
    # Picard on f(z) = -0.9 z + 1 oscillates: relative residuals 1, 9, 0.89, 4.0, ... so the best point
    # of a 4-step budget is the third, not the last.
    f = Counting(lambda v: -0.9 * v + 1.0)
    found = find_fixed_point(f, torch.zeros(1, 3, dtype=torch.float64), solver="picard", max_iter=4, tol=0.0)
    points = torch.cat(f.inputs)
    images = -0.9 * points + 1.0
    rel = torch.linalg.vector_norm(images - points, dim=1) / torch.linalg.vector_norm(images, dim=1)
    best = int(rel.argmin())
    assert best < len(points) - 1                         # the path under test: the best is superseded
    assert float(found.stats["rel_residual"][0]) == pytest.approx(float(rel[best]))
    assert torch.equal(found.z_eval[0], points[best]) and torch.allclose(found.z[0], images[best])
