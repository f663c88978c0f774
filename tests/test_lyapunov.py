"""The ``lyapunov`` contraction (LyaDEQ after Chu et al., on Manek & Kolter's projection): V positive definite,
the certified decay of V along the DEQ dynamics, the orthogonal readout, solving, training, the wire, the
clock, and a client round of a real scenario."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fed_deq import fleet, workload
from fed_deq.deq import build_classifier, build_model
from fed_deq.deq.cells import CONTRACTIONS
from fed_deq.deq.flops import lu_solve_flops
from fed_deq.deq.lyapunov import LYAPUNOV_RATE, QUADRATIC_WEIGHT, OrthogonalChannels, cayley_flops
from fed_deq.scenario import load_scenario
from fed_deq.scenario.choices import BUILT_IN

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: Small models of every cell kind: (cell, input shape, width).
SMALL = [("mlp", (10,), 6), ("conv1d", (9,), 4), ("conv2d", (7, 7), 4)]
SMALL_IDS = [cell for cell, _, _ in SMALL]


def small(cell, shape, width, *, seed=0, dtype=torch.float64, contraction="lyapunov", **options):
    """A 3-class model of ``cell`` (lyapunov unless told), float64 unless told."""
    model = build_model(cell=cell, input_shape=shape, num_classes=3, width=width, seed=seed,
                        contraction=contraction, **options)
    return model.to(dtype)


def inputs(shape, batch=5, seed=0, dtype=torch.float64):
    """A seeded standard-normal batch of ``shape`` inputs."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def base_residual(model, u):
    """F(z) = h(z) - z for the spectral cell h under the stability module, rebuilt from public pieces."""
    cell = model.cell
    scale = torch.clamp(cell.spectral_gain / cell.operator_norm(cell.weight), max=1.0)
    h = cell.relu_affine(cell.weight * scale, u)
    return lambda z: h(z) - z


def lyapunov_and_gradient(model, u, z):
    """V(z) = Ṽ(F(z)) per sample and ∇V(z), by plain autograd (independently of the cell's torch.func path)."""
    z = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        values = model.cell.stability(base_residual(model, u)(z))
        (grad,) = torch.autograd.grad(values.sum(), z)
    return values.detach(), grad


