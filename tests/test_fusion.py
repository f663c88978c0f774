"""Fusion arithmetic and reply screening, checked on arrays small enough to verify by hand."""

import math

import numpy as np
import pytest

from fed_deq.errors import InputError
from fed_deq.fusion import (
    fednova_aggregate,
    fednova_normaliser,
    norm_outliers,
    quality_scores,
    quality_weights,
    screen_update,
    update_norm,
    weighted_average,
)

REQUIRED = ("num-examples", "budget-share")
GOOD_METRICS = {"num-examples": 10, "budget-share": 0.5, "rel-residual": 0.01}


def arrays(w, b=(0.0,)):
    return {"w": np.asarray(w, dtype=np.float32), "b": np.asarray(b, dtype=np.float32)}


# --- weighted_average ------------------------------------------------------------------------------------


def test_weighted_average_by_hand():
    out = weighted_average([arrays([1, 2], [0]), arrays([3, 4], [4])], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 3.5])
    np.testing.assert_allclose(out["b"], [3.0])
    assert list(out) == ["w", "b"]
    assert out["w"].dtype == np.float32


def test_weighted_average_unnormalised_weights_match_normalised():
    a, b = arrays([1, 2]), arrays([3, 4])
    np.testing.assert_allclose(weighted_average([a, b], [2, 6])["w"], weighted_average([a, b], [0.25, 0.75])["w"])


def test_weighted_average_rejects_mismatch_instead_of_broadcasting():
    row = {"w": np.ones(3, np.float32)}
    matrix = {"w": np.ones((2, 3), np.float32)}
    for pair in ([matrix, row], [row, matrix]):
        with pytest.raises(InputError, match="shape"):
            weighted_average(pair, [1, 1])
    with pytest.raises(InputError, match="key mismatch"):
        weighted_average([{"w": np.ones(3)}, {"v": np.ones(3)}], [1, 1])
    with pytest.raises(InputError, match="weights"):
        weighted_average([row, row], [1])
    with pytest.raises(InputError, match="weights"):
        weighted_average([row, row], [0, 0])
    with pytest.raises(InputError, match="no arrays"):
        weighted_average([], [])


# --- quality scores and weights --------------------------------------------------------------------------


def test_equal_qualities_give_fedavg_weights():
    w = quality_weights([10, 30, 60], [0.7, 0.7, 0.7], size_exponent=1.0, quality_exponent=1.0, floor=0.05)
    np.testing.assert_allclose(w, [0.1, 0.3, 0.6])


def test_quality_weights_by_hand_and_exponents():
    # n^1 * q^1: 10*0.5=5, 10*1=10 -> 1/3, 2/3
    w = quality_weights([10, 10], [0.5, 1.0], size_exponent=1.0, quality_exponent=1.0, floor=0.0)
    np.testing.assert_allclose(w, [1 / 3, 2 / 3])
    # quality exponent 2: 0.25 vs 1 -> 0.2, 0.8
    w = quality_weights([10, 10], [0.5, 1.0], size_exponent=1.0, quality_exponent=2.0, floor=0.0)
    np.testing.assert_allclose(w, [0.2, 0.8])
    # size exponent 0 ignores sizes: scores 1:3
    w = quality_weights([1, 100], [0.25, 0.75], size_exponent=0.0, quality_exponent=1.0, floor=0.0)
    np.testing.assert_allclose(w, [0.25, 0.75])
    # size exponent 0.5: sqrt(4)=2, sqrt(16)=4 with equal scores -> 1/3, 2/3
    w = quality_weights([4, 16], [1.0, 1.0], size_exponent=0.5, quality_exponent=1.0, floor=0.0)
    np.testing.assert_allclose(w, [1 / 3, 2 / 3])


def test_floor_prevents_zero_weight():
    w = quality_weights([10, 10], [0.0, 0.9], size_exponent=1.0, quality_exponent=1.0, floor=0.1)
    np.testing.assert_allclose(w, [0.1, 0.9])
    w0 = quality_weights([10, 10], [0.0, 0.9], size_exponent=1.0, quality_exponent=1.0, floor=0.0)
    assert w0[0] == 0.0 and w0[1] == 1.0


@pytest.mark.parametrize(
    "counts, scores, match",
    [([0, 1], [1, 1], "num_examples"), ([-1, 1], [1, 1], "num_examples"), ([], [], "non-empty"),
     ([1, 1], [-0.1, 1], "scores"), ([1, 1], [math.nan, 1], "scores"), ([1, 1], [1], "scores")],
)
def test_quality_weights_rejects_bad_input(counts, scores, match):
    with pytest.raises(InputError, match=match):
        quality_weights(counts, scores, size_exponent=1.0, quality_exponent=1.0, floor=0.05)


def test_quality_weights_all_zero_without_floor_is_an_error():
    with pytest.raises(InputError, match="weight 0"):
        quality_weights([1, 2], [0, 0], size_exponent=1.0, quality_exponent=1.0, floor=0.0)


