"""The bookkeeping every solver shares: per-sample stopping, divergence, and the best evaluated point.

A solver calls :meth:`FixedPointTracker.observe` once per evaluation of f and returns
:meth:`FixedPointTracker.result`; fed_deq/deq/solvers.py states the contract this implements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_NORM_EPS = 1e-12


@dataclass
class FixedPoint:
    """A solver's answer: ``z = f(z_eval)`` per sample, and the per-sample stats of ``z_eval``."""

    z: Tensor
    z_eval: Tensor
    stats: dict[str, Tensor]


class FixedPointTracker:
    """Per-sample bookkeeping shared by the solvers: residuals, stopping, best iterate, divergence.

    Call :meth:`observe` once per f evaluation with the evaluated points ``z`` and ``fz = f(z)``; it counts
    the iteration for every active sample and returns ``fz`` with divergent rows replaced by ``z`` so that
    non-finite numbers never reach the solver's history. ``active`` tells which samples may still move.

    The best iterate is tracked lazily: usually every active sample improves, so the tracker only keeps
    references to the latest ``(z, fz)`` and copies rows into its own buffers when a sample's best is about
    to be superseded (it stopped, or did not improve). Solvers must therefore not modify ``z`` or ``fz`` in
    place after passing them to ``observe``.
    """

    def __init__(self, z0: Tensor, *, tol: float, divergence_factor: float):
        batch = z0.shape[0]
        device = z0.device
        self.tol = tol
        self.divergence_factor = divergence_factor
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=device)
        self.best_abs = torch.full((batch,), float("inf"), dtype=z0.dtype, device=device)
        self.best_rel = torch.full((batch,), float("inf"), dtype=z0.dtype, device=device)
        self.limit: Tensor | None = None
        self._z0 = z0
        self._best: tuple[Tensor, Tensor] | None = None      # (z_eval, z) buffers, allocated on first use
        self._latest: tuple[Tensor, Tensor] | None = None    # (z, fz) of the last evaluation, by reference
        self._latest_is_best = torch.zeros(batch, dtype=torch.bool, device=device)

    def observe(self, z: Tensor, fz: Tensor, residual: Tensor | None = None) -> Tensor:
        """Record the evaluation ``fz = f(z)`` (both [B, D]; ``residual = fz - z`` if already computed)."""
        active = self.active
        self.iterations += active
        abs_res = torch.linalg.vector_norm(fz - z if residual is None else residual, dim=1)
        f_norm = torch.linalg.vector_norm(fz, dim=1)
        rel_res = abs_res / (f_norm + _NORM_EPS)
        if self.limit is None:
            scale = torch.maximum(torch.linalg.vector_norm(z, dim=1), f_norm).nan_to_num(0.0, 0.0, 0.0)
            self.limit = self.divergence_factor * scale.clamp_min(1.0)
        # NaN compares False, so non-finite residuals count as unhealthy along with blow-ups.
        healthy = abs_res <= self.limit
        improved = active & healthy & (rel_res < self.best_rel)
        superseded = self._latest_is_best & ~improved
        if bool(superseded.any()):
            self._store(superseded)
        self._latest = (z, fz)
        self._latest_is_best = improved
        self.best_abs = torch.where(improved, abs_res, self.best_abs)
        self.best_rel = torch.where(improved, rel_res, self.best_rel)
        newly_converged = improved & (rel_res <= self.tol)
        newly_diverged = active & ~healthy
        self.converged |= newly_converged
        self.diverged |= newly_diverged
        self.active = active & ~(newly_converged | newly_diverged)
        if bool(self.diverged.any()):
            fz = torch.where(self.diverged[:, None], z, fz)
        return fz

    def _store(self, rows: Tensor) -> None:
        """Copy the latest evaluation of ``rows`` into the best buffers."""
        if self._best is None:
            self._best = (self._z0.clone(), self._z0.clone())
        index = rows.nonzero().squeeze(1)
        z, fz = self._latest
        self._best[0].index_copy_(0, index, z.index_select(0, index))
        self._best[1].index_copy_(0, index, fz.index_select(0, index))

    def done(self) -> bool:
        """True once no sample is active."""
        return not bool(self.active.any())

    def hold(self, z_next: Tensor, z: Tensor) -> Tensor:
        """Move active samples to ``z_next``; stopped samples keep ``z``."""
        if bool(self.active.all()):
            return z_next
        return torch.where(self.active[:, None], z_next, z)

    def result(self) -> FixedPoint:
        """The returned iterate, the point it is the image of (both [B, D]), and the stats."""
        z_eval, z = self._best if self._best is not None else (self._z0, self._z0)
        if self._latest is not None and bool(self._latest_is_best.any()):
            pick = self._latest_is_best[:, None]
            z_eval = torch.where(pick, self._latest[0], z_eval)
            z = torch.where(pick, self._latest[1], z)
        inf = torch.full_like(self.best_abs, float("inf"))
        stats = {
            "iterations": self.iterations.clone(),
            "abs_residual": torch.where(self.diverged, inf, self.best_abs),
            "rel_residual": torch.where(self.diverged, inf, self.best_rel),
            "converged": self.converged.clone(),
        }
        return FixedPoint(z.clone() if z is self._z0 else z, z_eval.clone() if z_eval is self._z0 else z_eval,
                          stats)