def perturb(module, scale=0.5, seed=1):
    """Add seeded Gaussian noise of ``scale`` to every parameter of ``module`` (a "random parameter change")."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ----------------------------------------------------------------------------------------------------- V and Ṽ


@pytest.mark.parametrize("cell, shape, width", SMALL, ids=SMALL_IDS)
def test_the_potential_is_positive_definite_and_convex_even_after_parameter_changes(cell, shape, width):
    model = small(cell, shape, width)
    potential = model.cell.stability
    state = (16, *model.state_shape)
    gen = torch.Generator().manual_seed(3)
    for changed in (False, True):
        if changed:     # q(0) is recomputed from the current parameters, so V(0) = 0 survives any update
            perturb(potential, scale=2.0)
        zero = potential(torch.zeros(1, *model.state_shape, dtype=torch.float64)).detach()
        assert float(zero.abs().max()) == 0.0
        for scale in (1e-4, 1e-1, 1.0, 30.0):
            r = scale * torch.randn(state, generator=gen, dtype=torch.float64)
            values = potential(r)
            floor = QUADRATIC_WEIGHT * r.square().flatten(1).sum(1)
            assert bool((values > 0).all()) and bool((values >= floor * (1 - 1e-12)).all())
        a, b = (torch.randn(state, generator=gen, dtype=torch.float64) for _ in range(2))
        assert bool((potential((a + b) / 2) <= (potential(a) + potential(b)) / 2 + 1e-12).all())


@pytest.mark.parametrize("cell, shape, width", SMALL, ids=SMALL_IDS)
def test_v_vanishes_exactly_at_the_fixed_point_and_is_positive_elsewhere(cell, shape, width):
    model = small(cell, shape, width, seed=2)
    x = inputs(shape, seed=2)
    with torch.no_grad():
        u = model.inject(x)
        out = model(x, solver="anderson", max_iter=100, tol=1e-12)
    assert bool(out.forward_stats["converged"].all())
    values, _ = lyapunov_and_gradient(model, u, out.z)
    assert float(values.max()) < 1e-18
    noise = torch.randn(out.z.shape, generator=torch.Generator().manual_seed(2), dtype=out.z.dtype)
    others, _ = lyapunov_and_gradient(model, u, out.z + 0.3 * noise)
    assert bool((others > 1e-6).all())


# -------------------------------------------------------------------------------------------- the certificate


@pytest.mark.parametrize("cell, shape, width", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("rate", [LYAPUNOV_RATE, 6.0])
def test_v_decreases_at_rate_alpha_along_the_dynamics(cell, shape, width, rate):
    """∇V(z)ᵀ (f(z) - z) <= -α V(z) for random states and inputs, with ∇V from plain autograd. At α = 6 the
    cell's own dynamics violate it on some of these states, so there the projection is what makes it hold."""
    model = small(cell, shape, width, seed=4)
    with torch.no_grad():
        model.cell.weight.mul_(4.0)      # the normaliser clamps ||W|| to the gain: the slowest allowed cell
    model.cell.stability.rate = rate
    violated = 0
    for seed in range(3):
        x = inputs(shape, batch=8, seed=10 + seed)
        with torch.no_grad():
            u = model.inject(x)
            f = model.cell.bind(u)
        z = (0.1, 1.0, 5.0)[seed] * torch.randn(u.shape, generator=torch.Generator().manual_seed(seed),
                                                dtype=u.dtype)
        values, grad = lyapunov_and_gradient(model, u, z)
        with torch.no_grad():
            step = f(z) - z
            raw = base_residual(model, u)(z)
        decay = (grad * step).flatten(1).sum(1)
        assert bool((decay <= -rate * values + 1e-9 * (1 + values)).all()), (decay + rate * values).max()
        violated += int(((grad * raw).flatten(1).sum(1) > -rate * values).sum())
    if rate > LYAPUNOV_RATE:
        assert violated > 0


def test_without_grad_the_map_is_the_same_and_carries_no_graph():
    model = small("conv1d", (9,), 4, seed=5)
    model.cell.stability.rate = 6.0
    x = inputs((9,), seed=5)
    z = torch.randn(5, *model.state_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        quiet = model.cell.bind(model.inject(x))(z)
    loud = model.cell.bind(model.inject(x))(z)
    assert not quiet.requires_grad and loud.requires_grad
    assert torch.allclose(quiet, loud, rtol=0, atol=1e-14)
    # Under autograd the map reaches the Lyapunov parameters (the projection is active at this rate).
    loud.square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.cell.stability.parameters())


