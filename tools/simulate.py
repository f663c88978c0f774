"""Runs a scenario on Flower's simulation engine with the Ray backend, and ends it cleanly on Ctrl-C."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fed_deq.errors import RunFailed
from fed_deq.scenario import Scenario
from tools.engine import FLOWER_ENV, LOCAL_RAY, RayEngine, flower_backend_module, shut_down_ray

#: Flower's own log line on every run_simulation call ("DEPRECATED FEATURE: The `run_simulation` function is
#: deprecated ..."): a logged warning, not a Python warning, so it is filtered on Flower's logger.
DEPRECATION_NOTICE = "`run_simulation` function is deprecated"
#: Logger levels during a run: Flower's warnings show; Ray's driver logs errors only, as fed-deq has always run it.
QUIET_LEVELS = {"flwr": logging.WARNING, "ray": logging.ERROR}
#: After Ctrl-C, how long the ServerApp may take to leave its round and write summary.json.
STOP_GRACE_S = 5.0
#: After Ray's shutdown, how long its processes may take to end by themselves before they are killed.
RAY_EXIT_GRACE_S = 2.0


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C ended a simulation; ``summary`` is what the run wrote to summary.json (None if it wrote none).

    A KeyboardInterrupt, so that callers running several simulations stop as they would on any Ctrl-C.
    """

    def __init__(self, summary: dict | None) -> None:
        super().__init__()
        self.summary = summary


class DropMessage(logging.Filter):
    """A logging filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Inside the block, Flower's and Ray's INFO chatter stays off the terminal (fed-deq draws its own progress)
    and so does Flower's deprecation notice for run_simulation; Flower's other warnings still show. Levels and
    filters are restored on exit."""
    flwr_logger = logging.getLogger("flwr")
    levels = {logging.getLogger(name): level for name, level in QUIET_LEVELS.items()}
    saved = {logger: logger.level for logger in levels}
    notice = DropMessage(DEPRECATION_NOTICE)
    flwr_logger.addFilter(notice)
    for logger, level in levels.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        flwr_logger.removeFilter(notice)
        for logger, level in saved.items():
            logger.setLevel(level)


@contextmanager
def stop_on_ctrl_c(stop: threading.Event) -> Iterator[list[tuple[int, str]]]:
    """Inside the block, Ctrl-C sets ``stop`` and interrupts the main thread; yields the processes to reap.

    ``stop`` makes the ServerApp's round loop leave the round in flight and write its summary; the interrupt
    makes Flower stop its workers and shut Ray down at once, without waiting for the clients in flight. The
    yielded list receives, at the Ctrl-C, this process's descendants (Ray's), so that the ones still alive
    after Ray's shutdown can be ended. Further Ctrl-Cs are ignored: the wind-down they would cut short is
    bounded. Left alone where Ctrl-C is not the default (ignored, as in a background job, or handled by the
    caller) and off the main thread, where Python allows no signal handlers.
    """
    started: list[tuple[int, str]] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield started
        return

    def on_ctrl_c(signum, frame) -> None:
        if stop.is_set():
            return
        stop.set()
        started.extend(descendants())
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield started
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _proc_stats() -> dict[int, tuple[str, int, str]]:
    """Every process of this machine as pid -> (state, parent pid, start time), read from /proc (Linux)."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = path.read_text()
        except OSError:  # ended while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
        stats[int(path.parent.name)] = (fields[0], int(fields[1]), fields[19])
    return stats


def descendants() -> list[tuple[int, str]]:
    """This process's children, theirs, and so on, as (pid, start time); the start time tells a reused pid."""
    stats = _proc_stats()
    found, parents = [], {os.getpid()}
    while parents:
        children = {pid for pid, (_, ppid, _) in stats.items() if ppid in parents}
        found += [(pid, stats[pid][2]) for pid in children]
        parents = children
    return found


