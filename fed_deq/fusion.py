"""Fusion arithmetic and reply screening for the server (numpy only, no Flower).

Arrays are ``dict[str, np.ndarray]`` keyed by ``state_dict`` names; every function that returns arrays keeps
the key order of its first (or reference) argument. Sums are done in float64 and cast back to the array's own
dtype, so float32 models do not lose precision when many clients are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np

from fed_deq.errors import InputError

Arrays = Mapping[str, np.ndarray]


# Fewer finite norms than this and a median says little about what is "normal" for the round.
_MIN_REPLIES_FOR_MEDIAN = 3


# ---------------------------------------------------------------------------------------------------------
# Quality scores and weights
# ---------------------------------------------------------------------------------------------------------


def quality_scores(
    kind: str,
    *,
    budget_share=None,
    rel_residual=None,
    val_accuracy=None,
    probe_loss=None,
    beta: float = 1.0,
) -> np.ndarray:
    """Per-client quality in [0, 1] for one round, from numbers the server measured or derived itself.

    ``kind`` picks the score: ``"budget"`` → ``budget_share`` (iterations the server assigned over the
    scenario's maximum); ``"residual"`` → ``exp(-beta * rel_residual)`` (a non-finite residual scores 0);
    ``"accuracy"`` → ``val_accuracy``; ``"product"`` → the product of those three; ``"probe"`` →
    ``exp(-beta * probe_loss)``, the server's cross-entropy of the client model on its probe set (a
    non-finite loss scores 0). Only the inputs the kind needs are required.
    """
    if kind not in QUALITY_SCORES:
        raise InputError(f"fusion.score: unknown score kind {kind!r}; valid: {', '.join(QUALITY_SCORES)}")
    inputs = {"budget_share": budget_share, "rel_residual": rel_residual, "val_accuracy": val_accuracy,
              "probe_loss": probe_loss}
    parts = [_FACTORS[name](name, inputs[name], beta) for name in QUALITY_SCORES[kind]]
    lengths = {len(p) for p in parts}
    if len(lengths) != 1:
        raise InputError(f"quality_scores: inputs have different lengths {sorted(lengths)}")
    return np.prod(np.stack(parts), axis=0)


def _as_vector(name: str, values) -> np.ndarray:
    if values is None:
        raise InputError(f"quality_scores: {name} is required for this score kind")
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0:
        raise InputError(f"{name}: expected a non-empty 1-D sequence, got shape {vector.shape}")
    return vector


def _unit_interval(name: str, values) -> np.ndarray:
    vector = _as_vector(name, values)
    if not np.all(np.isfinite(vector)) or np.any(vector < 0) or np.any(vector > 1):
        raise InputError(f"{name}: every value must be finite and in [0, 1], got {vector.tolist()}")
    return vector


def _exp_score(name: str, values, beta: float) -> np.ndarray:
    """``exp(-beta * v)`` for v >= 0; a non-finite v (a diverged solve, a blown-up loss) scores 0."""
    if not (math.isfinite(beta) and beta >= 0):
        raise InputError(f"fusion.beta: must be finite and >= 0, got {beta}")
    vector = _as_vector(name, values)
    finite = np.isfinite(vector)
    if np.any(vector[finite] < 0):
        raise InputError(f"{name}: values must be >= 0, got {vector.tolist()}")
    return np.where(finite, np.exp(-beta * np.where(finite, vector, 0.0)), 0.0)


def _unit_factor(name: str, values, beta: float) -> np.ndarray:
    return _unit_interval(name, values)


#: How each measured input becomes a factor in [0, 1].
_FACTORS = MappingProxyType({"budget_share": _unit_factor, "rel_residual": _exp_score, "val_accuracy": _unit_factor,
                             "probe_loss": _exp_score})

#: Quality score name → the factors it multiplies, in order. The scenario's ``fusion.score`` is checked
#: against these names.
QUALITY_SCORES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "budget": ("budget_share",),
    "residual": ("rel_residual",),
    "accuracy": ("val_accuracy",),
    "product": ("budget_share", "rel_residual", "val_accuracy"),
    "probe": ("probe_loss",),
})


def quality_weights(
    num_examples,
    scores,
    *,
    size_exponent: float,
    quality_exponent: float,
    floor: float,
    multipliers=None,
) -> np.ndarray:
    """Normalised fusion weights ``w_k ∝ t_k * n_k**a * max(q_k, floor)**b`` (they sum to 1).

    With ``floor > 0`` no client is zeroed, so a low-quality client still pulls a little. Equal scores give
    plain FedAvg weights ``n_k / Σ n`` when ``a = 1``. ``multipliers`` are the ``t_k`` (each client's tier
    weight, see :func:`tier_multipliers`; default 1). When every client's multiplier is 0 there is nothing
    to weigh by: an InputError, so the round keeps its previous model and records why.
    """
    counts = np.asarray(num_examples, dtype=np.float64)
    quality = np.asarray(scores, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise InputError(f"num_examples: expected a non-empty 1-D sequence, got shape {counts.shape}")
    if quality.shape != counts.shape:
        raise InputError(f"scores: expected {counts.size} values (one per client), got shape {quality.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        raise InputError(f"num_examples: every count must be finite and > 0, got {counts.tolist()}")
    if not np.all(np.isfinite(quality)) or np.any(quality < 0):
        raise InputError(f"scores: every score must be finite and >= 0, got {quality.tolist()}")
    for name, value in (("size_exponent", size_exponent), ("quality_exponent", quality_exponent)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"fusion.{name}: must be finite and >= 0, got {value}")
    if not (math.isfinite(floor) and 0 <= floor <= 1):
        raise InputError(f"fusion.floor: must be in [0, 1], got {floor}")
    raw = counts**size_exponent * np.maximum(quality, floor) ** quality_exponent
    if multipliers is not None:
        weighed = raw * _checked_multipliers(multipliers, counts.size)
        if raw.sum() > 0 and weighed.sum() == 0:
            raise InputError("fusion.tier_weights: every accepted client's tier weight is 0; nothing to fuse")
        raw = weighed
    total = raw.sum()
    if not (math.isfinite(total) and total > 0):
        raise InputError("quality_weights: every client has weight 0 (all scores 0 and floor 0)")
    return raw / total


def tier_multipliers(tiers: Sequence[str], tier_weights: Mapping[str, float]) -> np.ndarray:
    """Each client's multiplier from its tier's weight (``fusion.tier_weights``; a tier not named: 1)."""
    return np.array([float(tier_weights.get(tier, 1.0)) for tier in tiers], dtype=np.float64)


def _checked_multipliers(multipliers, count: int) -> np.ndarray:
    values = np.asarray(multipliers, dtype=np.float64)
    if values.shape != (count,):
        raise InputError(f"multipliers: expected {count} values (one per client), got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError(f"fusion.tier_weights: every multiplier must be finite and >= 0, got {values.tolist()}")
    return values


# ---------------------------------------------------------------------------------------------------------
# Averaging
# ---------------------------------------------------------------------------------------------------------


def weighted_average(arrays_list: Sequence[Arrays], weights) -> dict[str, np.ndarray]:
    """``Σ w_i x_i / Σ w_i`` per key, in float64, cast back to each array's dtype.

    All dicts must have the same keys and shapes as the first one; nothing is ever broadcast.
    """
    if len(arrays_list) == 0:
        raise InputError("weighted_average: no arrays to average")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays_list),):
        raise InputError(f"weighted_average: expected {len(arrays_list)} weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"weighted_average: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    reference = arrays_list[0]
    for arrays in arrays_list[1:]:
        _require_same_layout(arrays, reference, "weighted_average")
    total = w.sum()
    return {
        key: _cast_like(sum(wi * np.asarray(a[key], dtype=np.float64) for wi, a in zip(w, arrays_list)) / total,
                        ref)
        for key, ref in reference.items()
    }


def fednova_normaliser(local_steps, *, optimizer: str, momentum: float, learning_rate: float,
                       proximal_mu: float = 0.0) -> np.ndarray:
    """FedNova's ``‖a_i‖₁`` per client: how many "gradient units" its cumulative local update holds.

    Local SGD with momentum ρ (``u_k = ρ u_{k−1} + g_k``) makes gradient j count
    ``(1 − ρ^{τ−j}) / (1 − ρ)`` times, so ``‖a‖₁ = [τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` (Wang et al. 2020,
    §5); ρ = 0 gives τ. A proximal term μ adds the per-step contraction ``1 − ημ``; the step recurrence is
    the one of the FedNova authors' reference optimizer (JYWa/FedNova, also in Flower's baseline):
    ``c ← ρc + 1; a ← a + c`` (momentum), then ``a ← (1 − ημ) a + 1`` (proximal), else ``a ← a + 1``.
    Adam's update is not a linear combination of gradients, so for ``optimizer="adam"`` the plain step
    count τ is used (FedNova's "vanilla" normaliser); gradient clipping rescales gradients, not their
    coefficients, so it leaves ``a`` unchanged.
    """
    steps = np.asarray(local_steps, dtype=np.float64)
    if steps.ndim != 1 or not np.all(np.isfinite(steps)) or np.any(steps < 1) or np.any(steps != np.round(steps)):
        raise InputError(f"fednova: local steps must be integers >= 1, got {steps.tolist()}")
    if optimizer == "adam":
        return steps.copy()
    if not 0 <= momentum < 1:
        raise InputError(f"training.momentum: must be in [0, 1) for fednova, got {momentum}")
    etamu = learning_rate * proximal_mu
    if not 0 <= etamu < 1:
        raise InputError(f"fednova: learning_rate x proximal_mu must be in [0, 1), got {etamu}")
    return np.array([_normaliser_by_steps(int(tau), momentum, etamu) for tau in steps])


def _normaliser_by_steps(tau: int, rho: float, etamu: float) -> float:
    counter = vec = 0.0
    for _ in range(tau):
        if rho != 0:
            counter = counter * rho + 1.0
            vec += counter
        if etamu != 0:
            vec = vec * (1.0 - etamu) + 1.0
        if rho == 0 and etamu == 0:
            vec += 1.0
    return vec


def fednova_aggregate(
    global_arrays: Arrays,
    client_arrays: Sequence[Arrays],
    num_examples,
    normalisers,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """FedNova (Wang et al. 2020) normalised averaging; returns the new arrays and the effective weights.

    ``p_i = n_i / Σ n``, ``Δ_i = global − client_i``, ``a_i`` = :func:`fednova_normaliser` (τ_i for plain
    SGD), and ``x⁺ = x − (Σ_j p_j a_j) · Σ_i p_i Δ_i / a_i``. That is ``x⁺ = Σ_i w_i x_i + (1 − Σ w_i) x``
    with effective weights ``w_i = (Σ_j p_j a_j) p_i / a_i`` (they sum to 1 when every a_i is equal, and
    the result is then FedAvg weighted by n).
    """
    if len(client_arrays) == 0:
        raise InputError("fednova_aggregate: no client arrays")
    counts = np.asarray(num_examples, dtype=np.float64)
    norms = np.asarray(normalisers, dtype=np.float64)
    for name, values in (("num_examples", counts), ("normalisers", norms)):
        if values.shape != (len(client_arrays),):
            raise InputError(f"fednova_aggregate: expected {len(client_arrays)} {name}, got shape {values.shape}")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise InputError(f"fednova_aggregate: every {name} value must be finite and > 0, got {values.tolist()}")
    for arrays in client_arrays:
        _require_same_layout(arrays, global_arrays, "fednova_aggregate")
    p = counts / counts.sum()
    tau_eff = float(np.dot(p, norms))
    result = {}
    for key, ref in global_arrays.items():
        x = np.asarray(ref, dtype=np.float64)
        normalised = sum(
            pi * (x - np.asarray(c[key], dtype=np.float64)) / ai for pi, ai, c in zip(p, norms, client_arrays)
        )
        result[key] = _cast_like(x - tau_eff * normalised, ref)
    return result, tau_eff * p / norms


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    dtype = np.asarray(like).dtype
    if np.issubdtype(dtype, np.integer):
        # Truncation would bias integer buffers downwards; round to nearest instead.
        values = np.rint(values)
    return values.astype(dtype, copy=False)


def _require_same_layout(arrays: Arrays, reference: Arrays, where: str) -> None:
    missing = [k for k in reference if k not in arrays]
    extra = [k for k in arrays if k not in reference]
    if missing or extra:
        raise InputError(f"{where}: key mismatch (missing {missing}, extra {extra})")
    for key, ref in reference.items():
        if np.shape(arrays[key]) != np.shape(ref):
            raise InputError(f"{where}: shape {np.shape(arrays[key])} for {key!r}, expected {np.shape(ref)}")


# ---------------------------------------------------------------------------------------------------------
# Screening
# ---------------------------------------------------------------------------------------------------------


def update_norm(arrays: Arrays, reference: Arrays) -> float:
    """L2 norm of ``arrays − reference`` over all keys together (float64; inf/NaN propagate)."""
    _require_same_layout(arrays, reference, "update_norm")
    squared = sum(
        float(np.sum((np.asarray(arrays[k], dtype=np.float64) - np.asarray(r, dtype=np.float64)) ** 2))
        for k, r in reference.items()
    )
    return math.sqrt(squared)


def norm_outliers(update_norms, max_ratio: float) -> np.ndarray:
    """Boolean mask of updates whose norm exceeds ``max_ratio`` × the round's median norm.

    Non-finite norms are always flagged. With fewer than 3 finite norms (or a zero median) the median is no
    yardstick, so only non-finite norms are flagged.
    """
    norms = np.asarray(update_norms, dtype=np.float64)
    if norms.ndim != 1:
        raise InputError(f"norm_outliers: expected a 1-D sequence of norms, got shape {norms.shape}")
    if math.isnan(max_ratio) or max_ratio <= 0:
        raise InputError(f"fusion.max_norm_ratio: must be > 0, got {max_ratio}")
    finite = np.isfinite(norms)
    flagged = ~finite
    if finite.sum() < _MIN_REPLIES_FOR_MEDIAN:
        return flagged
    median = float(np.median(norms[finite]))
    if median <= 0:
        return flagged
    return flagged | (finite & (norms > max_ratio * median))


def screen_update(
    arrays: Arrays,
    reference: Arrays,
    metrics: Mapping[str, object],
    required_metrics: Sequence[str],
) -> str | None:
    """Reason to reject one client reply, or ``None`` if it can be fused.

    Checks, in order: missing/extra keys against ``reference``, shape, dtype, non-finite values, missing
    required metrics, non-numeric or non-finite metrics, and ``num-examples`` ≤ 0.
    """
    return _screen_arrays(arrays, reference) or _screen_metrics(metrics, required_metrics)


def _screen_arrays(arrays: Arrays, reference: Arrays) -> str | None:
    missing = [k for k in reference if k not in arrays]
    if missing:
        return f"missing key {missing[0]!r}"
    extra = [k for k in arrays if k not in reference]
    if extra:
        return f"unexpected key {extra[0]!r}"
    for key, ref in reference.items():
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            return f"{key!r} is not an array"
        if value.shape != np.shape(ref):
            return f"shape {value.shape} for {key!r}, expected {np.shape(ref)}"
        if value.dtype != np.asarray(ref).dtype:
            return f"dtype {value.dtype} for {key!r}, expected {np.asarray(ref).dtype}"
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            return f"non-finite values in {key!r}"
    return None


def _screen_metrics(metrics: Mapping[str, object], required_metrics: Sequence[str]) -> str | None:
    for name in required_metrics:
        if name not in metrics:
            return f"missing metric {name!r}"
    for name, value in metrics.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if not all(_is_number(v) for v in numbers):
            return f"metric {name!r} is not numeric"
        if not all(math.isfinite(float(v)) for v in numbers):
            return f"non-finite metric {name!r}"
    if "num-examples" in metrics:
        count = metrics["num-examples"]
        if not _is_number(count) or float(count) <= 0:
            return f"num-examples must be a number > 0, got {count}"
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