def test_the_projection_keeps_the_fixed_points_and_changes_only_the_path():
    """Same seed: the spectral model and the lyapunov one (Q = I at first) share every drawn weight, so they
    converge to the same fixed point; a strongly active projection changes the early iterates."""
    x = inputs((10,), batch=6, seed=6)
    spectral = small("mlp", (10,), 6, seed=6, contraction="spectral")
    stable = small("mlp", (10,), 6, seed=6)
    stable.cell.stability.rate = 6.0
    with torch.no_grad():
        a = spectral(x, solver="anderson", max_iter=100, tol=1e-12)
        b = stable(x, solver="anderson", max_iter=100, tol=1e-12)
        early_a = spectral(x, solver="picard", max_iter=2, tol=0.0)
        early_b = stable(x, solver="picard", max_iter=2, tol=0.0)
    assert bool(b.forward_stats["converged"].all())
    assert torch.allclose(a.z, b.z, atol=1e-10) and torch.allclose(a.logits, b.logits, atol=1e-10)
    assert float((early_a.z - early_b.z).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------ the orthogonal layer


def test_the_orthogonal_layer_stays_orthogonal_after_changes_and_optimiser_steps():
    model = build_model(cell="conv1d", input_shape=(12,), num_classes=3, width=8, seed=7, contraction="lyapunov")
    layer = next(m for m in model.head if isinstance(m, OrthogonalChannels))
    eye = torch.eye(8)
    assert torch.equal(layer.matrix(), eye)                      # the identity at initialisation
    perturb(layer, scale=3.0, seed=7)
    q = layer.matrix().detach()
    assert float((q.T @ q - eye).abs().max()) < 1e-5 and float((q - eye).abs().max()) > 0.1
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    x, y = inputs((12,), batch=8, seed=7, dtype=torch.float32), torch.arange(8) % 3
    for _ in range(3):
        before = q
        loss = F.cross_entropy(model(x, max_iter=3).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        q = layer.matrix().detach()
        assert float((q.T @ q - eye).abs().max()) < 1e-5 and float((q - before).abs().max()) > 1e-3
    # Applied to every position it is an orthogonal map of the whole state: distances between states are kept.
    a, b = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(torch.linalg.vector_norm((layer(a) - layer(b)).flatten(1), dim=1),
                              torch.linalg.vector_norm((a - b).flatten(1), dim=1), rtol=1e-5)


# --------------------------------------------------------------------------------- solving, training, the wire


@pytest.mark.parametrize("cell, shape, width", SMALL, ids=SMALL_IDS)
def test_a_lyapunov_model_solves_trains_and_round_trips_through_numpy(cell, shape, width):
    model = small(cell, shape, width, seed=8, dtype=torch.float32)
    x, y = inputs(shape, batch=12, seed=8, dtype=torch.float32), torch.arange(12) % 3
    with torch.no_grad():
        out = model(x, solver="anderson", max_iter=80, tol=1e-4)
    assert bool(out.forward_stats["converged"].all()) and float(out.forward_stats["rel_residual"].max()) <= 1e-4

    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x, solver="anderson", max_iter=20, tol=1e-4).logits, y)
        opt.zero_grad()
        loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]

    arrays = workload.model_arrays(model)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert set(arrays) == {name for name, _ in model.named_parameters()}      # no buffers, no renamed keys
    again = small(cell, shape, width, seed=9, dtype=torch.float32)
    workload.load_arrays(again, arrays)                                     # strict=True
    with torch.no_grad():
        expected = model(x, solver="anderson", max_iter=10, tol=1e-4).logits
        got = again(x, solver="anderson", max_iter=10, tol=1e-4).logits
    assert torch.equal(expected, got)


@pytest.mark.parametrize("backward", ["one-step", "phantom", "implicit"])
def test_every_gradient_path_and_model_kind_runs(backward):
    x, y = inputs((9,), batch=4, seed=11, dtype=torch.float32), torch.tensor([0, 1, 2, 0])
    for kind in ("deq", "weight_tied", "explicit"):
        model = build_classifier(kind, "conv1d", (9,), 3, depth=3, width=4, contraction="lyapunov", seed=11)
        model.cell.stability.rate = 6.0    # an active projection: its gradient reaches every parameter
        out = model(x, solver="anderson", max_iter=6, backward=backward, backward_max_iter=3)
        F.cross_entropy(out.logits, y).backward()
        grads = [p.grad for p in model.cell.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), (kind, backward)
        assert float(model.cell.stability.input0.grad.abs().sum()) > 0
        assert int(out.backward_stats["iterations"].max()) >= 1


