"""DEQ numerics: fixed-point solvers, gradient paths, compact DEQ classifiers and their fixed-depth baselines
(no Flower here)."""

from .backward import BACKWARD_MODES
from .cells import CELLS, CONTRACTIONS, DEQCell, conv_operator_norm
from .kinds import MODEL_KINDS, build_classifier, is_fixed_depth
from .models import DEQClassifier, DEQOutput, build_model
from .solvers import SOLVERS, find_fixed_point, iteration_flops, register_solver, solve, solver_options
from .tracker import FixedPoint, FixedPointTracker
from .unrolled import UnrolledClassifier, build_unrolled

__all__ = [
    "BACKWARD_MODES", "CELLS", "CONTRACTIONS", "DEQCell", "DEQClassifier", "DEQOutput", "MODEL_KINDS", "SOLVERS",
    "FixedPoint", "FixedPointTracker", "UnrolledClassifier", "build_classifier", "build_model", "build_unrolled",
    "find_fixed_point", "conv_operator_norm", "is_fixed_depth", "iteration_flops", "register_solver", "solve",
    "solver_options",
]
