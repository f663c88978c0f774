"""Equilibrium cells f(z, u) = relu(W z + u) with selectable contraction control.

``u`` is the input injection (computed once per forward by the encoder), ``W`` the recurrent linear operator:
a ``width x width`` matrix (``mlp``), a same-padded 1-D convolution (``conv1d``) or 2-D convolution
(``conv2d``). ``relu`` is 1-Lipschitz, so the Lipschitz constant of ``z -> f(z, u)`` is at most ||W||.

Contraction control (the stored parameters are always plain tensors that can be averaged across clients):

- ``"none"``: ``W`` is the ``weight`` parameter as is; nothing guarantees a fixed point.
- ``"spectral"``: ``W = weight * min(1, gain / ||weight||)`` where ``||weight||`` is the exact operator norm,
  recomputed functionally on every forward (no power-iteration buffers). For a matrix it is the largest
  singular value (``torch.linalg.matrix_norm(ord=2)``). For a zero-padded convolution it is the norm of the
  circular convolution on a grid extended by ``kernel // 2`` (computed per frequency with an FFT of the
  kernel), which bounds the zero-padded operator from above. So ``f`` is a contraction with factor <= gain.
- ``"monotone"``: the monDEQ parametrisation ``W = (1 - m) I - A^T A + B - B^T`` (``A^T`` the exact adjoint:
  the transposed matrix, or the transposed convolution), for every cell kind. ``I - W`` is then strongly
  monotone with margin ``m``, and the cell is the forward-backward splitting step
  ``f(z) = relu(z - alpha ((I - W) z - u))`` with ``alpha = m / L^2``, ``L >= ||I - W||``. Its fixed points
  are exactly monDEQ's ``z = relu(W z + u)``, and it is a contraction with factor ``sqrt(1 - m^2 / L^2)``.
  ``L`` is exact for ``mlp`` and the bound ``m + ||A||^2 + ||B - B^T||`` for convolutions.
- ``"lyapunov"``: LyaDEQ (Chu et al.) on the spectral cell ``h(z) = relu(W z + u)``, ``||W|| <= gain``: Manek &
  Kolter's stability projection of ``F(z) = h(z) - z`` for a learned ``V(z) = Ṽ(F(z))`` (``Ṽ`` a positive-definite
  input-convex network, parameters in the ``stability`` submodule), ``f(z) = z + F̂(z)``, so that
  ``∇V(z)ᵀ (f(z) - z) <= -α V(z)``; the fixed points are those of ``h``. The model's head then starts with an
  orthogonal layer. See fed_deq/deq/lyapunov.py for what is followed, what is simplified and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flops import eigh_flops, fft_flops, matmul_flops, svd_flops
from .lyapunov import LyapunovFunction, cayley_flops, stable_map

_INIT_NORM = 0.5        # operator norm of the recurrent weight at initialisation
_MONOTONE_INIT_NORM = 0.3


@dataclass(frozen=True)
class CellKind:
    """What a cell kind's recurrent operator W is: a dense matrix (no ``conv``) or a same-padded convolution
    over ``spatial_dims`` dimensions (``conv``/``conv_transpose`` are torch's functional ops)."""

    spatial_dims: int
    conv: Callable[..., Tensor] | None = None
    conv_transpose: Callable[..., Tensor] | None = None


#: Cell kind → its operator. The scenario's ``model.cell`` is checked against these names.
CELLS: Mapping[str, CellKind] = MappingProxyType({
    "mlp": CellKind(spatial_dims=0),
    "conv1d": CellKind(spatial_dims=1, conv=F.conv1d, conv_transpose=F.conv_transpose1d),
    "conv2d": CellKind(spatial_dims=2, conv=F.conv2d, conv_transpose=F.conv_transpose2d),
})


class DEQCell(nn.Module):
    """The recurrent part of a DEQ: ``bind(u)`` returns ``f(z) = f(z, u)`` with weights prepared once."""

    def __init__(self, kind: str, width: int, spatial: tuple[int, ...], *, contraction: str = "spectral",
                 spectral_gain: float = 0.9, monotone_margin: float = 0.5, kernel_size: int = 3,
                 device=None):
        super().__init__()
        _check_cell_args(kind, width, spatial, contraction, spectral_gain, monotone_margin, kernel_size)
        self.kind = kind
        self.width = width
        self.spatial = tuple(spatial)
        self.contraction = contraction
        self.spectral_gain = float(spectral_gain)
        self.monotone_margin = float(monotone_margin)
        self.kernel_size = kernel_size if not self.dense else 1
        for name in self._control.parameters:
            setattr(self, name, nn.Parameter(torch.empty(self.weight_shape, device=device)))
        if self._control.stability_module:
            # Registered after the recurrent weights: state-dict order and drawing order stay "weights first".
            self.stability = LyapunovFunction(width, device=device)

    # The registry entries are looked up by name rather than stored, so a cell pickles like any nn.Module.
    @property
    def _op(self) -> CellKind:
        return CELLS[self.kind]

    @property
    def _control(self) -> Contraction:
        return CONTRACTIONS[self.contraction]

    @property
    def dense(self) -> bool:
        """True when W is a matrix (``mlp``), False for a convolution."""
        return self._op.conv is None

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample's state z (without the batch dimension)."""
        return (self.width, *self.spatial)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw the recurrent weights from ``generator``, scaled to a moderate operator norm, then (``lyapunov``)
        the stability module's parameters."""
        with torch.no_grad():
            target = self._control.init_norm
            for name in self._control.parameters:
                param = getattr(self, name)
                nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
                param.mul_(target / float(self.operator_norm(param)))
        if self._control.stability_module:
            self.stability.reset_parameters(generator)

    def operator_norm(self, weight: Tensor) -> Tensor:
        """Operator norm (or, for convolutions, an upper bound of it) of ``z -> weight * z``."""
        if self.dense:
            return torch.linalg.matrix_norm(weight, ord=2)
        return conv_operator_norm(weight, self.spatial)

    def bind(self, u: Tensor, masks: Mapping[str, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
        """Return ``f(z) = f(z, u)``; the effective weights are computed here once, with autograd.

        ``masks`` (name of each stored weight -> a 0/1 tensor of its shape) multiply the weights before the
        contraction control sees them: a sparse layer of a weight-tied unroll (fed_deq/deq/unrolled.py).
        """
        weights = {name: getattr(self, name) for name in self._control.parameters}
        if masks is not None:
            weights = {name: weight * masks[name] for name, weight in weights.items()}
        return self._control.bind(self, u, weights)

    def relu_affine(self, weight: Tensor, u: Tensor) -> Callable[[Tensor], Tensor]:
        """``f(z) = relu(W z + u)`` with ``W`` this cell's operator built from ``weight``."""
        linear = self._linear(weight)
        return lambda z: F.relu(linear(z) + u)

    def bind_monotone(self, u: Tensor, weights: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
        """The monDEQ forward-backward splitting step (see the module docstring) with ``weights`` A and B."""
        m = self.monotone_margin
        a, b = weights["A"], weights["B"]
        if self.dense:
            eye = torch.eye(self.width, dtype=a.dtype, device=a.device)
            i_minus_w = m * eye + a.T @ a - b + b.T
            # The step size only sets the speed of the splitting, not its fixed points: keep it out of autograd.
            alpha = m / float(torch.linalg.matrix_norm(i_minus_w.detach(), ord=2)) ** 2
            step = eye - alpha * i_minus_w
            return lambda z: F.relu(z @ step.T + alpha * u)
        skew = b - _adjoint_kernel(b)
        with torch.no_grad():
            bound = m + float(self.operator_norm(a)) ** 2 + float(self.operator_norm(skew))
        alpha = m / bound ** 2
        # f(z) = relu((1 - alpha m) z + alpha (B - B^T) z - alpha A^T A z + alpha u), folded into two kernels.
        direct = alpha * skew + (1.0 - alpha * m) * _identity_kernel(b)
        a_scaled = math.sqrt(alpha) * a
        conv, conv_t = self._conv_pair()
        return lambda z: F.relu(conv(z, direct) - conv_t(conv(z, a_scaled), a_scaled) + alpha * u)

    def bind_lyapunov(self, u: Tensor, weights: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
        """The Lyapunov-stable map ``f(z) = z + F̂(z)`` (module docstring, fed_deq/deq/lyapunov.py) around the
        spectral cell ``h(z) = relu(W z + u)``; the normalisation, ``q(0)`` and the ICNN's nonnegative weights
        are computed here once."""
        weight = weights["weight"]
        scale = torch.clamp(self.spectral_gain / self.operator_norm(weight), max=1.0)
        linear = self._linear(weight * scale)
        return stable_map(lambda z: F.relu(linear(z) + u) - z, self.stability.bind(), self.stability.rate)

    def _linear(self, weight: Tensor) -> Callable[[Tensor], Tensor]:
        if self.dense:
            return lambda z: z @ weight.T
        conv, _ = self._conv_pair()
        return lambda z: conv(z, weight)

    def _conv_pair(self):
        pad = self.kernel_size // 2
        conv, conv_t = self._op.conv, self._op.conv_transpose
        return (lambda z, w: conv(z, w, padding=pad)), (lambda z, w: conv_t(z, w, padding=pad))

    def flops(self) -> int:
        """FLOPs (2 x multiply-adds) of one f(z, u) evaluation for one sample.

        ``one = 2 w² k^d P`` (a product with W; k taps per spatial dimension, P positions) times the W products
        per evaluation: 1, except 3 for a monotone convolution (direct, A, Aᵀ; the mlp one folds into one) and
        2 for ``lyapunov`` (``W z`` and the transposed product of ``∇V``); ``lyapunov`` adds the ICNN on every
        position, forward and input-gradient backward: ``2 P · 2 (2 w H + H² + w + H)``, H = ⌈w/2⌉.
        """
        positions = math.prod(self.spatial) if self.spatial else 1
        taps = self.kernel_size ** len(self.spatial)
        one = 2 * self.width * self.width * taps * positions
        control = self._control
        flops = (control.dense_evals if self.dense else control.conv_evals) * one
        if control.stability_module:
            flops += 2 * positions * self.stability.row_flops()
        return flops

    def norm_flops(self, *, training: bool = True) -> float:
        """FLOPs of one call of the weight normalisation that :meth:`bind` runs (once per model forward).

        Per call, not per sample: the whole batch shares it. With ``training`` (autograd on) it includes the
        backward of the part that autograd records; without, what an evaluation call computes. Estimates of
        fed_deq/deq/flops.py (real multiply-add = 2 FLOPs, complex = 8; FFT 5 n log2 n, rfft half of it;
        Golub-Van Loan counts for eigvalsh and SVD, x4 for complex); elementwise work is not charged.

        - ``none``: 0.
        - ``spectral``, mlp: ``matrix_norm(W, ord=2)``: SVD of the w x w weight, with U and V under autograd
          (14 w^3 + 8 w^3), values only otherwise; backward ``U diag(g) V^H`` (2 w^3).
        - ``spectral``, convolutions (:func:`conv_operator_norm` on the grid extended by ``k // 2``, N points,
          F = rfft frequencies): rfft of the out x in kernels (out*in * 2.5 N log2 N); Gram matrices
          ``M^H M`` (F complex in x out x in products); eigvalsh of them (F x 4/3 in^3, x4 complex); the SVD
          of the worst frequency's out x in matrix (with U, V under autograd); backward: ``U diag(g) V^H``
          (one complex out x q x in product) and the rfft's backward, a full complex FFT per kernel
          (out*in * 5 N log2 N).
        - ``monotone``, mlp: ``A^T A`` (2 w^3), the SVD values of ``I - W`` (no autograd), backward of ``A^T A``
          (2 x 2 w^3).
        - ``monotone``, convolutions: two operator norms without autograd (of ``A`` and ``B - B^T``): rfft,
          Gram matrices, eigvalsh and the singular values of one frequency each; nothing in backward.
        - ``lyapunov``: the ``spectral`` normalisation of W; ``q(0)`` of the ICNN (two matrix-vector products,
          x3 with backward); and the Cayley transform of the head's orthogonal layer (an LU solve with w
          right-hand sides; backward: a solve with the stored LU and one w x w product). The Cayley transform runs
          in the head, once per forward like the normalisation; it is charged here so that every model kind
          charges it (a fixed-depth model that binds several times charges it per bind, a small over-count).
        """
        return self._control.norm_flops(self, training)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of each recurrent weight tensor."""
        return _weight_shape(self._op, self.width, self.kernel_size)


def conv_operator_norm(weight: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Upper bound of the operator norm of the same-padded convolution with ``weight`` on a ``spatial`` grid.

    Exact norm of the circular convolution on the grid extended by ``kernel // 2`` per dimension (which
    contains the zero-padded operator as a compression): the largest singular value over frequencies of
    the kernel's Fourier transform. Differentiable: the worst frequency is found without autograd (one
    batched Hermitian eigensolve), then its norm is recomputed with autograd, which is the gradient of the
    maximum and avoids a batched SVD backward (10-60 ms per call for the cells here).
    """
    matrices = _frequency_matrices(weight, spatial)
    with torch.no_grad():
        gram = matrices.mH @ matrices
        worst = int(torch.linalg.eigvalsh(gram)[:, -1].argmax())
    return torch.linalg.matrix_norm(matrices[worst], ord=2)


def conv_norm_flops(weight_shape: tuple[int, ...], spatial: tuple[int, ...], *, with_grad: bool) -> float:
    """FLOPs of one :func:`conv_operator_norm` call (and, ``with_grad``, of its backward); see
    :meth:`DEQCell.norm_flops`."""
    out_ch, in_ch, *kernel = weight_shape
    sizes = [n + k // 2 for n, k in zip(spatial, kernel)]
    points = math.prod(sizes)
    freqs = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
    signals = out_ch * in_ch
    flops = fft_flops(points, kind="r2c", signals=signals)
    flops += matmul_flops(in_ch, out_ch, in_ch, is_complex=True, batch=freqs)
    flops += eigh_flops(in_ch, is_complex=True, batch=freqs)
    flops += svd_flops(out_ch, in_ch, is_complex=True, vectors=with_grad)
    if with_grad:
        flops += matmul_flops(out_ch, min(out_ch, in_ch), in_ch, is_complex=True)
        flops += fft_flops(points, kind="c2c", signals=signals)
    return flops


def _frequency_matrices(weight: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """[frequencies, out, in] transfer matrices of the circular convolution on the extended grid."""
    sizes = [n + k // 2 for n, k in zip(spatial, weight.shape[2:])]
    if len(spatial) == 1:
        spectrum = torch.fft.rfft(weight, n=sizes[0], dim=-1)
    else:
        spectrum = torch.fft.rfft2(weight, s=sizes, dim=(-2, -1))
    out_ch, in_ch = weight.shape[:2]
    return spectrum.reshape(out_ch, in_ch, -1).permute(2, 0, 1)


def _adjoint_kernel(weight: Tensor) -> Tensor:
    """Kernel of the adjoint of a same-padded, odd-sized convolution: transposed channels, flipped taps."""
    spatial_dims = tuple(range(2, weight.dim()))
    return weight.transpose(0, 1).flip(spatial_dims)


def _identity_kernel(like: Tensor) -> Tensor:
    """Convolution kernel of the identity operator, shaped like ``like``."""
    kernel = torch.zeros_like(like)
    centre = tuple(k // 2 for k in like.shape[2:])
    idx = torch.arange(like.shape[0], device=like.device)
    kernel[(idx, idx, *centre)] = 1.0
    return kernel


def _weight_shape(op: CellKind, width: int, kernel_size: int) -> tuple[int, ...]:
    return (width, width, *(kernel_size,) * op.spatial_dims)


def _check_cell_args(kind, width, spatial, contraction, spectral_gain, monotone_margin, kernel_size) -> None:
    if kind not in CELLS:
        raise ValueError(f"unknown cell {kind!r}; valid cells: {list(CELLS)}")
    if contraction not in CONTRACTIONS:
        raise ValueError(f"unknown contraction {contraction!r}; valid contractions: {list(CONTRACTIONS)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    expected = CELLS[kind].spatial_dims
    if len(spatial) != expected:
        raise ValueError(f"cell {kind!r} needs {expected} spatial dimension(s), got {tuple(spatial)}")
    CONTRACTIONS[contraction].check(spectral_gain, monotone_margin)
    if expected and (isinstance(kernel_size, bool) or not isinstance(kernel_size, int)
                     or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")


# --------------------------------------------------------------------------------------------------------
# Contraction control: one entry per way of keeping f a contraction.


@dataclass(frozen=True)
class Contraction:
    """A contraction control: the weights it stores, how it binds ``f``, what its normalisation costs."""

    parameters: tuple[str, ...]                         # recurrent weights of the cell, in registration order
    init_norm: float                                    # operator norm of each at initialisation
    bind: Callable[[DEQCell, Tensor, Mapping[str, Tensor]], Callable[[Tensor], Tensor]]   # (cell, u, weights)
    norm_flops: Callable[[DEQCell, bool], float]        # (cell, training) -> FLOPs per bind
    check: Callable[[float, float], None]               # (spectral_gain, monotone_margin) -> raise if bad
    conv_evals: int = 1                                 # convolutions per f evaluation (convolution cells)
    dense_evals: int = 1                                # matrix products with W per f evaluation (mlp cells)
    stability_module: bool = False                      # the cell owns a Lyapunov function (``cell.stability``)
    orthogonal_readout: bool = False                    # the model's head starts with an orthogonal layer


def _bind_plain(cell: DEQCell, u: Tensor, weights: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    return cell.relu_affine(weights["weight"], u)


def _bind_spectral(cell: DEQCell, u: Tensor, weights: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    weight = weights["weight"]
    scale = torch.clamp(cell.spectral_gain / cell.operator_norm(weight), max=1.0)
    return cell.relu_affine(weight * scale, u)


def _spectral_norm_flops(cell: DEQCell, training: bool) -> float:
    w = cell.width
    if cell.dense:
        svd = svd_flops(w, w, vectors=training)
        return svd + (matmul_flops(w, w, w) if training else 0.0)
    return conv_norm_flops(cell.weight_shape, cell.spatial, with_grad=training)


def _monotone_norm_flops(cell: DEQCell, training: bool) -> float:
    w = cell.width
    if cell.dense:
        gram = matmul_flops(w, w, w)
        return gram + svd_flops(w, w, vectors=False) + (2 * matmul_flops(w, w, w) if training else 0.0)
    return 2 * conv_norm_flops(cell.weight_shape, cell.spatial, with_grad=False)


def _lyapunov_norm_flops(cell: DEQCell, training: bool) -> float:
    return (_spectral_norm_flops(cell, training) + cell.stability.bind_flops(training=training)
            + cayley_flops(cell.width, training=training))


def _no_norm_flops(cell: DEQCell, training: bool) -> float:
    return 0.0


def _check_nothing(spectral_gain, monotone_margin) -> None:
    return None


def _check_gain(spectral_gain, monotone_margin) -> None:
    if not (isinstance(spectral_gain, (int, float)) and 0 < spectral_gain < 1):
        raise ValueError(f"spectral_gain must be in (0, 1) for contraction 'spectral', got {spectral_gain!r}")


def _check_lyapunov(spectral_gain, monotone_margin) -> None:
    # The base cell must be a contraction: its unique fixed point is where V is positive definite about.
    if not (isinstance(spectral_gain, (int, float)) and 0 < spectral_gain < 1):
        raise ValueError(f"spectral_gain must be in (0, 1) for contraction 'lyapunov' (it bounds ||W|| of the "
                         f"cell the stability module projects), got {spectral_gain!r}")


def _check_margin(spectral_gain, monotone_margin) -> None:
    if not (isinstance(monotone_margin, (int, float)) and 0 < monotone_margin <= 1):
        raise ValueError(f"monotone_margin must be in (0, 1], got {monotone_margin!r}")


#: Contraction name → how it works. The scenario's ``model.contraction`` is checked against these names.
CONTRACTIONS: Mapping[str, Contraction] = MappingProxyType({
    "none": Contraction(("weight",), _INIT_NORM, _bind_plain, _no_norm_flops, _check_nothing),
    "spectral": Contraction(("weight",), _INIT_NORM, _bind_spectral, _spectral_norm_flops, _check_gain),
    "monotone": Contraction(("A", "B"), _MONOTONE_INIT_NORM, DEQCell.bind_monotone, _monotone_norm_flops,
                            _check_margin, conv_evals=3),
    "lyapunov": Contraction(("weight",), _INIT_NORM, DEQCell.bind_lyapunov, _lyapunov_norm_flops, _check_lyapunov,
                            conv_evals=2, dense_evals=2, stability_module=True, orthogonal_readout=True),
})
