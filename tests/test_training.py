"""Local training under a budget: warm starts, proximal term, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_deq.deq import build_model
from fed_deq.training import LocalTrainConfig, evaluate, train_local


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32)
    return x, y.astype(np.int64)


def _cfg(epochs=3, mu=0.0):
    return LocalTrainConfig(epochs=epochs, batch_size=16, learning_rate=0.05, optimizer="sgd", momentum=0.0,
                            solver="anderson", tol=1e-4, backward="one-step", proximal_mu=mu)


def _train(reuse, epochs=3, warm=None, mu=0.0, seed=0):
    x, y = _data()
    model = build_model(cell="mlp", input_shape=(8,), num_classes=3, width=16, contraction="spectral", seed=seed)
    result, bank = train_local(model, x, y, cfg=_cfg(epochs, mu), forward_budget=30, backward_budget=1,
                               generator=torch.Generator().manual_seed(0), warm_start=warm,
                               reuse_fixed_points=reuse)
    return model, result, bank


def test_reusing_fixed_points_saves_forward_iterations():
    _, warm, bank = _train(reuse=True)
    _, cold, _ = _train(reuse=False)
    assert warm.forward_iterations < cold.forward_iterations
    assert bank.shape == (96, 16) and np.isfinite(bank).all()


def test_a_bank_from_last_round_warm_starts_the_first_epoch():
    _, _, bank = _train(reuse=True, epochs=1)
    _, with_bank, _ = _train(reuse=True, epochs=1, warm=bank)
    _, without, _ = _train(reuse=True, epochs=1)
    assert with_bank.forward_iterations < without.forward_iterations


def test_training_reports_steps_and_lowers_the_loss():
    model, result, _ = _train(reuse=True, epochs=3)
    assert result.num_examples == 96 and result.local_steps == 3 * 6
    x, y = _data()
    after = evaluate(model, x, y, solver="anderson", max_iter=30, tol=1e-4)
    fresh = build_model(cell="mlp", input_shape=(8,), num_classes=3, width=16, contraction="spectral", seed=0)
    before = evaluate(fresh, x, y, solver="anderson", max_iter=30, tol=1e-4)
    assert after.loss < before.loss and after.accuracy > before.accuracy


def test_the_proximal_term_keeps_weights_near_the_global_model():
    start = build_model(cell="mlp", input_shape=(8,), num_classes=3, width=16, contraction="spectral", seed=0)
    ref = torch.cat([p.detach().flatten() for p in start.parameters()])
    free, _, _ = _train(reuse=True, mu=0.0)
    tied, _, _ = _train(reuse=True, mu=10.0)
    drift = lambda m: float((torch.cat([p.detach().flatten() for p in m.parameters()]) - ref).norm())  # noqa: E731
    assert drift(tied) < drift(free)


def test_evaluate_respects_the_budget():
    x, y = _data()
    model = build_model(cell="mlp", input_shape=(8,), num_classes=3, width=16, contraction="none", seed=1)
    assert evaluate(model, x, y, solver="picard", max_iter=2, tol=1e-12).mean_iterations <= 2
