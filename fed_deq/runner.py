"""Runs a scenario on Flower's simulation engine with the Ray backend (one of the two modules that import flwr)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fed_deq.scenario import Scenario

FLOWER_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class RunFailed(RuntimeError):
    """The simulation started but could not finish (the CLI exits 1)."""


def quiet_flower() -> None:
    """Keep Flower's and Ray's per-round INFO chatter off the terminal; fed-deq draws its own progress."""
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def backend_config(scenario: Scenario) -> dict:
    """Ray backend settings from the scenario's simulation section."""
    sim = scenario.simulation
    init_args = {"num_cpus": sim.num_cpus or os.cpu_count() or 1, "include_dashboard": False,
                 "log_to_driver": False, "logging_level": logging.ERROR}
    if sim.ray_address:
        init_args = {"address": sim.ray_address, "log_to_driver": False, "logging_level": logging.ERROR}
    return {"client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}


def simulate(scenario: Scenario, out_dir: str | Path, *, name: str = "scenario", progress: bool = True) -> dict:
    """Run every round of ``scenario`` through Flower + Ray; return the summary written to ``out_dir``."""
    os.environ.update(FLOWER_ENV)
    quiet_flower()
    from flwr.app import Context  # imported late: Flower is slow to import and only needed here
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fed_deq.workload import fleet_size
    from server.federation import run_federation

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower()
        outcome["summary"] = run_federation(grid, scenario, out_dir, name=name, progress=progress,
                                            timeout_s=scenario.simulation.round_timeout_s)

    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fleet_size(scenario),
                       backend_name="ray", backend_config=backend_config(scenario))
    except Exception as exc:  # noqa: BLE001 - re-raised with a one-line reason for the CLI
        raise RunFailed(f"simulation failed: {exc}") from exc
    if "summary" not in outcome:
        raise RunFailed("simulation ended before the ServerApp finished (see the log above)")
    return outcome["summary"]
