"""The ``lyapunov`` contraction: a Lyapunov stability module on the DEQ cell and an orthogonal readout layer.

What this follows. Chu, Wei, Liu, Zhao (and Miyatake), "Learning Robust Deep Equilibrium Models" (arXiv
2304.12707; AAAI 2024 as "Lyapunov-Stable Deep Equilibrium Models", pp. 11615-11623), "LyaDEQ": treat the DEQ
as the dynamical system ``dz/dt = f(z, x) - z``, make its fixed points Lyapunov-stable with a stability module
built on Manek & Kolter, "Learning Stable Deep Dynamics Models" (NeurIPS 2019), and add an orthogonal fully
connected layer after the stability module so that fixed points of different classes stay apart. Only the
paper's abstract was available to us (the stored copies of its method section could not be read), so the
module below is Manek & Kolter's construction as published in their code (locuslab/stable_dynamics,
``models/stabledynamics.py``: ``Dynamics``, ``ICNN``, ``ReHU``, ``MakePSD``), applied to the DEQ dynamics as
the abstract describes; the orthogonal layer follows SODEF (Kang et al., NeurIPS 2021, kangqiyu/SODEF
``ORTHFC``), which the LyaDEQ abstract's "orthogonal fully connected layer" echoes.

The projection (Manek & Kolter). For dynamics ``dz/dt = F(z)`` and a positive-definite ``V``,

    F̂(z) = F(z) - g · ReLU(gᵀF(z) + α V(z)) / ‖g‖²,   g = ∇V(z),

satisfies ``gᵀF̂(z) = min(gᵀF(z), -α V(z)) <= -α V(z)`` exactly, whatever g is: along ``dz/dt = F̂(z)``,
``V(z(t)) <= e^{-αt} V(z(0))``. Here ``F(z) = h(z) - z`` with ``h(z) = relu(W z + u)`` the spectrally normalised
cell (``||W|| <= spectral_gain < 1``), and the bound map is ``f̂(z) = z + F̂(z)``, so the solver's fixed-point
dynamics ``dz/dt = f̂(z) - z`` are exactly the projected ones, and the guarantee the tests check is

    ∇V(z)ᵀ (f̂(z) - z) <= -α V(z)      for every state z and injection u.

Where we depart from "V on the state" and why. A ``V`` on the raw state with its minimum at ``z = 0`` makes
every fixed point ``z = 0``: at a fixed point ``f̂(z) = z`` the left side is 0, so ``V(z) <= 0``, so ``z = 0``,
for every input, and the classifier would be constant. The minimum of ``V`` must sit at the input-dependent
fixed point, which is not known in closed form. So ``V`` measures the residual, as in Krasovskii's method
(``V = Fᵀ P F`` for ``dz/dt = F(z)``; Khalil, *Nonlinear Systems*, ch. 4), with Manek & Kolter's learned
convex potential in place of the quadratic form:

    V(z) = Ṽ(F(z)),   Ṽ(r) = Σ_p [ ReHU(q(r_p) - q(0)) ] + ε ‖r‖²,

``q`` an input-convex network (ICNN, Amos et al. 2017) on the ``w`` channels of each position ``p`` of the
residual (the whole vector for ``mlp``), ReHU the rectified Huber unit. ``Ṽ`` is convex, ``Ṽ(0) = 0`` and
``Ṽ(r) >= ε‖r‖² > 0`` for ``r != 0`` (Manek & Kolter's ``MakePSD``). Because ``h`` is a contraction it has one
fixed point ``z*(u)``, and ``F(z) = 0`` only there, so ``V`` is positive definite about ``z*``: ``V(z*) = 0``,
``V > 0`` elsewhere. The projected dynamics keep exactly the fixed points of ``h`` (``F̂(z) = 0`` forces
``V(z) = 0``, i.e. ``F(z) = 0``), and make ``z*`` exponentially stable in ``V`` at rate α; the module changes
the path to the fixed point (what a finite solver budget returns), never the fixed point itself. So the
implicit gradient at a converged fixed point gives the ICNN no gradient (the fixed point does not depend on
it); it learns through the iterates a finite budget returns (one-step and phantom gradients there).
``∇V(z) = J_F(z)ᵀ ∇Ṽ(F(z))`` is computed by autograd (``torch.func.grad`` of ``z -> Σ V``): one extra
transposed W product and the ICNN's backward per f evaluation. With ``||W|| < 1``, ``J_F = J_h - I`` is
invertible, so ``∇V = 0`` only at ``z*``, where the correction is 0.

The rate α = :data:`LYAPUNOV_RATE` = 1 (Manek & Kolter's default 0.01 belongs to their systems' time scale).
The solver's plain step ``z <- f̂(z) = z + F̂(z)`` is a forward-Euler step of length 1 of these dynamics, and
forward Euler follows ``dV/dt = -α V`` without overshooting (``V <- (1 - α) V``) only for α <= 1: α = 1 is the
fastest decay a plain fixed-point step can track. The projection acts only where the cell's own dynamics decay
``V`` more slowly than α; elsewhere ``f̂ = h`` and the ICNN receives no gradient (the ReLU is inactive), as in
Manek & Kolter. At initialisation it is almost never active (measured ``∇VᵀF / V`` of about -2); the rate is an
attribute of the module (``LyapunovFunction.rate``), not a scenario key, so tests can raise it on one model.

Other simplifications, all documented constants here:
ε = :data:`QUADRATIC_WEIGHT` (their ``projfn_eps`` default); a two-hidden-layer ICNN (their ``[d, h, h, 1]``)
of hidden width ⌈w/2⌉, 1x1 over channels for convolution cells (a sum of per-position convex potentials is
convex; the residual itself already couples positions); ReHU of width d = 1 both inside the ICNN and outside
(their ``PSD-REHU`` variant, whose inner default is d = 0.01, close to a ReLU; the wider unit keeps ``∇V``,
hence f, smoother for the solver); ``q(0)``
is recomputed from the current parameters at every bind, where their ``MakePSD`` stores it once at
construction. Nothing learned is a buffer: the ICNN's nonnegative weights are ``softplus`` of free
parameters, as in their code.

The orthogonal layer. :class:`OrthogonalChannels` applies ``Q = (I - S)^{-1} (I + S)`` (Cayley transform of
``S = A - Aᵀ``, ``A`` a free w x w parameter), so ``QᵀQ = I`` for any parameter value, averaged, quantised or
not. It mixes the channels of every position of the fixed point before the head: block-diagonal with the same
orthogonal block, so an orthogonal map of the whole state that keeps the distances between fixed points
exactly. SODEF's ``ORTHFC`` is a rectangular layer kept orthogonal by geotorch that produces the logits; how
LyaDEQ shapes its layer we could not read. Ours is square, parametrised by a plain tensor (no parametrisation
object, so no state-dict key is renamed and ``load_state_dict(strict=True)`` round-trips), and followed by the
model's usual head. ``A = 0`` at initialisation (``Q = I``).

Cost (fed_deq/deq/cells.py ``flops``/``norm_flops``): per f evaluation two W products (``W z`` and the
transposed product inside ``∇V``) and the ICNN forward and input-gradient backward on every position; per
forward the spectral normalisation, ``q(0)`` and the Cayley transform; per sample the orthogonal layer in the
head (``overhead_flops``). The clock charges a recomputed f in training as forward plus one weight-gradient
product (2c); backpropagating through the projected map costs a little more (its inner products also pass
gradients to their inputs): one training step of the default conv1d model was charged 0.94 (one-step), 0.97
(phantom) and 0.94 (implicit) of what ``FlopCounterMode`` counted.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flops import lu_solve_flops, matmul_flops

#: α: the certified decay rate of V along dz/dt = f̂(z) - z (module docstring).
LYAPUNOV_RATE = 1.0
#: ε: weight of the quadratic term that makes Ṽ positive definite (Manek & Kolter's ``projfn_eps``).
QUADRATIC_WEIGHT = 0.01
#: d: width of the quadratic part of the rectified Huber unit (inside the ICNN and outside it).
REHU_WIDTH = 1.0

# Parameter names of the ICNN, in registration (and drawing) order. None contains "_u"/"_v"/"orig": the state
# dict must not look like a parametrisation's (tests/test_deq_models.py).
_INPUTS = ("input0", "input1", "input2")      # r -> each layer (any sign)
_HIDDEN = ("hidden1", "hidden2")              # previous layer -> next (softplus: nonnegative)
_BIASES = ("bias0", "bias1")                  # the output's bias would cancel in q(r) - q(0): there is none


def hidden_width(width: int) -> int:
    """Hidden width of the Lyapunov ICNN for a cell of ``width`` channels: ⌈width / 2⌉."""
    return max(1, (width + 1) // 2)


def rehu(x: Tensor, d: float = REHU_WIDTH) -> Tensor:
    """Rectified Huber unit (Manek & Kolter): 0 for x <= 0, x²/(2d) on [0, d], x - d/2 above; convex,
    nondecreasing and continuously differentiable."""
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x < d, x * x / (2 * d), x - d / 2))


class LyapunovFunction(nn.Module):
    """The learned convex potential Ṽ(r) of the module docstring, on residuals shaped like the cell state.

    Parameters (plain tensors, averaged like any other): ``input0/1`` [H, w], ``input2`` [1, w] (the residual
    into each layer), ``hidden1`` [H, H], ``hidden2`` [1, H] (softplus'd: nonnegative), ``bias0/1`` [H]. The
    output layer has no bias: it would cancel in ``q(r) - q(0)`` and never receive a gradient.
    """

    def __init__(self, width: int, *, device=None):
        super().__init__()
        self.width = width
        self.rate = LYAPUNOV_RATE      # α; a plain attribute: not learned, not sent
        self.hidden = hidden = hidden_width(width)
        shapes = {"input0": (hidden, width), "input1": (hidden, width), "input2": (1, width),
                  "hidden1": (hidden, hidden), "hidden2": (1, hidden), "bias0": (hidden,), "bias1": (hidden,)}
        for name in (*_INPUTS, *_HIDDEN, *_BIASES):
            setattr(self, name, nn.Parameter(torch.empty(shapes[name], device=device)))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Manek & Kolter's ``ICNN.reset_parameters``: PyTorch's Linear initialisation for every weight,
        biases uniform in ±1/sqrt(w), drawn from ``generator``."""
        with torch.no_grad():
            for name in (*_INPUTS, *_HIDDEN):
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(self.width)
            for name in _BIASES:
                nn.init.uniform_(getattr(self, name), -bound, bound, generator=generator)

    def bind(self) -> Callable[[Tensor], Tensor]:
        """Return ``r -> Ṽ(r)`` per sample ([B, w, *spatial] -> [B]) with the nonnegative weights and ``q(0)``
        computed once (with autograd when it is on)."""
        # Manek & Kolter divide each hidden path by its output size; the last one has size 1.
        hidden1 = F.softplus(self.hidden1) / self.hidden
        hidden2 = F.softplus(self.hidden2)
        layers = (self.input0, self.input1, self.input2, hidden1, hidden2, self.bias0, self.bias1)
        # q(0): every input path vanishes, only biases and hidden paths remain (two small matrix-vector products).
        y1 = rehu(self.bias0).unsqueeze(0)
        y2 = rehu(self.bias1 + y1 @ hidden1.T)
        q0 = (y2 @ hidden2.T).squeeze(0)

        def value(residual: Tensor) -> Tensor:
            rows = _rows(residual)
            q = _icnn(rows, *layers)
            per_row = rehu(q.squeeze(1) - q0)
            per_sample = per_row.view(residual.shape[0], -1).sum(1)
            return per_sample + QUADRATIC_WEIGHT * residual.square().flatten(1).sum(1)

        return value

    def forward(self, residual: Tensor) -> Tensor:
        """Ṽ(residual) per sample: [B, w, *spatial] (or [B, w]) -> [B]."""
        return self.bind()(residual)

    def row_flops(self) -> int:
        """FLOPs (2 x multiply-adds) of the ICNN on one position's w channels: 2 (2 w H + H² + w + H)."""
        w, h = self.width, self.hidden
        return 2 * (2 * w * h + h * h + w + h)

    def bind_flops(self, *, training: bool) -> float:
        """FLOPs of :meth:`bind` (``q(0)``: an H x H and a 1 x H matrix-vector product), times 3 with
        ``training`` (forward plus the two products of each one's backward)."""
        h = self.hidden
        forward = matmul_flops(1, h, h) + matmul_flops(1, h, 1)
        return 3 * forward if training else forward


def _rows(residual: Tensor) -> Tensor:
    """[B, w, *spatial] -> [B * positions, w]: one row per position (the whole vector for a dense state)."""
    if residual.dim() == 2:
        return residual
    return residual.movedim(1, -1).reshape(-1, residual.shape[1])


def _icnn(rows, input0, input1, input2, hidden1, hidden2, bias0, bias1) -> Tensor:
    """Manek & Kolter's ``ICNN`` forward with ReHU activations: [N, w] -> [N, 1], convex in the rows."""
    y1 = rehu(F.linear(rows, input0, bias0))
    y2 = rehu(F.linear(rows, input1, bias1) + y1 @ hidden1.T)
    return F.linear(rows, input2) + y2 @ hidden2.T


def stable_map(residual: Callable[[Tensor], Tensor], potential: Callable[[Tensor], Tensor],
               rate: float) -> Callable[[Tensor], Tensor]:
    """``f̂(z) = z + F̂(z)``: Manek & Kolter's projection of ``F = residual`` for ``V = potential ∘ residual``
    at decay rate ``rate`` (α).

    ``∇V`` comes from ``torch.func.grad``, a function transform: it differentiates with respect to its own
    argument whatever the surrounding grad mode, so it works inside the solver's ``torch.no_grad()`` (then the
    output carries no graph), and under autograd its result is differentiable in the parameters and in ``z``
    (training, the implicit adjoint) without turning ``z`` into a leaf that ``loss.backward()`` would fill.
    """
    def total(z: Tensor):
        r = residual(z)
        values = potential(r)
        return values.sum(), (r, values)

    gradient = torch.func.grad(total, has_aux=True)

    def f(z: Tensor) -> Tensor:
        g, (r, values) = gradient(z)
        return z + project(r, g, values, rate)

    return f


def project(direction: Tensor, gradient: Tensor, values: Tensor, rate: float) -> Tensor:
    """Manek & Kolter's projection per sample: ``F - g ReLU(gᵀF + α V) / ‖g‖²`` (``F = direction``, α = rate).

    Where ``‖g‖²`` is below the dtype's smallest normal number the correction is 0: ``g`` vanishes only at the
    fixed point (``F = 0``, ``V = 0``), where no correction is due, and there the inequality can miss by at most
    ``‖g‖ ‖F‖`` (about 1e-19 ‖F‖ in float32). The denominator is replaced before the division, not after, so
    that its gradient stays finite there too.
    """
    dims = tuple(range(1, direction.dim()))
    slope = (gradient * direction).sum(dims)
    norm2 = gradient.square().sum(dims)
    excess = F.relu(slope + rate * values)
    usable = norm2 > torch.finfo(norm2.dtype).tiny
    scale = torch.where(usable, excess / torch.where(usable, norm2, torch.ones_like(norm2)), torch.zeros_like(excess))
    return direction - scale.view(-1, *(1,) * len(dims)) * gradient


class OrthogonalChannels(nn.Module):
    """``z -> Q z`` on the channel dimension of every position, ``Q`` the Cayley transform of ``A - Aᵀ``.

    ``spatial_dims`` is 0 for a dense state [B, w], 1 for [B, w, L], 2 for [B, w, H, W]. Parameter: ``skew``
    [w, w] (only its antisymmetric part matters).
    """

    def __init__(self, width: int, spatial_dims: int, *, device=None):
        super().__init__()
        self.width = width
        self.spatial_dims = spatial_dims
        self.skew = nn.Parameter(torch.empty(width, width, device=device))

    def reset_parameters(self) -> None:
        """``A = 0``: the layer starts as the identity (no random draw)."""
        with torch.no_grad():
            self.skew.zero_()

    def matrix(self) -> Tensor:
        """``Q = (I - S)^{-1} (I + S)``, ``S = A - Aᵀ``: orthogonal for every ``A`` (``I - S`` is invertible,
        its singular values are >= 1)."""
        s = self.skew - self.skew.T
        eye = torch.eye(self.width, dtype=s.dtype, device=s.device)
        return torch.linalg.solve(eye - s, eye + s)

    def forward(self, z: Tensor) -> Tensor:
        """Apply ``Q`` to the channels of each position (a 1x1 convolution for spatial states)."""
        q = self.matrix()
        if self.spatial_dims == 0:
            return z @ q.T
        conv = F.conv1d if self.spatial_dims == 1 else F.conv2d
        return conv(z, q.reshape(*q.shape, *(1,) * self.spatial_dims))

    def flops(self, positions: int) -> int:
        """FLOPs of applying ``Q`` to one sample of ``positions`` positions: 2 w² per position."""
        return 2 * self.width * self.width * positions

    def matrix_flops(self, *, training: bool) -> float:
        """FLOPs of :meth:`matrix` (once per forward, shared by the batch); see :func:`cayley_flops`."""
        return cayley_flops(self.width, training=training)


def cayley_flops(width: int, *, training: bool) -> float:
    """FLOPs of :meth:`OrthogonalChannels.matrix` for ``width`` channels: an LU solve with w right-hand sides
    (2/3 w³ + 2 w³); with ``training`` also its backward, a solve with the stored LU (2 w³) and the product
    ``-g Xᵀ`` (2 w³)."""
    w = width
    flops = lu_solve_flops(w, w)
    if training:
        flops += 2.0 * w * w * w + matmul_flops(w, w, w)
    return flops


__all__ = ["LYAPUNOV_RATE", "QUADRATIC_WEIGHT", "REHU_WIDTH", "LyapunovFunction", "OrthogonalChannels",
           "cayley_flops", "hidden_width", "project", "rehu", "stable_map"]
