"""Compact DEQ classifiers: encoder (input injection) -> fixed point of a DEQ cell -> head.

``build_model(cell="conv1d", input_shape=(40,), num_classes=10)`` returns a :class:`DEQClassifier`. The
solver, budget, tolerance and backward mode are arguments of each call, so one model can run at any budget.

Input layouts: ``mlp`` flattens any input shape; ``conv1d`` takes ``(L,)`` (one channel) or ``(C, L)``;
``conv2d`` takes ``(H, W)`` (one channel), ``(C, H, W)``, or channels-last ``(H, W, C)`` when the last
dimension is at most 4 and the first is larger (e.g. ``(32, 32, 3)``).

Architectures (width w): encoder ``Linear(D, w)`` / ``Conv1d(C, w, 5) + GroupNorm`` /
``Conv2d(C, w, 3, stride 2) + GroupNorm``; cell ``relu(W z + u)`` (see cells.py); head ``Linear(w, K)`` /
``Flatten + Linear(w L, K)`` / ``AdaptiveAvgPool2d(<=4) + Linear(16 w, K)``. With contraction ``lyapunov`` the
head starts (after the pooling, with which it commutes) with LyaDEQ's orthogonal layer, ``Q`` on the channels of
every position (fed_deq/deq/lyapunov.py ``OrthogonalChannels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .backward import attach_gradient, check_backward
from .cells import CELLS, CONTRACTIONS, DEQCell
from .lyapunov import OrthogonalChannels
from .solvers import find_fixed_point, iteration_flops

_POOLED_SIDE = 4


@dataclass
class DEQOutput:
    """What a DEQClassifier call returns.

    ``forward_stats``: the solver's stats (per-sample ``iterations``, residuals, ``converged``) and
    ``f_calls``, the 0-dim count of whole-batch f evaluations the solve ran. ``backward_stats`` (filled when
    ``loss.backward()`` reaches the gradient path): per-sample ``iterations`` (backward iterations, the
    budget unit) and ``grad_evals`` (f evaluations with autograd), and the whole-batch counts ``vjp_calls``
    (vector-Jacobian products with respect to the state) and ``adjoint_f_calls`` (see backward.py).
    """

    logits: Tensor
    z: Tensor                       # detached fixed point, usable as z0 of the next call (warm start)
    forward_stats: dict[str, Tensor]
    backward_stats: dict[str, Tensor] = field(default_factory=dict)   # filled during loss.backward()


class DEQClassifier(nn.Module):
    """Encoder -> DEQ cell solve -> head. Call it as ``model(x, solver=..., max_iter=..., ...)``."""

    def __init__(self, kind: str, input_shape: tuple[int, ...], num_classes: int, cell: DEQCell,
                 encoder: nn.Module, head: nn.Module, channels_last: bool, encoder_flops: int,
                 head_flops: int):
        super().__init__()
        self.kind = kind
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.encoder = encoder
        self.cell = cell
        self.head = head
        self._channels_last = channels_last
        self._overhead_flops = encoder_flops + head_flops

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample's fixed point z."""
        return self.cell.state_shape

    def inject(self, x: Tensor) -> Tensor:
        """Input injection u = encoder(x), shaped like the state z."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input must have shape [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(x.shape)}")
        if self.cell.dense:
            x = x.reshape(x.shape[0], -1)
        elif self._channels_last:
            x = x.movedim(-1, 1)
        elif x.dim() == len(self.cell.spatial) + 1:
            x = x.unsqueeze(1)
        return self.encoder(x)

    def readout(self, z: Tensor) -> Tensor:
        """Logits from a state z."""
        return self.head(z)

    def forward(self, x: Tensor, *, solver: str = "anderson", max_iter: int = 30, tol: float = 1e-3,
                backward: str = "one-step", backward_max_iter: int = 4, z0: Tensor | None = None,
                backward_tol: float | None = None, phantom_damping: float = 1.0,
                solver_options: dict | None = None) -> DEQOutput:
        """Solve for the fixed point under the given budget and attach the chosen gradient path.

        ``solver_options`` go to the forward solver and to the implicit adjoint solver; ``backward_tol``
        (default ``tol``) is the adjoint's tolerance. With autograd enabled the gradient path recomputes the
        solver's last useful step with autograd (same value, see backward.py); with autograd disabled
        (evaluation) no f evaluation beyond the budget is spent.
        """
        check_backward(backward, backward_max_iter, phantom_damping)
        options = dict(solver_options or {})
        u = self.inject(x)
        f = self.cell.bind(u)
        start = self._start(z0, u)
        found = find_fixed_point(f, start, solver=solver, max_iter=max_iter, tol=tol, **options)
        backward_stats: dict[str, Tensor] = {}
        z = found.z
        if torch.is_grad_enabled():
            z = attach_gradient(f, found.z_eval, mode=backward, backward_max_iter=backward_max_iter, solver=solver,
                                tol=tol if backward_tol is None else backward_tol, solver_options=options,
                                damping=phantom_damping, stats=backward_stats)
        return DEQOutput(logits=self.readout(z), z=found.z.detach(), forward_stats=found.stats,
                         backward_stats=backward_stats)

    def _start(self, z0: Tensor | None, u: Tensor) -> Tensor:
        if z0 is None:
            return torch.zeros_like(u, requires_grad=False)
        if tuple(z0.shape) != tuple(u.shape):
            raise ValueError(f"z0 must have shape {list(u.shape)} (batch + state shape), got {list(z0.shape)}")
        return z0.detach().to(dtype=u.dtype, device=u.device)

    def cell_flops(self) -> int:
        """FLOPs (2 x multiply-adds of linear/conv layers) of one f(z, x) evaluation, per sample."""
        return self.cell.flops()

    def overhead_flops(self) -> int:
        """FLOPs of the encoder and the head (forward), per sample."""
        return self._overhead_flops

    def norm_flops(self, *, training: bool = True) -> float:
        """FLOPs of one call of the cell's weight normalisation (once per forward, shared by the batch),
        including its backward when ``training``; see :meth:`DEQCell.norm_flops`."""
        return self.cell.norm_flops(training=training)

    def solver_flops(self, solver: str, **options) -> float:
        """Per-sample FLOPs a solver spends per iteration besides f on this model's state (upper bound);
        see :func:`fed_deq.deq.solvers.iteration_flops`."""
        return iteration_flops(solver, math.prod(self.state_shape), **options)


def build_model(cell: str = "conv1d", input_shape: tuple[int, ...] = (40,), num_classes: int = 10, *,
                width: int = 32, contraction: str = "spectral", spectral_gain: float = 0.9,
                monotone_margin: float = 0.5, kernel_size: int = 3, seed: int = 0) -> DEQClassifier:
    """Build a DEQ classifier; parameters are drawn from ``torch.Generator().manual_seed(seed)``.

    Defaults stay under 100k parameters for the shapes used here (digits 64, MNIST-1D 40, 28x28x1,
    32x32x3). Raises ValueError for an unknown cell or contraction, or a shape the cell cannot take.
    """
    parts = model_parts(cell, input_shape, num_classes, width=width, contraction=contraction,
                        spectral_gain=spectral_gain, monotone_margin=monotone_margin, kernel_size=kernel_size)
    return initialise(DEQClassifier(*parts.arguments(parts.new_cell())), seed)


@dataclass
class ModelParts:
    """Encoder, head and a cell factory on the meta device: what every model kind is assembled from."""

    cell: str
    input_shape: tuple[int, ...]
    num_classes: int
    encoder: nn.Module
    head: nn.Module
    channels_last: bool
    encoder_flops: int
    head_flops: int
    new_cell: Callable[[], DEQCell]

    def arguments(self, cell: DEQCell) -> tuple:
        """The positional arguments of :class:`DEQClassifier` (and its subclasses) around ``cell``."""
        return (self.cell, self.input_shape, self.num_classes, cell, self.encoder, self.head, self.channels_last,
                self.encoder_flops, self.head_flops)


def model_parts(cell: str, input_shape: tuple[int, ...], num_classes: int, *, width: int, contraction: str,
                spectral_gain: float, monotone_margin: float, kernel_size: int) -> ModelParts:
    """Check the arguments and build the encoder and head (meta device) and a factory of cells for them."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; valid cells: {list(CELLS)}")
    input_shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    channels, spatial, channels_last = _layout(cell, input_shape)
    # Build on the meta device, then draw every parameter from our own generator: no global RNG is touched.
    meta = torch.device("meta")

    def new_cell() -> DEQCell:
        return DEQCell(cell, width, _state_spatial(cell, spatial), contraction=contraction,
                       spectral_gain=spectral_gain, monotone_margin=monotone_margin, kernel_size=kernel_size,
                       device=meta)

    state_spatial = new_cell().spatial  # also checks the cell's arguments before anything else is built
    encoder, encoder_flops = _encoder(cell, channels, spatial, width, meta)
    head, head_flops = _head(cell, state_spatial, width, num_classes, meta,
                             orthogonal=CONTRACTIONS[contraction].orthogonal_readout)
    return ModelParts(cell, input_shape, num_classes, encoder, head, channels_last, encoder_flops, head_flops,
                      new_cell)