def test_the_implicit_gradient_matches_a_long_unrolled_solve():
    """The adjoint of the projected map (∇V inside f, differentiated again by autograd) is the exact gradient.
    The reference unrolls small steps z <- z + λ (f(z) - z) (same fixed points; at α = 6 the plain unit step
    overshoots, which is why α is 1 by default)."""
    model = small("mlp", (7,), 5, seed=12)
    model.cell.stability.rate = 6.0
    x = inputs((7,), batch=4, seed=12)
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = model(x, solver="anderson", max_iter=100, tol=1e-12, backward="implicit", backward_max_iter=100)
    (out.logits * weights).sum().backward()
    implicit = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    f = model.cell.bind(model.inject(x))
    z = torch.zeros(4, *model.state_shape, dtype=torch.float64)
    for _ in range(300):
        z = torch.lerp(z, f(z), 0.2)
    (model.readout(z) * weights).sum().backward()
    unrolled = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(implicit, unrolled, rtol=1e-6, atol=1e-8)
    # The fixed point is that of the base cell whatever V is: V's parameters get no gradient through it.
    assert all(float(p.grad.abs().max()) < 1e-8 for p in model.cell.stability.parameters())


# ----------------------------------------------------------------------------------------------------- the clock


def test_a_lyapunov_evaluation_costs_what_the_formula_says_checked_by_hand():
    # mlp, w = 4 (ICNN hidden H = 2), one position: a W product 2*4*4 = 32, twice (W z and the ∇V product);
    # the ICNN on a row 2*(2*4*2 + 2*2 + 4 + 2) = 52, forward and backward.
    mlp = build_model(cell="mlp", input_shape=(5,), num_classes=3, width=4, contraction="lyapunov")
    assert mlp.cell_flops() == 2 * 32 + 2 * 52 == 168
    assert build_model(cell="mlp", input_shape=(5,), num_classes=3, width=4, contraction="spectral").cell_flops() == 32
    # conv1d, w = 4, k = 3, L = 5: a convolution 2*4*4*3*5 = 480, twice; the ICNN on 5 rows, both ways.
    conv = build_model(cell="conv1d", input_shape=(5,), num_classes=3, width=4, contraction="lyapunov")
    spectral = build_model(cell="conv1d", input_shape=(5,), num_classes=3, width=4, contraction="spectral")
    assert conv.cell_flops() == 2 * 480 + 2 * 5 * 52 == 1480 and spectral.cell_flops() == 480
    # The head's orthogonal layer: 2 w² per position per sample; its Cayley transform per forward.
    assert conv.overhead_flops() - spectral.overhead_flops() == 2 * 4 * 4 * 5
    assert cayley_flops(4, training=False) == pytest.approx(lu_solve_flops(4, 4)) == pytest.approx(2 / 3 * 64 + 128)
    assert cayley_flops(4, training=True) == pytest.approx(2 / 3 * 64 + 128 + 2 * 64 + 2 * 64)
    for training in (False, True):
        extra = conv.norm_flops(training=training) - spectral.norm_flops(training=training)
        q0 = 2 * 2 * 2 + 2 * 2          # q(0): a 2x2 and a 1x2 matrix-vector product
        assert extra == pytest.approx((3 if training else 1) * q0 + cayley_flops(4, training=training))


