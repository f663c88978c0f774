"""DEQ classifiers: shapes, parameter budgets, contraction guarantees, FLOPs, gradient paths."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fed_deq.deq import BACKWARD_MODES, CONTRACTIONS, build_model, conv_operator_norm


pytestmark = pytest.mark.usefixtures("single_torch_thread")


SHAPES = {
    "mlp": [(64,)],
    "conv1d": [(40,)],
    "conv2d": [(28, 28), (32, 32, 3), (3, 32, 32)],
}
CASES = [(cell, shape, contraction) for cell, shapes in SHAPES.items() for shape in shapes
         for contraction in CONTRACTIONS]


def inputs(shape, batch=4, seed=0, dtype=torch.float32):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("cell, shape, contraction", CASES)
def test_every_cell_builds_small_and_gives_finite_logits_at_budgets_1_and_30(cell, shape, contraction):
    model = build_model(cell=cell, input_shape=shape, num_classes=10, contraction=contraction)
    assert sum(p.numel() for p in model.parameters()) <= 100_000
    x = inputs(shape)
    for budget in (1, 30):
        with torch.no_grad():
            out = model(x, solver="anderson", max_iter=budget, tol=1e-4)
        assert out.logits.shape == (4, 10)
        assert bool(torch.isfinite(out.logits).all())
        assert out.z.shape == (4, *model.state_shape) and not out.z.requires_grad
        assert int(out.forward_stats["iterations"].max()) <= budget
    if contraction != "none":
        assert bool(out.forward_stats["converged"].all())     # a guaranteed contraction converges in 30


@pytest.mark.parametrize("cell, shape", [("mlp", (64,)), ("conv1d", (40,)), ("conv2d", (32, 32, 3))])
def test_state_dict_holds_only_plain_floating_parameters(cell, shape):
    for contraction in CONTRACTIONS:
        model = build_model(cell=cell, input_shape=shape, num_classes=10, contraction=contraction)
        state = model.state_dict()
        assert state and all(t.is_floating_point() for t in state.values())
        assert set(state) == {name for name, _ in model.named_parameters()}     # no buffers
        assert not any(k in name for name in state for k in ("orig", "_u", "_v", "parametrizations"))


def test_seeded_initialisation_is_reproducible_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a = build_model(cell="conv1d", input_shape=(40,), num_classes=10, seed=7).state_dict()
    b = build_model(cell="conv1d", input_shape=(40,), num_classes=10, seed=7).state_dict()
    c = build_model(cell="conv1d", input_shape=(40,), num_classes=10, seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def dense(op, state):
    """Matrix of a linear map on flattened states of shape ``state``."""
    size = torch.Size(state).numel()
    basis = torch.eye(size, dtype=torch.float64).view(size, *state)
    return op(basis).reshape(size, -1).T


def pre_activation_matrix(cell):
    """The cell's linear map before the ReLU, at zero injection: relu(a) - relu(-a) = a, exactly."""
    f = cell.bind(torch.zeros(1, *cell.state_shape, dtype=torch.float64))
    return dense(lambda z: f(z) - f(-z), cell.state_shape)


@pytest.mark.parametrize("cell, shape", [("mlp", (12,)), ("conv1d", (10,)), ("conv2d", (6, 6))])
def test_spectral_contraction_bounds_the_true_operator_norm(cell, shape):
    model = build_model(cell=cell, input_shape=shape, num_classes=3, width=6, contraction="spectral",
                        spectral_gain=0.8).double()
    with torch.no_grad():
        model.cell.weight.mul_(25.0)          # far outside the constraint before normalisation
    norm = float(torch.linalg.matrix_norm(pre_activation_matrix(model.cell).detach(), ord=2))
    assert 0.5 < norm <= 0.8 + 1e-9


@pytest.mark.parametrize("cell, shape", [("mlp", (12,)), ("conv1d", (10,)), ("conv2d", (6, 6))])
def test_monotone_cell_is_a_contractive_monDEQ_splitting_step(cell, shape):
    margin = 0.3
    model = build_model(cell=cell, input_shape=shape, num_classes=3, width=6, contraction="monotone",
                        monotone_margin=margin, seed=2).double()
    c = model.cell
    with torch.no_grad():
        c.A.mul_(4.0)
        c.B.mul_(4.0)
    step = pre_activation_matrix(c).detach()
    assert float(torch.linalg.matrix_norm(step, ord=2)) < 1.0
    # Build I - W = m I + A^T A - B + B^T from the parameters, independently of the implementation.
    if cell == "mlp":
        a_op, b_op = c.A.detach(), c.B.detach()
    else:
        conv = F.conv1d if cell == "conv1d" else F.conv2d
        pad = c.kernel_size // 2
        a_op = dense(lambda z: conv(z, c.A.detach(), padding=pad), c.state_shape)
        b_op = dense(lambda z: conv(z, c.B.detach(), padding=pad), c.state_shape)
    eye = torch.eye(step.shape[0], dtype=torch.float64)
    i_minus_w = margin * eye + a_op.T @ a_op - b_op + b_op.T
    assert float(torch.linalg.eigvalsh(0.5 * (i_minus_w + i_minus_w.T)).min()) >= margin - 1e-9
    # The cell is z -> relu(z - alpha (I - W) z + alpha u) for a step size alpha > 0.
    alpha = float(((eye - step) * i_minus_w).sum() / (i_minus_w * i_minus_w).sum())
    assert alpha > 0
    assert torch.allclose(eye - step, alpha * i_minus_w, atol=1e-10)