def initialise(model: DEQClassifier, seed: int) -> DEQClassifier:
    """Materialise a model assembled on the meta device and draw its parameters from ``seed``."""
    model.to_empty(device="cpu")
    _initialise(model, torch.Generator().manual_seed(int(seed)))
    return model


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of positive integers, got {input_shape!r}") from None
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"input_shape must be a tuple of positive integers, got {input_shape!r}")
    return shape


# The architecture around a cell follows its operator's spatial rank (CELLS[cell].spatial_dims): 0 a dense
# vector state, 1 a sequence, 2 an image.
_SHAPES_TAKEN = {1: "(L,) or (C, L)", 2: "(H, W), (C, H, W) or (H, W, C)"}


def _rank(cell: str) -> int:
    return CELLS[cell].spatial_dims


def _layout(cell: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], bool]:
    """(channels, spatial shape, channels_last) of an input shape for a cell kind."""
    rank = _rank(cell)
    if rank == 0:
        return math.prod(shape), (), False
    if len(shape) == rank:
        return 1, shape, False
    if len(shape) == rank + 1:
        # Images may come channels-last, (H, W, C): a last dimension of at most 4 after a larger first one.
        if rank == 2 and shape[-1] <= 4 < shape[0]:
            return shape[-1], shape[:2], True
        return shape[0], shape[1:], False
    raise ValueError(f"cell {cell!r} takes input_shape {_SHAPES_TAKEN[rank]}, got {shape}")


