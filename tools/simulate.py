"""Runs a scenario on Flower's simulation engine with the Ray backend (one of the two modules that import flwr)."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

from fed_deq.errors import RunFailed
from fed_deq.scenario import Scenario

FLOWER_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


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
    from flwr.app import Context  # imported late: Flower is slow to import and only needed here
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fed_deq.workload import fleet_size
    from server.federation import run_federation

    quiet_flower()  # after importing flwr, which sets up its own logger
    use_single_pass_dispatch()
    # The server's dataset is generated while Ray starts (the recorder reads the memoised copy), not after it.
    threading.Thread(target=_prewarm_dataset, args=(scenario,), daemon=True).start()
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


def _prewarm_dataset(scenario: Scenario) -> None:
    """Generate the scenario's dataset into this process's memo; errors surface later, where it is used."""
    from fed_deq.workload import scenario_data

    try:
        scenario_data(scenario)
    except Exception:  # noqa: BLE001 - the recorder loads it again and reports the error properly
        pass


def use_single_pass_dispatch() -> None:
    """Make Flower 1.42's simulation engine find undelivered messages in one pass over them.

    Its dispatcher thread asks the in-memory LinkState for a message once per *node* every 0.1 s, and each ask
    scans every stored message: nodes x messages checks per sweep (50,000 with 1,000 nodes and 50 messages in
    flight, a quarter of a core; 1,000,000 during discovery). Measured on large-fleet.yaml (1,000 clients):
    discovery 22 s -> 12 s, whole run 55 s -> 33 s. Same rules as Flower's own loop: expired messages are
    dropped first, at most one message per node per sweep, each marked delivered before it is queued.
    Other Flower versions keep their own loop.
    """
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if not flwr.__version__.startswith("1.42.") or getattr(vce_api.add_messages_to_queue, "single_pass", False):
        return
    flower_loop = vce_api.add_messages_to_queue

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        if not all(hasattr(state, a) for a in ("lock", "message_ins_store", "_check_stored_messages")):
            return flower_loop(state, queue, nodes_mapping, f_stop)  # not the in-memory state we know
        from flwr.supercore.date import now

        nodes = set(nodes_mapping)
        while not f_stop.is_set():
            with state.lock:
                state._check_stored_messages({mid for mid, m in state.message_ins_store.items()
                                              if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes})
                batch, served = [], set()
                for message in state.message_ins_store.values():
                    meta = message.metadata
                    if meta.delivered_at == "" and meta.dst_node_id in nodes and meta.dst_node_id not in served:
                        served.add(meta.dst_node_id)
                        batch.append(message)
                stamp = now().isoformat()
                for message in batch:
                    message.metadata.delivered_at = stamp
            for message in batch:
                queue.put(message)
            f_stop.wait(0.1)

    add_messages_to_queue.single_pass = True
    vce_api.add_messages_to_queue = add_messages_to_queue