@pytest.mark.parametrize("kernel, spatial", [((4, 3, 3), (9,)), ((4, 3, 5), (7,)), ((3, 2, 3, 3), (5, 4))])
def test_conv_operator_norm_bounds_the_zero_padded_convolution(kernel, spatial):
    weight = torch.randn(*kernel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pad = kernel[-1] // 2
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    size = kernel[1] * torch.Size(spatial).numel()
    basis = torch.eye(size, dtype=torch.float64).view(size, kernel[1], *spatial)
    dense = conv(basis, weight, padding=pad).reshape(size, -1).T
    true_norm = float(torch.linalg.matrix_norm(dense, ord=2))
    bound = float(conv_operator_norm(weight, spatial))
    assert true_norm <= bound + 1e-9
    # The bound is the exact norm of the circular convolution on the grid extended by `pad`.
    ext = tuple(n + pad for n in spatial)
    ext_basis = torch.eye(kernel[1] * torch.Size(ext).numel(), dtype=torch.float64).view(-1, kernel[1], *ext)
    circ = conv(F.pad(ext_basis, (pad, pad) * len(spatial), mode="circular"), weight)
    circ_norm = float(torch.linalg.matrix_norm(circ.reshape(circ.shape[0], -1).T, ord=2))
    assert bound == pytest.approx(circ_norm, rel=1e-9)


def test_conv_operator_norm_gradient_is_that_of_the_full_maximum():
    weight = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                         requires_grad=True)
    (fast,) = torch.autograd.grad(conv_operator_norm(weight, (6, 5)), weight)
    spectrum = torch.fft.rfft2(weight, s=(7, 6), dim=(-2, -1)).reshape(5, 4, -1).permute(2, 0, 1)
    (full,) = torch.autograd.grad(torch.linalg.matrix_norm(spectrum, ord=2).max(), weight)
    assert torch.allclose(fast, full, atol=1e-10)


@pytest.mark.parametrize("cell, shape", [("mlp", (64,)), ("conv1d", (40,)), ("conv2d", (28, 28)),
                                         ("conv2d", (32, 32, 3))])
def test_flops_match_torch_flop_counter(cell, shape):
    for contraction in CONTRACTIONS:
        model = build_model(cell=cell, input_shape=shape, num_classes=10, contraction=contraction)
        x = inputs(shape, batch=1)
        with torch.no_grad():
            u = model.inject(x)
            f = model.cell.bind(u)
            counter = FlopCounterMode(display=False)
            with counter:
                f(torch.zeros_like(u))
            assert counter.get_total_flops() == model.cell_flops() > 0
            counter = FlopCounterMode(display=False)
            with counter:
                model.readout(model.inject(x))
            assert counter.get_total_flops() == model.overhead_flops() > 0


@pytest.mark.parametrize("cell, shape", [("mlp", (16,)), ("conv1d", (12,))])
@pytest.mark.parametrize("contraction", ["spectral", "monotone"])
def test_implicit_gradient_matches_long_unrolled_picard(cell, shape, contraction):
    model = build_model(cell=cell, input_shape=shape, num_classes=3, width=8, contraction=contraction,
                        seed=1).double()
    x = inputs(shape, batch=5, dtype=torch.float64)
    weights = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = model(x, solver="anderson", max_iter=100, tol=1e-12, backward="implicit", backward_max_iter=200)
    (out.logits * weights).sum().backward()
    implicit = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    f = model.cell.bind(model.inject(x))
    z = torch.zeros(5, *model.state_shape, dtype=torch.float64)
    for _ in range(300):
        z = f(z)
    (model.readout(z) * weights).sum().backward()
    unrolled = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(torch.linalg.vector_norm(implicit - unrolled) / torch.linalg.vector_norm(unrolled)) <= 1e-3
    iterations = out.backward_stats["iterations"]
    assert iterations.shape == (5,) and 1 < int(iterations.max()) <= 200


