"""DEQ numerics: fixed-point solvers, gradient paths and compact DEQ classifiers (no Flower here)."""

from .backward import BACKWARD_MODES
from .cells import CELL_KINDS, CONTRACTIONS, DEQCell, conv_operator_norm
from .models import DEQClassifier, DEQOutput, build_model
from .solvers import (SOLVERS, FixedPoint, FixedPointTracker, find_fixed_point, iteration_flops, register_solver,
                      solve, solver_options)

__all__ = [
    "BACKWARD_MODES", "CELL_KINDS", "CONTRACTIONS", "DEQCell", "DEQClassifier", "DEQOutput", "SOLVERS",
    "FixedPoint", "FixedPointTracker", "build_model", "find_fixed_point", "conv_operator_norm", "iteration_flops",
    "register_solver", "solve", "solver_options",
]
