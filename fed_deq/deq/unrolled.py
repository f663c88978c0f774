"""Fixed-depth baselines of a DEQ: the same encoder, cell and head, unrolled for ``depth`` layers.

- weight-tied: one cell applied ``depth`` times from ``z = 0``, trained by backpropagation through the whole
  unroll. With sparse masks each layer applies the cell's weights times its own fixed random 0/1 mask (Song
  et al., "Revisiting Implicit Models: Sparsity Trade-offs Capability in Weight-tied Model for Vision Tasks"):
  one set of weights, ``depth`` different sparse operators.
- explicit: ``depth`` untied cells, one per layer, so about ``depth`` times the cell's parameters (and bytes).

The call signature and the :class:`~fed_deq.deq.models.DEQOutput` are those of the DEQ, so training,
evaluation and the simulated clock run unchanged. A fixed-depth model always runs all its layers: the solver,
the budget, the backward mode and a warm start are accepted and ignored. Its stats charge what it computes
through the DEQ's cost model (fed_deq/fleet.py ``WorkCounts``):

- with autograd (training): the ``depth`` layers are f evaluations on the gradient path (``grad_evals`` =
  depth per sample, each also differentiated into the weights), and backpropagation through the unroll makes
  ``depth - 1`` vector-Jacobian products with respect to the state (layer 1 starts from the constant 0);
  ``f_calls`` (evaluations without autograd) is 0. Backward ``iterations`` = depth.
- without autograd (evaluation): ``f_calls`` = depth.
- ``iterations`` = depth for every sample; the residual is that of the last layer, ``||z_d - z_{d-1}||``
  (relative to ``||z_d||``), the DEQ's residual with ``z_{d-1}`` as the evaluated point; ``converged`` means
  it is within ``tol``.

The masks are drawn from the model seed (``seeding.rng(seed, "sparse-mask", weight name, layer)``), so every
client and the server hold the same ones. They are non-persistent buffers: never in the state dict, never on
the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor, nn

from fed_deq.seeding import rng

from .backward import path_cost, record_on_backward
from .cells import CONTRACTIONS, DEQCell
from .models import DEQClassifier, DEQOutput, initialise, model_parts

_NORM_EPS = 1e-12   # as the solvers' tracker: a zero state has relative residual 0, not NaN
_MASK_PREFIX = "mask_"


class UnrolledClassifier(DEQClassifier):
    """Encoder -> ``depth`` layers of the cell from ``z = 0`` -> head; see the module docstring."""

    def __init__(self, *arguments, depth: int, untied_cells: Sequence[DEQCell] = ()):
        super().__init__(*arguments)
        _check_depth(depth)
        if untied_cells and len(untied_cells) != depth - 1:
            raise ValueError(f"an explicit model of depth {depth} needs {depth - 1} more cells, "
                             f"got {len(untied_cells)}")
        self.depth = depth
        # Layers 2..depth of an explicit model; empty for a weight-tied one (every layer is self.cell).
        self.untied_cells = nn.ModuleList(untied_cells)

    @property
    def tied(self) -> bool:
        """True when every layer applies the same cell (weight-tied), False for an explicit stack."""
        return len(self.untied_cells) == 0

    @property
    def sparse(self) -> bool:
        """True when each layer masks the cell's weights with its own fixed sparse mask."""
        return any(name.startswith(_MASK_PREFIX) for name, _ in self.named_buffers(recurse=False))

    def layer_cells(self) -> list[DEQCell]:
        """The cell of each layer, in order (the same object ``depth`` times when weight-tied)."""
        return [self.cell] * self.depth if self.tied else [self.cell, *self.untied_cells]

    def draw_masks(self, density: float, seed: int) -> None:
        """Give each layer its own fixed random mask on each stored weight of the (tied) cell.

        Exactly ``max(1, round(density * n))`` of a weight's ``n`` entries are kept per layer, drawn from
        ``seeding.rng(seed, "sparse-mask", name, layer)``; stored as non-persistent buffers.
        """
        if not self.tied:
            raise ValueError("sparse masks are for a weight-tied model; an explicit model has untied cells")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"mask density must be in (0, 1], got {density!r}")
        shape = self.cell.weight_shape
        size = math.prod(shape)
        keep = max(1, round(density * size))
        for name in self._weight_names():
            masks = torch.zeros(self.depth, size)
            for layer in range(self.depth):
                generator = torch.Generator().manual_seed(
                    int(rng(int(seed), "sparse-mask", name, layer).integers(2**31)))
                masks[layer, torch.randperm(size, generator=generator)[:keep]] = 1.0
            reference = getattr(self.cell, name)
            self.register_buffer(_MASK_PREFIX + name, masks.reshape(self.depth, *shape).to(reference),
                                 persistent=False)

    def layer_masks(self, layer: int) -> dict[str, Tensor] | None:
        """Layer ``layer``'s mask of each stored weight (0-based), or None without sparse masks."""
        if not self.sparse:
            return None
        return {name: getattr(self, _MASK_PREFIX + name)[layer] for name in self._weight_names()}

    def layer_weights(self, layer: int) -> dict[str, Tensor]:
        """The weights layer ``layer`` applies, masked, before the contraction control (for inspection)."""
        cell, masks = self.layer_cells()[layer], self.layer_masks(layer)
        weights = {name: getattr(cell, name) for name in self._weight_names()}
        return weights if masks is None else {name: w * masks[name] for name, w in weights.items()}

    def layer_maps(self, u: Tensor) -> list[Callable[[Tensor], Tensor]]:
        """``f_l(z) = f_l(z, u)`` for each layer; an unmasked weight-tied cell is bound (normalised) once."""
        if self.tied and not self.sparse:
            return [self.cell.bind(u)] * self.depth
        return [cell.bind(u, self.layer_masks(layer)) for layer, cell in enumerate(self.layer_cells())]

    def forward(self, x: Tensor, *, solver: str = "anderson", max_iter: int = 30, tol: float = 1e-3,
                backward: str = "one-step", backward_max_iter: int = 4, z0: Tensor | None = None,
                backward_tol: float | None = None, phantom_damping: float = 1.0,
                solver_options: dict | None = None) -> DEQOutput:
        """Run all ``depth`` layers from ``z = 0`` (the DEQ's other arguments are ignored; ``tol`` only decides
        ``converged``) and return the logits, the last state and the stats of the module docstring."""
        u = self.inject(x)
        previous = z = torch.zeros_like(u)
        for f in self.layer_maps(u):
            previous, z = z, f(z)
        forward_stats = self._forward_stats(previous, z, tol)
        backward_stats: dict[str, Tensor] = {}
        if z.requires_grad:
            record_on_backward(z, backward_stats, path_cost(z.shape[0], z.device, iterations=self.depth,
                                                            grad_evals=self.depth, vjp_calls=self.depth - 1))
        return DEQOutput(logits=self.readout(z), z=z.detach(), forward_stats=forward_stats,
                         backward_stats=backward_stats)

    def _forward_stats(self, previous: Tensor, z: Tensor, tol: float) -> dict[str, Tensor]:
        with torch.no_grad():
            abs_res = torch.linalg.vector_norm((z - previous).flatten(1), dim=1)
            rel_res = abs_res / (torch.linalg.vector_norm(z.flatten(1), dim=1) + _NORM_EPS)
            finite = torch.isfinite(rel_res)
            inf = torch.full_like(rel_res, float("inf"))
            # Layers run with autograd are gradient-path evaluations; only without it are they plain f calls.
            f_calls = 0 if z.requires_grad else self.depth
            return {
                "iterations": torch.full((z.shape[0],), self.depth, dtype=torch.int64, device=z.device),
                "abs_residual": torch.where(finite, abs_res, inf),
                "rel_residual": torch.where(finite, rel_res, inf),
                "converged": finite & (rel_res <= tol),
                "f_calls": torch.tensor(f_calls, dtype=torch.int64, device=z.device),
            }

    def norm_flops(self, *, training: bool = True) -> float:
        """FLOPs of one forward's weight normalisations: one per distinct weight the layers apply (once for an
        unmasked weight-tied cell, ``depth`` times with masks or untied cells)."""
        binds = 1 if self.tied and not self.sparse else self.depth
        return binds * self.cell.norm_flops(training=training)

    def solver_flops(self, solver: str, **options) -> float:
        """0: a fixed-depth model runs no solver."""
        return 0.0

    def _weight_names(self) -> tuple[str, ...]:
        return CONTRACTIONS[self.cell.contraction].parameters