def _state_spatial(cell: str, spatial: tuple[int, ...]) -> tuple[int, ...]:
    # Images are downsampled by 2 in the encoder: a 14x14 state costs a quarter of a 28x28 one per iteration.
    if _rank(cell) == 2:
        return tuple((n + 1) // 2 for n in spatial)
    return spatial


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


def _encoder(cell: str, channels: int, spatial: tuple[int, ...], width: int, device) -> tuple[nn.Module, int]:
    rank = _rank(cell)
    if rank == 0:
        return nn.Linear(channels, width, device=device), 2 * channels * width
    if rank == 1:
        conv = nn.Conv1d(channels, width, 5, padding=2, device=device)
        flops = 2 * channels * width * 5 * spatial[0]
    else:
        conv = nn.Conv2d(channels, width, 3, stride=2, padding=1, device=device)
        flops = 2 * channels * width * 9 * math.prod(_state_spatial(cell, spatial))
    return nn.Sequential(conv, nn.GroupNorm(_groups(width), width, device=device)), flops


def _head(cell: str, state_spatial: tuple[int, ...], width: int, num_classes: int, device, *,
          orthogonal: bool = False) -> tuple[nn.Module, int]:
    rank = _rank(cell)
    if rank == 0:
        features, pool = width, []
    elif rank == 1:
        features, pool = width * state_spatial[0], []
    else:
        side = tuple(min(_POOLED_SIDE, n) for n in state_spatial)
        features, pool = width * math.prod(side), [nn.AdaptiveAvgPool2d(side)]
    flops = 2 * features * num_classes
    mixing = []
    if orthogonal:
        # Channel mixing commutes with average pooling, so Q runs on the pooled grid: same map, fewer FLOPs.
        mixing = [OrthogonalChannels(width, rank, device=device)]
        flops += mixing[0].flops(features // width)
    layers = [*pool, *mixing, nn.Flatten(), nn.Linear(features, num_classes, device=device)]
    return nn.Sequential(*layers), flops


def _initialise(model: DEQClassifier, generator: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from ``generator``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, OrthogonalChannels):
                module.reset_parameters()   # the identity; draws nothing, so the other draws do not move
        # Cells last, in layer order: the DEQ's cell draws what it always drew, and so does an unroll's first cell.
        for cell in [module for module in model.modules() if isinstance(module, DEQCell)]:
            cell.reset_parameters(generator)


__all__ = ["DEQClassifier", "DEQOutput", "ModelParts", "build_model", "initialise", "model_parts"]
