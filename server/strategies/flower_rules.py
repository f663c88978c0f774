"""Flower's own aggregation rules, run behind the fleet layer (sampling, screening, clock)."""

from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from server.strategies.fleet import FleetMixin


class FleetFedAvg(FleetMixin, FedAvg):
    """FedAvg (McMahan et al. 2017): weights n_k / Σn."""

    weights_by_examples = True


class FleetFedProx(FleetMixin, FedProx):
    """FedProx (Li et al. 2020): FedAvg fusion; clients add μ/2‖w − w_global‖² locally."""

    weights_by_examples = True


class FleetFedMedian(FleetMixin, FedMedian):
    """Coordinate-wise median (Yin et al. 2018)."""


class FleetFedTrimmedAvg(FleetMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018), trimming a fraction ``beta`` at each end."""


class FleetKrum(FleetMixin, Krum):
    """Krum (Blanchard et al. 2017): keeps the update closest to its neighbours."""