def build_unrolled(cell: str = "conv1d", input_shape: tuple[int, ...] = (40,), num_classes: int = 10, *,
                   tied: bool = True, depth: int = 8, sparse_masks: bool = False, mask_density: float = 0.5,
                   width: int = 32, contraction: str = "spectral", spectral_gain: float = 0.9,
                   monotone_margin: float = 0.5, kernel_size: int = 3, seed: int = 0) -> UnrolledClassifier:
    """A weight-tied (``tied``) or explicit classifier of ``depth`` layers around :func:`build_model`'s parts.

    Parameters are drawn from ``torch.Generator().manual_seed(seed)`` (encoder, head, then the cells in
    layer order, so layer 1 of an explicit model starts as the DEQ's cell), masks as :meth:`draw_masks` says.
    """
    parts = model_parts(cell, input_shape, num_classes, width=width, contraction=contraction,
                        spectral_gain=spectral_gain, monotone_margin=monotone_margin, kernel_size=kernel_size)
    _check_depth(depth)
    untied = [] if tied else [parts.new_cell() for _ in range(depth - 1)]
    model = UnrolledClassifier(*parts.arguments(parts.new_cell()), depth=depth, untied_cells=untied)
    initialise(model, seed)
    if sparse_masks:
        model.draw_masks(mask_density, seed)
    return model


def _check_depth(depth) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")


__all__ = ["UnrolledClassifier", "build_unrolled"]
