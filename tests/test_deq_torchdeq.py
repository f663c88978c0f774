"""torchdeq 0.1.0 as an oracle: on the same cell, our solvers reach the same fixed point."""

import pytest
import torch
from torchdeq import get_deq

from fed_deq.deq import build_model, solve

PAIRS = [("picard", "fixed_point_iter"), ("anderson", "anderson"), ("broyden", "broyden")]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def bound_cell(cell, shape):
    """A trained-like cell: spectral norm pushed up to the gain, so the solve takes real work."""
    model = build_model(cell=cell, input_shape=shape, num_classes=10, contraction="spectral",
                        spectral_gain=0.95, seed=3)
    with torch.no_grad():
        model.cell.weight.mul_(10.0)
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
        u = model.inject(x)
    return model.cell.bind(u), torch.zeros_like(u)


@pytest.mark.parametrize("ours, theirs", PAIRS)
@pytest.mark.parametrize("cell, shape", [("mlp", (64,)), ("conv1d", (40,)), ("conv2d", (28, 28))])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_same_fixed_point_as_torchdeq(ours, theirs, cell, shape, stop_mode):
    f, z0 = bound_cell(cell, shape)
    # torchdeq silently ignores `stop_mode`; the forward criterion is `f_stop_mode`.
    deq = get_deq(f_solver=theirs, f_max_iter=400, f_tol=1e-6, f_stop_mode=stop_mode)
    with torch.no_grad():
        z_out, info = deq(f, z0)
        z, stats = solve(f, z0, solver=ours, max_iter=400, tol=1e-6)
    reference = z_out[-1]
    assert bool(stats["converged"].all())
    assert float(info["rel_lowest"].max()) < 1e-4          # the oracle itself converged
    assert float((z - reference).abs().max()) <= 1e-4
    # Not a trivial agreement: the fixed point is far from the start.
    assert float(reference.abs().max()) > 0.1
