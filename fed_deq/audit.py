"""What the server measures itself about a client model (torch, no Flower).

The server knows the scenario, so it can rebuild every client's data split and hold a probe set no client
has. It re-evaluates a returned model on the client's own validation split at the client's budget (to check
the accuracy and residual the client claims) and, for the ``probe`` quality score, on its probe set at the
fleet's evaluation budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fed_deq import data, fleet, workload
from fed_deq.scenario import Scenario
from fed_deq.training import EvalResult, evaluate


@dataclass(frozen=True)
class ProbeResult:
    """A client model on the server's probe set, and what measuring it cost."""

    loss: float
    accuracy: float
    rel_residual: float
    mean_iterations: float
    wall_s: float
    flops: float


class Auditor:
    """The server's own evaluation model, data splits and probe set for one scenario."""

    def __init__(self, scenario: Scenario) -> None:
        # One thread, as every client runs (workload.run_client_round): the same arithmetic, the same bits.
        torch.set_num_threads(1)
        self.scenario = scenario
        self.bundle = workload.scenario_data(scenario)
        self.model = workload.build_scenario_model(scenario, self.bundle)
        self._local: dict[int, data.ClientData] = {}

    def local(self, partition_id: int) -> data.ClientData:
        """The client's train/validation split, as the client itself derives it (memoised)."""
        if partition_id not in self._local:
            self._local[partition_id] = workload.client_partition(self.scenario, partition_id)
        return self._local[partition_id]

    def validation(self, arrays: workload.Arrays, partition_id: int, budget: fleet.Budget) -> EvalResult:
        """The client's model on its own validation split, by the very call the client makes."""
        workload.load_arrays(self.model, arrays)
        return workload.validate(self.scenario, self.model, self.local(partition_id), budget)

    def probe(self, arrays: workload.Arrays) -> ProbeResult:
        """The client's model on the probe set at the fleet's evaluation budget (``model.eval_iterations``)."""
        started = time.perf_counter()
        workload.load_arrays(self.model, arrays)
        m, b = self.scenario.model, self.bundle
        result = evaluate(self.model, b.x_probe, b.y_probe, solver=m.solver, max_iter=m.eval_iterations, tol=m.tol)
        samples = float(len(b.y_probe))
        flops = samples * (result.mean_iterations * self.model.cell_flops() + self.model.overhead_flops())
        return ProbeResult(loss=result.loss, accuracy=result.accuracy, rel_residual=result.rel_residual,
                           mean_iterations=result.mean_iterations, wall_s=time.perf_counter() - started,
                           flops=flops)

    def probe_size(self) -> int:
        """Samples in the probe set."""
        return 0 if self.bundle.y_probe is None else int(np.asarray(self.bundle.y_probe).size)