def end_processes(processes: list[tuple[int, str]], grace_s: float) -> None:
    """Give ``processes`` ``grace_s`` seconds to end by themselves, then kill the ones still running."""
    deadline = time.monotonic() + grace_s
    while True:
        stats = _proc_stats()
        alive = [pid for pid, start in processes if pid in stats and stats[pid][2] == start and stats[pid][0] != "Z"]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def backend_config(scenario: Scenario) -> dict:
    """Ray backend settings from the scenario's simulation section."""
    sim = scenario.simulation
    # "local": a Ray of the run's own, even where RAY_ADDRESS or a `ray start` on this machine names a
    # running cluster (which a plain ray.init() would join, refusing num_cpus); clusters go in ray_address.
    init_args = {"address": LOCAL_RAY, "num_cpus": sim.num_cpus or os.cpu_count() or 1, "include_dashboard": False,
                 "log_to_driver": False, "logging_level": logging.ERROR}
    if sim.ray_address:
        init_args = {"address": sim.ray_address, "log_to_driver": False, "logging_level": logging.ERROR}
    return {"client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}


@contextmanager
def open_engine(scenario: Scenario, imported: Callable[[], object] | None = None) -> Iterator[RayEngine]:
    """Ray and the client actors for any number of simulations like ``scenario`` (its ``simulation`` section
    says how: ``num_cpus``, ``cpus_per_client``, ``ray_address``). They start on entry, the actors then
    loading the ClientApp and the scenario's data in the background; they are stopped (or, from a cluster,
    disconnected from) on exit. ``imported``: see ``RayEngine.start``. See tools/engine.py."""
    from fed_deq.scenario import dump_scenario

    engine = RayEngine(backend_config(scenario), warm_up=functools.partial(warm_client, dump_scenario(scenario)))
    try:
        with quiet_flower():
            try:
                engine.start(imported)
            except Exception as exc:  # noqa: BLE001 - re-raised with a one-line reason for the CLI
                raise RunFailed(f"Ray did not start: {' '.join(str(exc).split())[:300]}") from exc
        yield engine
    finally:
        engine.close()


def warm_client(scenario_text: str) -> None:
    """Run in each new client actor: import the ClientApp and load the scenario's data, as its first train
    message would (the parsed scenario and the data are memoised in the actor's process)."""
    import clients.app  # noqa: F401 - imported for its import time, in the actor
    from fed_deq.scenario import parse_scenario_text
    from fed_deq.workload import scenario_data

    scenario_data(parse_scenario_text(scenario_text))


def simulate(scenario: Scenario, out_dir: str | Path, *, name: str = "scenario", progress: bool = True,
             tensorboard: bool = False, engine: RayEngine | None = None) -> dict:
    """Run every round of ``scenario`` through Flower + Ray; return the summary written to ``out_dir``.

    ``engine``: the Ray instance and client actors to run on, kept for the next run (``open_engine``); without
    one the run starts its own and stops it at the end. On Ctrl-C the run stops after the rounds finished so
    far: their metrics stay in metrics.jsonl, summary.json says ``"interrupted": true``, Ray and its
    processes are ended (the engine's too), then SimulationInterrupted is raised.
    """
    if engine is None:
        # Flower's modules import in a thread while Ray starts (about 1 s), then the driver's dataset loads
        # there while the actors start. The engine waits for the imports before it imports Flower's backend
        # itself: one thread at a time imports Flower.
        imports_done = threading.Event()
        threading.Thread(target=_prepare_driver, args=(scenario, imports_done), daemon=True).start()
        with open_engine(scenario, imported=imports_done.wait) as own:
            return simulate(scenario, out_dir, name=name, progress=progress, tensorboard=tensorboard, engine=own)
    os.environ.update(FLOWER_ENV)
    from flwr.app import Context  # imported late: Flower is slow to import and only needed here
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fed_deq.workload import fleet_size
    from server.federation import run_federation
    from tools.flower_patch import single_pass_dispatch

    # The server's dataset is loaded while Flower starts (the recorder reads the memoised copy), not after it.
    threading.Thread(target=_prepare_driver, args=(scenario,), daemon=True).start()
    outcome: dict = {}
    stop, server_done = threading.Event(), threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_federation(grid, scenario, out_dir, name=name, progress=progress,
                                                timeout_s=scenario.simulation.round_timeout_s, stop=stop,
                                                tensorboard=tensorboard)
        finally:
            server_done.set()

    with quiet_flower(), single_pass_dispatch(), stop_on_ctrl_c(stop) as ray_processes:
        try:
            with engine.serving():
                run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fleet_size(scenario),
                               backend_name="ray", backend_config=backend_config(scenario))
        except KeyboardInterrupt:
            _after_ctrl_c(stop, server_done, ray_processes)
            raise SimulationInterrupted(outcome.get("summary")) from None
        except Exception as exc:  # noqa: BLE001 - re-raised with a one-line reason for the CLI
            raise RunFailed(f"simulation failed: {exc}") from exc
    if "summary" not in outcome:
        raise RunFailed("simulation ended before the ServerApp finished (see the log above)")
    return outcome["summary"]


def _after_ctrl_c(stop: threading.Event, server_done: threading.Event, ray_processes: list[tuple[int, str]]) -> None:
    """Let the ServerApp write its summary; make sure Ray and its processes are gone."""
    stop.set()  # already set by stop_on_ctrl_c, unless the interrupt came from elsewhere
    server_done.wait(STOP_GRACE_S)
    shut_ray_down()
    end_processes(ray_processes, RAY_EXIT_GRACE_S)


def shut_ray_down() -> None:
    """Stop this process's Ray instance if it still runs (a shared engine's too: the whole command is ending)."""
    import ray

    if ray.is_initialized():
        shut_down_ray()


def _prepare_driver(scenario: Scenario, imports_done: threading.Event | None = None) -> None:
    """Import what the run needs (Flower's backend first), set ``imports_done``, then load the scenario's
    dataset into this process's memo; errors surface later, where the modules and the data are used."""
    try:
        try:
            flower_backend_module()
            import flwr.serverapp  # noqa: F401 - imported for its import time
            import flwr.simulation  # noqa: F401
            import server.federation  # noqa: F401
        finally:
            if imports_done is not None:
                imports_done.set()
        from fed_deq.workload import scenario_data

        scenario_data(scenario)
    except Exception:  # noqa: BLE001 - the recorder loads it again and reports the error properly
        pass
