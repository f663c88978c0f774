"""The fusion rules a scenario's ``fusion.rule`` can name, each with the function that carries it out.

This registry is the one list of rules: the schema accepts exactly its names, the round driver dispatches
through it, tuning searches over it. A rule the core does not carry out itself names its ``adapter``
(``"flower"``: Flower's own strategy, run by server/strategies/flower_rules.py through the driver's
``robust_fuser``). Every rule sees only what the server derived or measured: server-known sizes and step
counts, server-measured quality scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from fed_deq import fusion

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FusionInputs:
    """What a rule may use: the accepted models and the server's facts about them (one entry per model)."""

    reference: Arrays                 # the global model the clients started from
    arrays: list[Arrays]
    sizes: np.ndarray                 # server-known training sample counts
    local_steps: list[int]            # server-derived optimiser steps
    scores: np.ndarray | None         # server-measured quality scores (rules with ``scored``)
    fusion: Any                       # the scenario's fusion section
    training: Any                     # the scenario's training section
    tiers: tuple[str, ...] = ()       # each model's tier, from the server's fleet (quality: tier weights)


@dataclass(frozen=True)
class Fused:
    """A rule's result: the new global model, each client's weight (None for coordinate-wise rules) and the
    weight left on the previous model (FedNova)."""

    arrays: Arrays
    weights: np.ndarray | None
    previous_model_weight: float = 0.0


@dataclass(frozen=True)
class FusionRule:
    """A rule: what it does, how (``fuse``; None when an adapter carries it out) and what it needs."""

    summary: str
    fuse: Callable[[FusionInputs], Fused] | None = None
    adapter: str | None = None
    scored: bool = False              # needs quality scores
    proximal: bool = False            # clients train with the proximal term ``fusion.proximal_mu``


def fuse_quality(x: FusionInputs) -> Fused:
    """Weights t * n^a * max(q, floor)^b, normalised; t is the client's tier weight (``fusion.tier_weights``)."""
    f = x.fusion
    multipliers = fusion.tier_multipliers(x.tiers, f.tier_weights) if f.tier_weights else None
    weights = fusion.quality_weights(x.sizes, x.scores, size_exponent=f.size_exponent,
                                     quality_exponent=f.quality_exponent, floor=f.floor, multipliers=multipliers)
    return Fused(fusion.weighted_average(x.arrays, weights), weights)


def fuse_by_size(x: FusionInputs) -> Fused:
    """FedAvg: weights proportional to the server-known sample counts."""
    weights = x.sizes / x.sizes.sum()
    return Fused(fusion.weighted_average(x.arrays, weights), weights)


def fuse_fednova(x: FusionInputs) -> Fused:
    """FedNova: each update normalised by its client's optimiser normaliser a_i (Wang et al. 2020)."""
    t = x.training
    normalisers = fusion.fednova_normaliser(x.local_steps, optimizer=t.optimizer, momentum=t.momentum,
                                            learning_rate=t.learning_rate)
    arrays, weights = fusion.fednova_aggregate(x.reference, x.arrays, x.sizes, normalisers)
    return Fused(arrays, weights, previous_model_weight=float(1.0 - weights.sum()))


#: Rule name → rule; the order is the order tuning and comparisons list them in.
FUSION_RULES: Mapping[str, FusionRule] = MappingProxyType({
    "quality": FusionRule("weights t * n^a * max(q, floor)^b: t the tier's weight, q a server-measured quality",
                          fuse=fuse_quality, scored=True),
    "fedavg": FusionRule("weights proportional to the server-known sample counts", fuse=fuse_by_size),
    "fednova": FusionRule("FedNova: updates normalised by each client's local steps", fuse=fuse_fednova),
    "fedprox": FusionRule("FedAvg weights; clients train with a proximal term", fuse=fuse_by_size, proximal=True),
    "fedmedian": FusionRule("coordinate-wise median (Yin et al. 2018)", adapter="flower"),
    "fedtrimmedavg": FusionRule("coordinate-wise trimmed mean (Yin et al. 2018)", adapter="flower"),
    "krum": FusionRule("the update closest to its neighbours (Blanchard et al. 2017)", adapter="flower"),
})


def adapter_rules(adapter: str = "flower") -> tuple[str, ...]:
    """Names of the fusion rules an adapter carries out (the core only screens their replies)."""
    return tuple(name for name, rule in FUSION_RULES.items() if rule.adapter == adapter)
