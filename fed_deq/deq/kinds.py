"""Model kinds: the DEQ and its fixed-depth baselines, built from the same parts and called the same way.

``MODEL_KINDS`` is the registry behind the scenario's ``model.kind``; ``build_classifier(kind, ...)`` builds
one. A fixed-depth kind runs all its layers whatever the budget, so the fleet's budget planning and work
bounds treat it apart (fed_deq/workload.py, ``fleet.unroll_work``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

from .models import DEQClassifier, build_model
from .unrolled import build_unrolled


@dataclass(frozen=True)
class ModelKind:
    """What a model kind is and how it is built: ``build(cell, input_shape, num_classes, *, depth,
    sparse_masks, mask_density, **cell_options)``."""

    summary: str
    fixed_depth: bool          # runs exactly ``depth`` layers (no solver, no budget to adapt)
    build: Callable[..., DEQClassifier]
    takes_masks: bool = False  # sparse masks apply (weight-tied only)


def _build_deq(cell, input_shape, num_classes, *, depth, sparse_masks, mask_density, **options) -> DEQClassifier:
    return build_model(cell, input_shape, num_classes, **options)


def _build_weight_tied(cell, input_shape, num_classes, *, depth, sparse_masks, mask_density,
                       **options) -> DEQClassifier:
    return build_unrolled(cell, input_shape, num_classes, tied=True, depth=depth, sparse_masks=sparse_masks,
                          mask_density=mask_density, **options)


def _build_explicit(cell, input_shape, num_classes, *, depth, sparse_masks, mask_density,
                    **options) -> DEQClassifier:
    return build_unrolled(cell, input_shape, num_classes, tied=False, depth=depth, **options)


#: Model kind → what it is. The scenario's ``model.kind`` is checked against these names.
MODEL_KINDS: Mapping[str, ModelKind] = MappingProxyType({
    "deq": ModelKind("the cell's fixed point, solved within each device's iteration budget", False, _build_deq),
    "weight_tied": ModelKind("the cell unrolled model.depth times, backpropagated through the unroll", True,
                             _build_weight_tied, takes_masks=True),
    "explicit": ModelKind("model.depth untied cells stacked, backpropagated through the stack", True,
                          _build_explicit),
})


def build_classifier(kind: str = "deq", cell: str = "conv1d", input_shape: tuple[int, ...] = (40,),
                     num_classes: int = 10, *, depth: int = 8, sparse_masks: bool = False,
                     mask_density: float = 0.5, **options) -> DEQClassifier:
    """A classifier of model kind ``kind``; ``options`` are :func:`build_model`'s (width, contraction, seed…).

    ``depth`` and the masks are read by the fixed-depth kinds only. Raises ValueError for an unknown kind, or
    sparse masks on a kind that does not take them.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid kinds: {list(MODEL_KINDS)}")
    entry = MODEL_KINDS[kind]
    if sparse_masks and not entry.takes_masks:
        raise ValueError(f"sparse masks need a weight-tied model, not kind {kind!r}")
    return entry.build(cell, input_shape, num_classes, depth=depth, sparse_masks=sparse_masks,
                       mask_density=mask_density, **options)


def is_fixed_depth(kind: str) -> bool:
    """True for a kind that always runs its whole depth (its budget is its depth)."""
    return MODEL_KINDS[kind].fixed_depth


__all__ = ["MODEL_KINDS", "ModelKind", "build_classifier", "is_fixed_depth"]