def test_quality_scores_each_kind():
    share, residual, acc = [0.5, 1.0], [0.0, math.log(2)], [0.8, 0.4]
    kw = dict(budget_share=share, rel_residual=residual, val_accuracy=acc, beta=1.0)
    np.testing.assert_allclose(quality_scores("budget", **kw), [0.5, 1.0])
    np.testing.assert_allclose(quality_scores("residual", **kw), [1.0, 0.5])
    np.testing.assert_allclose(quality_scores("accuracy", **kw), [0.8, 0.4])
    np.testing.assert_allclose(quality_scores("product", **kw), [0.4, 0.2])
    np.testing.assert_allclose(quality_scores("residual", rel_residual=[1.0], beta=2.0), [math.exp(-2)])


def test_quality_scores_non_finite_residual_scores_zero_and_bad_kind_raises():
    np.testing.assert_array_equal(quality_scores("residual", rel_residual=[math.inf, math.nan, 0.0], beta=1.0),
                                  [0.0, 0.0, 1.0])
    with pytest.raises(InputError, match="unknown score kind 'speed'"):
        quality_scores("speed", budget_share=[1.0], beta=1.0)
    with pytest.raises(InputError, match="budget_share"):
        quality_scores("budget", budget_share=[1.5], beta=1.0)
    with pytest.raises(InputError, match="val_accuracy is required"):
        quality_scores("accuracy", beta=1.0)


# --- FedNova ---------------------------------------------------------------------------------------------


def test_fednova_by_hand_with_unequal_steps():
    # global x = [1, 1]; client 1: x1 = [0, -1] (Δ1 = [1, 2]), n=1, τ=1; client 2: x2 = [-1, -3] (Δ2 = [2, 4]),
    # n=3, τ=4. p = [0.25, 0.75]; τ_eff = 0.25*1 + 0.75*4 = 3.25;
    # Σ p Δ/τ = 0.25*[1, 2] + 0.75*[0.5, 1] = [0.625, 1.25]; x⁺ = [1, 1] − 3.25*[0.625, 1.25] = [−1.03125, −3.0625].
    glob = {"w": np.array([1.0, 1.0], np.float32)}
    clients = [{"w": np.array([0.0, -1.0], np.float32)}, {"w": np.array([-1.0, -3.0], np.float32)}]
    out, weights = fednova_aggregate(glob, clients, num_examples=[1, 3], normalisers=[1, 4])
    np.testing.assert_allclose(out["w"], [-1.03125, -3.0625])
    # Effective weights w_i = τ_eff p_i / a_i = [3.25*0.25/1, 3.25*0.75/4]; the old model keeps 1 − Σw.
    np.testing.assert_allclose(weights, [0.8125, 0.609375])
    np.testing.assert_allclose(sum(w * c["w"] for w, c in zip(weights, clients)) + (1 - weights.sum()) * glob["w"],
                               out["w"], rtol=1e-6)
    assert out["w"].dtype == np.float32
    # FedAvg by n would give 0.25*[0, -1] + 0.75*[-1, -3] = [-0.75, -2.5]: FedNova differs here.
    assert not np.allclose(out["w"], [-0.75, -2.5])


def test_fednova_equal_steps_is_fedavg_by_examples():
    glob = arrays([1, 1], [2])
    clients = [arrays([0, 3], [1]), arrays([2, -1], [5]), arrays([4, 4], [0])]
    out, weights = fednova_aggregate(glob, clients, num_examples=[1, 2, 5], normalisers=[3, 3, 3])
    np.testing.assert_allclose(weights, [1 / 8, 2 / 8, 5 / 8])
    ref = weighted_average(clients, [1, 2, 5])
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6)
    # by hand for "w": (1*[0,3] + 2*[2,-1] + 5*[4,4]) / 8 = [24/8, 21/8]
    np.testing.assert_allclose(out["w"], [3.0, 2.625], rtol=1e-6)


def test_fednova_rejects_bad_steps_and_shapes():
    glob = arrays([1, 1])
    with pytest.raises(InputError, match="normalisers"):
        fednova_aggregate(glob, [arrays([0, 0])], [1], [0])
    with pytest.raises(InputError, match="shape"):
        fednova_aggregate(glob, [arrays([0, 0, 0])], [1], [1])


def test_fednova_normaliser_plain_sgd_is_the_step_count():
    np.testing.assert_array_equal(fednova_normaliser([1, 5, 12], optimizer="sgd", momentum=0.0, learning_rate=0.1),
                                  [1, 5, 12])


def test_fednova_normaliser_with_momentum_by_hand_and_closed_form():
    # ρ = 0.5, τ = 3: the gradients count 1 + 0.5 + 0.25, 1 + 0.5, 1 → ‖a‖₁ = 4.25.
    (a,) = fednova_normaliser([3], optimizer="sgd", momentum=0.5, learning_rate=0.1)
    assert a == pytest.approx(4.25)
    # The paper's closed form [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ) for ρ = 0.9 and τ = 15.
    rho, tau = 0.9, 15
    (b,) = fednova_normaliser([tau], optimizer="sgd", momentum=rho, learning_rate=0.05)
    assert b == pytest.approx((tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho))
    assert b < tau / (1 - rho)  # early gradients have not yet gathered their full momentum