@pytest.mark.parametrize("cell, shape", [("mlp", (16,)), ("conv1d", (12,)), ("conv2d", (9, 9))])
def test_the_flop_counter_agrees_and_slow_devices_get_fewer_iterations(cell, shape):
    model = build_model(cell=cell, input_shape=shape, num_classes=10, width=8, contraction="lyapunov")
    spectral = build_model(cell=cell, input_shape=shape, num_classes=10, width=8, contraction="spectral")
    x = inputs(shape, batch=1, dtype=torch.float32)
    with torch.no_grad():
        u = model.inject(x)
        f = model.cell.bind(u)
        counter = FlopCounterMode(display=False)
        with counter:     # W z, the ICNN, its input-gradient backward and the transposed W product
            f(torch.randn_like(u))
        assert counter.get_total_flops() == model.cell_flops() > spectral.cell_flops()
        counter = FlopCounterMode(display=False)
        with counter:     # encoder + head with the orthogonal layer (its Cayley solve is norm_flops' part)
            model.readout(model.inject(x))
        assert counter.get_total_flops() == model.overhead_flops() > spectral.overhead_flops()
    # A device that affords 20 iterations of the spectral model within the deadline affords fewer here.
    plan = dict(deadline_s=1.0, comm_s=0.0, samples=16, epochs=1, backward="one-step", backward_iterations=1,
                min_iterations=2, max_iterations=50, batch_size=16)
    work = fleet.max_work(samples=16, batch_size=16, epochs=1, forward=19, backward=1, backward_mode="one-step")
    speed = fleet.work_flops(work, cell_flops=spectral.cell_flops(), overhead_flops=spectral.overhead_flops(),
                             norm_flops=spectral.norm_flops())
    device = fleet.Device(partition_id=0, tier="slow", compute_flops=speed, bandwidth_bps=1e6, availability=1.0,
                          dropout=0.0, straggler_prob=0.0, straggler_slowdown=1.0)
    budgets = [fleet.plan_budget(device, cell_flops=m.cell_flops(), overhead_flops=m.overhead_flops(),
                                 norm_flops=m.norm_flops(), **plan) for m in (spectral, model)]
    assert budgets[0].total == 20 and budgets[1].total < budgets[0].total


@pytest.mark.parametrize("backward", ["one-step", "phantom"])
def test_the_clock_charges_a_lyapunov_training_step_within_15_percent_of_the_counted_flops(backward):
    """As tests/test_clock.py does for the other contractions: what the clock charges for the work train_local
    reports, against FlopCounterMode over the same step (FFT/eigh/SVD/solve counted by the same formulas)."""
    from fed_deq.training import LocalTrainConfig, train_local
    from tests.test_clock import charged_flops, flop_counter

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 40)).astype(np.float32), rng.integers(0, 10, 32).astype(np.int64)
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10, width=16, contraction="lyapunov")
    cfg = LocalTrainConfig(epochs=1, batch_size=32, learning_rate=0.05, optimizer="sgd", momentum=0.9,
                           solver="anderson", tol=1e-3, backward=backward)
    counter = flop_counter()
    with counter:
        result, _ = train_local(model, x, y, cfg=cfg, forward_budget=6, backward_budget=1 if backward == "one-step"
                                else 4, generator=torch.Generator().manual_seed(0))
    ratio = charged_flops(model, result.work) / counter.get_total_flops()
    assert result.local_steps == 1 and 0.85 <= ratio <= 1.15, ratio


# ------------------------------------------------------------------------------------ arguments, scenario, round


def test_arguments_are_checked_like_the_other_contractions():
    assert "lyapunov" in CONTRACTIONS and "lyapunov" in BUILT_IN["contraction"]
    with pytest.raises(ValueError, match=r"spectral_gain must be in \(0, 1\) for contraction 'lyapunov'"):
        build_model(cell="mlp", input_shape=(5,), num_classes=3, contraction="lyapunov", spectral_gain=1.0)
    # The monotone margin does not apply and is ignored, as spectral ignores it.
    build_model(cell="mlp", input_shape=(5,), num_classes=3, contraction="lyapunov", monotone_margin=7.0)


def test_a_lyapunov_scenario_validates_and_a_client_round_runs():
    scenario = load_scenario("scenarios/digits-iid.yaml", overrides=["model.contraction=lyapunov"])
    assert scenario.model.contraction == "lyapunov"
    model = workload.build_scenario_model(scenario, workload.scenario_data(scenario))
    assert model.cell.contraction == "lyapunov"
    arrays = workload.model_arrays(model)
    result = workload.run_client_round(scenario, 0, 1, arrays, budget=fleet.Budget(forward=4, backward=1))
    assert set(result.arrays) == set(arrays)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics["num-examples"] > 0
    moved = [k for k in arrays if not np.array_equal(arrays[k], result.arrays[k])]
    assert "cell.stability.input0" in arrays and any(k.startswith("head.") for k in moved)
