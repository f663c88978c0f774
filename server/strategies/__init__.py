"""fed-deq strategies: one module per algorithm, all behind the same fleet layer."""

from fed_deq.errors import InputError
from fed_deq.scenario import Scenario
from server.strategies.fednova import FedNova
from server.strategies.fleet import FleetBinding, FleetMixin
from server.strategies.flower_rules import (
    FleetFedAvg, FleetFedMedian, FleetFedProx, FleetFedTrimmedAvg, FleetKrum,
)
from server.strategies.quality import QualityFedAvg

#: Federated evaluation is off: fed-deq evaluates centrally, at every tier's budget.
_COMMON = {"fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}


def build_strategy(scenario: Scenario) -> FleetMixin:
    """The strategy named by ``fusion.rule``, configured from the scenario's fusion section."""
    f = scenario.fusion
    factories = {
        "quality": lambda: QualityFedAvg(**_COMMON),
        "fedavg": lambda: FleetFedAvg(**_COMMON),
        "fednova": lambda: FedNova(**_COMMON),
        "fedprox": lambda: FleetFedProx(proximal_mu=f.proximal_mu, **_COMMON),
        "fedmedian": lambda: FleetFedMedian(**_COMMON),
        "fedtrimmedavg": lambda: FleetFedTrimmedAvg(beta=f.trim_beta, **_COMMON),
        "krum": lambda: FleetKrum(num_malicious_nodes=f.krum_malicious, **_COMMON),
    }
    if f.rule not in factories:
        raise InputError(f"fusion.rule: unknown rule {f.rule!r}; choose one of {', '.join(factories)}")
    return factories[f.rule]()


__all__ = ["FleetBinding", "FleetMixin", "build_strategy", "QualityFedAvg", "FedNova", "FleetFedAvg",
           "FleetFedProx", "FleetFedMedian", "FleetFedTrimmedAvg", "FleetKrum"]