@pytest.mark.parametrize("mode, budget, expected", [("one-step", 4, 1), ("phantom", 3, 3), ("implicit", 6, None)])
def test_backward_stats_are_filled_when_backward_runs(mode, budget, expected):
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
    out = model(inputs((40,)), solver="anderson", max_iter=10, tol=1e-3, backward=mode,
                backward_max_iter=budget)
    assert out.backward_stats == {}
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    iterations = out.backward_stats["iterations"]
    assert iterations.dtype == torch.int64 and iterations.shape == (4,)
    if expected is None:
        assert 1 <= int(iterations.min()) and int(iterations.max()) <= budget
    else:
        assert torch.equal(iterations, torch.full((4,), expected))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(model.cell.weight.grad.abs().sum()) > 0


def test_degenerate_budgets_reduce_to_one_step():
    x = inputs((40,))
    target = torch.tensor([0, 1, 2, 3])
    grads = {}
    for mode, budget in [("one-step", 1), ("phantom", 1), ("implicit", 1)]:
        model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
        out = model(x, solver="anderson", max_iter=6, tol=1e-3, backward=mode, backward_max_iter=budget)
        F.cross_entropy(out.logits, target).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["phantom"], grads["one-step"], atol=1e-6)
    assert torch.allclose(grads["implicit"], grads["one-step"], atol=1e-6)


@pytest.mark.parametrize("mode", ["one-step", "implicit"])
def test_training_and_evaluation_see_the_same_logits(mode):
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10, contraction="none")
    x = inputs((40,))
    for budget in (1, 3):
        train_logits = model(x, solver="anderson", max_iter=budget, tol=1e-3, backward=mode).logits
        with torch.no_grad():
            eval_logits = model(x, solver="anderson", max_iter=budget, tol=1e-3).logits
        assert torch.allclose(train_logits, eval_logits, atol=1e-5)


def test_warm_start_with_returned_z_converges_at_once():
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
    x = inputs((40,))
    with torch.no_grad():
        first = model(x, solver="anderson", max_iter=40, tol=1e-4)
        again = model(x, solver="anderson", max_iter=40, tol=1e-4, z0=first.z)
    assert bool(first.forward_stats["converged"].all())
    assert torch.equal(again.forward_stats["iterations"], torch.ones(4, dtype=torch.int64))
    assert torch.allclose(again.logits, first.logits, atol=1e-4)


def test_short_training_on_digits_learns():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    model = build_model(cell="mlp", input_shape=(64,), num_classes=10, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shuffle = torch.Generator().manual_seed(1)
    for _ in range(3):
        for batch in train[torch.randperm(len(train), generator=shuffle)].split(32):
            out = model(x[batch], solver="anderson", max_iter=8, tol=1e-3, backward="one-step")
            loss = F.cross_entropy(out.logits, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x[test], solver="anderson", max_iter=8, tol=1e-3).logits.argmax(1) == y[test])
    assert float(accuracy.float().mean()) > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cell="rnn"), r"unknown cell 'rnn'.*mlp.*conv1d.*conv2d"),
        (dict(contraction="lipschitz"), r"unknown contraction 'lipschitz'.*none.*spectral.*monotone"),
        (dict(contraction="spectral", spectral_gain=1.2), r"spectral_gain must be in \(0, 1\)"),
        (dict(cell="conv1d", input_shape=(3, 4, 5)), r"conv1d.*\(L,\) or \(C, L\)"),
        (dict(width=0), r"width must be an integer >= 1"),
        (dict(num_classes=1), r"num_classes"),
        (dict(input_shape=(0,)), r"input_shape"),
        (dict(kernel_size=4), r"kernel_size must be an odd integer"),
    ],
)
def test_bad_model_arguments_raise_value_error(kwargs, match):
    args = dict(cell="conv1d", input_shape=(40,), num_classes=10) | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backward="two-step"), r"unknown backward mode 'two-step'.*one-step.*implicit.*phantom"),
        (dict(solver="newton"), r"unknown solver 'newton'"),
        (dict(solver_options={"stop_mode": "abs"}), r"unknown option.*stop_mode"),
        (dict(backward_max_iter=0), r"backward_max_iter must be an integer >= 1"),
        (dict(phantom_damping=0.0), r"phantom_damping"),
        (dict(z0=torch.zeros(4, 5)), r"z0 must have shape"),
    ],
)
def test_bad_call_arguments_raise_value_error(kwargs, match):
    model = build_model(cell="conv1d", input_shape=(40,), num_classes=10)
    with pytest.raises(ValueError, match=match):
        model(inputs((40,)), **kwargs)
    with pytest.raises(ValueError, match=r"input must have shape \[B, 40\]"):
        model(inputs((41,)))


def test_backward_modes_constant_is_the_documented_set():
    assert set(BACKWARD_MODES) == {"one-step", "implicit", "phantom"}
    assert list(CONTRACTIONS) == ["none", "spectral", "monotone", "lyapunov"]