def test_fednova_normaliser_proximal_adam_and_bad_input():
    # μ only (ρ = 0): a ← (1 − ημ) a + 1, so τ = 2 with ημ = 0.5 gives 1.5.
    (a,) = fednova_normaliser([2], optimizer="sgd", momentum=0.0, learning_rate=0.5, proximal_mu=1.0)
    assert a == pytest.approx(1.5)
    np.testing.assert_array_equal(fednova_normaliser([4, 7], optimizer="adam", momentum=0.9, learning_rate=1e-3),
                                  [4, 7])
    with pytest.raises(InputError, match="local steps"):
        fednova_normaliser([0], optimizer="sgd", momentum=0.0, learning_rate=0.1)


def test_probe_score_is_exp_of_minus_the_loss():
    scores = quality_scores("probe", probe_loss=[0.0, 1.0, math.inf], beta=2.0)
    np.testing.assert_allclose(scores, [1.0, math.exp(-2.0), 0.0])


# --- norms -----------------------------------------------------------------------------------------------


def test_update_norm_over_all_keys():
    ref = arrays([0, 0], [0])
    assert update_norm(arrays([3, 0], [4]), ref) == pytest.approx(5.0)
    assert math.isinf(update_norm(arrays([np.inf, 0], [0]), ref))


def test_norm_outliers():
    mask = norm_outliers([1.0, 1.2, 0.9, 50.0], max_ratio=10.0)
    np.testing.assert_array_equal(mask, [False, False, False, True])
    np.testing.assert_array_equal(norm_outliers([1.0, 1.2, 0.9, 9.0], max_ratio=10.0), [False] * 4)
    # Fewer than 3 replies: only non-finite norms are flagged.
    np.testing.assert_array_equal(norm_outliers([1.0, 1000.0], max_ratio=10.0), [False, False])
    np.testing.assert_array_equal(norm_outliers([1.0, math.nan], max_ratio=10.0), [False, True])
    np.testing.assert_array_equal(norm_outliers([1.0, 1.1, 0.9, math.inf], max_ratio=10.0),
                                  [False, False, False, True])
    with pytest.raises(InputError, match="max_norm_ratio"):
        norm_outliers([1.0], max_ratio=0.0)


# --- screen_update ---------------------------------------------------------------------------------------


def test_screen_accepts_a_good_reply():
    ref = arrays([0, 0], [0])
    assert screen_update(arrays([1, 2], [3]), ref, GOOD_METRICS, REQUIRED) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_screen_rejects_non_finite_values(bad):
    reason = screen_update(arrays([1, bad]), arrays([0, 0]), GOOD_METRICS, REQUIRED)
    assert reason == "non-finite values in 'w'"


def test_screen_rejects_wrong_shape_in_both_orders():
    row = {"w": np.ones(3, np.float32)}
    matrix = {"w": np.ones((2, 3), np.float32)}
    assert screen_update(row, matrix, GOOD_METRICS, REQUIRED) == "shape (3,) for 'w', expected (2, 3)"
    assert screen_update(matrix, row, GOOD_METRICS, REQUIRED) == "shape (2, 3) for 'w', expected (3,)"


def test_screen_rejects_key_and_dtype_problems():
    ref = arrays([0, 0], [0])
    assert screen_update({"w": ref["w"]}, ref, GOOD_METRICS, REQUIRED) == "missing key 'b'"
    assert screen_update({**ref, "extra": np.zeros(1, np.float32)}, ref, GOOD_METRICS, REQUIRED) == (
        "unexpected key 'extra'")
    wrong_dtype = {"w": ref["w"].astype(np.float64), "b": ref["b"]}
    assert screen_update(wrong_dtype, ref, GOOD_METRICS, REQUIRED) == "dtype float64 for 'w', expected float32"
    assert screen_update({"w": [0.0, 0.0], "b": ref["b"]}, ref, GOOD_METRICS, REQUIRED) == "'w' is not an array"


def test_screen_rejects_bad_metrics():
    ref = arrays([0, 0], [0])
    reply = arrays([1, 1], [1])
    assert screen_update(reply, ref, {"num-examples": 5}, REQUIRED) == "missing metric 'budget-share'"
    assert screen_update(reply, ref, {**GOOD_METRICS, "rel-residual": math.nan}, REQUIRED) == (
        "non-finite metric 'rel-residual'")
    assert screen_update(reply, ref, {**GOOD_METRICS, "budget-share": [0.1, math.inf]}, REQUIRED) == (
        "non-finite metric 'budget-share'")
    assert screen_update(reply, ref, {**GOOD_METRICS, "num-examples": 0}, REQUIRED) == (
        "num-examples must be a number > 0, got 0")
    assert screen_update(reply, ref, {**GOOD_METRICS, "note": "hi"}, REQUIRED) == "metric 'note' is not numeric"
