"""DEQ numerics: fixed-point solvers, gradient paths and compact DEQ classifiers (no Flower here)."""

from .backward import BACKWARD_MODES
from .cells import CELLS, CONTRACTIONS, DEQCell, conv_operator_norm
from .models import DEQClassifier, DEQOutput, build_model
from .solvers import SOLVERS, find_fixed_point, iteration_flops, register_solver, solve, solver_options
from .tracker import FixedPoint, FixedPointTracker

__all__ = [
    "BACKWARD_MODES", "CELLS", "CONTRACTIONS", "DEQCell", "DEQClassifier", "DEQOutput", "SOLVERS",
    "FixedPoint", "FixedPointTracker", "build_model", "find_fixed_point", "conv_operator_norm", "iteration_flops",
    "register_solver", "solve", "solver_options",
]
