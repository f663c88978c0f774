"""`fed-deq deploy-local`: a real SuperLink, ServerApp SuperExec and one SuperNode per client on 127.0.0.1.

The supervisor starts Flower's programs as subprocesses (command lines from tools/flower_cmd.py, shared with
the compose files), submits the run with ``flwr run``, and follows it through the progress marker the run's
recorder writes beside metrics.jsonl (fed_deq.recorder.PROGRESS_FILE), not through Flower's log text. Every
process it started is stopped before it returns, also on errors, Ctrl-C and SIGTERM. It never imports flwr.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fed_deq.errors import InputError
from fed_deq.fleet import Device, build_fleet
from fed_deq.recorder import PROGRESS_FILE, read_progress
from fed_deq.scenario import load_scenario
from tools import flower_cmd
from tools.args import checked_out_dir
from tools.flower_cmd import Certs
from tools.processes import Deployment, DeploymentFailed, flower_bin_dir, free_port, wait_for_port

PROJECT_DIR = Path(__file__).resolve().parent.parent
GEN_CERTS = PROJECT_DIR / "docker" / "gen-certs.sh"
SUPERLINK_START_S = 60.0     # the SuperLink listens within a few seconds
NODES_ONLINE_S = 120.0       # every SuperNode has connected within about a minute on 2 cores (20 nodes)
FINISH_GRACE_S = 30.0        # after the marker says finished, how long `flwr run --stream` may take to exit
POLL_S = 0.2


def generate_certs(out: Path, num_node_keys: int = 0) -> Certs:
    """CA, SuperLink certificate (and node keys) from docker/gen-certs.sh; needs bash and openssl."""
    if not GEN_CERTS.is_file() or shutil.which("openssl") is None:
        raise DeploymentFailed(f"TLS needs {GEN_CERTS} and openssl")
    done = subprocess.run(["bash", str(GEN_CERTS), str(out), str(num_node_keys)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise DeploymentFailed(f"gen-certs.sh failed: {done.stderr.strip().splitlines()[-1:]}")
    return Certs(str(out))


def online_nodes(deployment: Deployment) -> int:
    """How many SuperNodes the SuperLink reports online (``flwr supernode list --format json``)."""
    done = deployment.cli(flower_cmd.list_nodes())
    try:
        nodes = json.loads(done.stdout).get("nodes", [])
    except (json.JSONDecodeError, AttributeError):
        return 0
    return sum(1 for node in nodes if node.get("status") == "online")


def wait_for_nodes(deployment: Deployment, expected: int, timeout_s: float) -> None:
    """Block until every SuperNode is online: the ServerApp learns the fleet once, when the run starts."""
    deadline = time.monotonic() + timeout_s
    online = 0
    while time.monotonic() < deadline:
        dead = [name for name, proc in deployment.procs.items() if proc.poll() is not None]
        if dead:
            raise DeploymentFailed(f"{dead[0]} exited early; see {deployment.log_dir / dead[0]}.log")
        online = online_nodes(deployment)
        if online >= expected:
            return
        time.sleep(1.0)
    raise DeploymentFailed(f"only {online} of {expected} SuperNodes online after {timeout_s:.0f} s; "
                           f"see {deployment.log_dir}/supernode-*.log")


def register_nodes(deployment: Deployment, count: int) -> None:
    """Register each SuperNode's public key with the SuperLink (SuperNode authentication)."""
    for i in range(count):
        done = deployment.cli(flower_cmd.register_node(deployment.certs.node_public_key(i)))
        if done.returncode != 0:
            raise DeploymentFailed(f"flwr supernode register failed for node {i}: {done.stdout.strip()[-200:]}")


def start_superlink(deployment: Deployment, *, node_auth: bool) -> None:
    """flower-superlink on 127.0.0.1, then wait until it listens."""
    deployment.start("superlink", flower_cmd.superlink(deployment.superlink_port, certs=deployment.certs,
                                                       node_auth=node_auth))
    wait_for_port(deployment, "superlink", deployment.superlink_port, timeout_s=SUPERLINK_START_S)


def start_supernodes(deployment: Deployment, devices: Sequence[Device], *, node_auth: bool) -> None:
    """One flower-supernode per device, each with its partition and tier in ``--node-config``."""
    for device, port in zip(devices, deployment.node_ports):
        key = deployment.certs.node_key(device.partition_id) if node_auth else None
        deployment.start(f"supernode-{device.partition_id}", flower_cmd.supernode(
            deployment.address, port, flower_cmd.node_config(device, len(devices)), certs=deployment.certs,
            auth_key=key))


# --------------------------------------------------------------------------------------------------------
# Following the run through its progress marker.


@dataclass
class RunWatch:
    """What the run's progress marker (fed_deq.recorder.PROGRESS_FILE) has shown the supervisor so far."""

    out_dir: Path
    progress: dict | None = None
    first_round_at: float | None = None   # monotonic time the marker first showed round 1 under way
    finished_at: float | None = None      # monotonic time the marker first said the run finished

    def poll(self) -> None:
        """Read the marker again; note when round 1 is first seen under way and when the run finished."""
        progress = read_progress(self.out_dir)
        if progress is None:
            return
        self.progress, now = progress, time.monotonic()
        if self.first_round_at is None and (progress.get("running_round") or progress.get("rounds_done")):
            self.first_round_at = now
        if self.finished_at is None and progress.get("finished"):
            self.finished_at = now

    def describe(self) -> str:
        """Where the run got to, in words, for failure messages."""
        p = self.progress
        if p is None:
            return f"the ServerApp had not opened the output folder yet: no {PROGRESS_FILE}"
        if p.get("finished"):
            return f"all {p.get('rounds')} rounds finished"
        if p.get("running_round"):
            return f"round {p['running_round']} of {p.get('rounds')} under way, {p.get('rounds_done')} done"
        if not p.get("rounds_done"):
            return "the ServerApp was evaluating the starting model; round 1 had not started"
        return f"all {p.get('rounds')} rounds done, summary not written"


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended, as the supervisor saw it."""

    returncode: int | None   # `flwr run`'s exit code; None if it was still streaming when the supervisor stopped
    wall_time_s: float
    killed_at_s: float | None
    finished: bool           # the progress marker said the run finished (every output written)
    progress: str            # RunWatch.describe()


def _copy_log(stream, log_path: Path) -> None:
    """Copy `flwr run --stream` output to its log file, each line prefixed by seconds since submission."""
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        for line in stream:
            log.write(f"{time.monotonic() - started:7.1f}s {line}")
            log.flush()


def submit_run(deployment: Deployment, app_dir: Path, run_config: Path, out_dir: Path, *, timeout_s: float,
               kill_node: str | None, kill_after_s: float | None) -> RunOutcome:
    """`flwr run APP fed-deq --stream` and follow the run's progress marker until it finished.

    With ``kill_node``, that SuperNode is killed ``kill_after_s`` seconds after the marker shows round 1
    under way. A marker left by an earlier run in ``out_dir`` is removed first.
    """
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    proc = deployment.start("flwr-run", flower_cmd.flwr_run(str(app_dir), flower_cmd.CONNECTION, str(run_config)),
                            cwd=app_dir, home="cli", pipe=True)
    reader = threading.Thread(target=_copy_log, args=(proc.stdout, deployment.log_dir / "flwr-run.log"),
                              daemon=True)
    reader.start()
    watch, started, killed_at = RunWatch(out_dir), time.monotonic(), None
    while True:
        watch.poll()
        now = time.monotonic()
        if proc.poll() is not None or (watch.finished_at is not None and now - watch.finished_at > FINISH_GRACE_S):
            break
        if now - started > timeout_s:
            raise DeploymentFailed(f"run did not finish within {timeout_s:.0f} s ({watch.describe()}); "
                                   f"see {deployment.log_dir}")
        deployment.check_alive(("superlink", "serverapp"), during=f"the run ({watch.describe()})")
        if (kill_node and killed_at is None and watch.first_round_at is not None
                and now - watch.first_round_at >= (kill_after_s or 0.0)):
            deployment.kill(kill_node)
            killed_at = now - started
        time.sleep(POLL_S)
    watch.poll()  # the marker may have moved on while `flwr run` was exiting
    if proc.poll() is not None:
        reader.join(timeout=5.0)
    return RunOutcome(returncode=proc.poll(), wall_time_s=time.monotonic() - started, killed_at_s=killed_at,
                      finished=watch.finished_at is not None, progress=watch.describe())


def check_outputs(out_dir: Path, outcome: RunOutcome, log_dir: Path) -> dict:
    """The run's summary.json, once the marker says the run finished and `flwr run` did not report a failure."""
    if not outcome.finished or outcome.returncode not in (0, None):
        exit_text = ("flwr run still running" if outcome.returncode is None
                     else f"flwr run exited {outcome.returncode}")
        raise DeploymentFailed(f"run failed ({exit_text}; {outcome.progress}); logs in {log_dir}")
    return json.loads((out_dir / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------------
# The whole deployment.


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while deploying, so `finally` still stops every process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _new_deployment(out_dir: Path, fleet_size: int, *, tls: bool, node_auth: bool) -> Deployment:
    """Folders, ports and (with TLS) certificates of a fresh deployment."""
    workdir = Path(tempfile.mkdtemp(prefix="fed-deq-deploy-"))
    log_dir = out_dir / "deploy-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        deployment = Deployment(workdir=workdir, log_dir=log_dir, bin_dir=flower_bin_dir(),
                                superlink_port=free_port(), node_ports=[free_port() for _ in range(fleet_size)])
        if tls:
            deployment.certs = generate_certs(workdir / "certs", fleet_size if node_auth else 0)
        home = workdir / "homes" / "cli"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(flower_cmd.connection_toml(deployment.address, certs=deployment.certs))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return deployment


def _deploy_and_run(deployment: Deployment, devices: Sequence[Device], run_config: Path, out_dir: Path, *,
                    app_dir: Path, node_auth: bool, victim: str | None, kill_after_s: float | None,
                    timeout_s: float) -> RunOutcome:
    """Start the federation in order, wait for the whole fleet, then submit and follow the run."""
    start_superlink(deployment, node_auth=node_auth)
    if node_auth:
        register_nodes(deployment, len(devices))
    deployment.start("serverapp", flower_cmd.serverapp_superexec(deployment.address, certs=deployment.certs))
    start_supernodes(deployment, devices, node_auth=node_auth)
    wait_for_nodes(deployment, len(devices), timeout_s=NODES_ONLINE_S)
    return submit_run(deployment, app_dir, run_config, out_dir, timeout_s=timeout_s, kill_node=victim,
                      kill_after_s=kill_after_s)


def run_local_deployment(scenario_path: str | Path, out_dir: str | Path, *, overrides: Sequence[str] = (),
                         tls: bool = False, node_auth: bool = False, kill_node_after_s: float | None = None,
                         timeout_s: float = 1800.0, app_dir: str | Path = PROJECT_DIR) -> dict:
    """Run ``scenario_path`` on a real SuperLink + SuperExec + one SuperNode per client on 127.0.0.1.

    Returns the run's summary (summary.json) plus a ``deployment`` entry (ports, wall time, killed node).
    ``kill_node_after_s`` kills the last SuperNode that many seconds after round 1 starts, to show the run
    survives a lost node. ``node_auth`` (needs ``tls``) registers every SuperNode's key first. Bad input is
    an InputError before anything starts; every process started here is stopped before returning, also on
    errors and Ctrl-C.
    """
    if node_auth and not tls:
        raise InputError("deploy-local: --node-auth needs --tls (Flower authenticates SuperNodes over TLS only)")
    out_dir = checked_out_dir(out_dir).resolve()
    scenario_path = Path(scenario_path).resolve()
    devices = build_fleet(load_scenario(scenario_path, overrides=overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    deployment = _new_deployment(out_dir, len(devices), tls=tls, node_auth=node_auth)
    victim = f"supernode-{devices[-1].partition_id}" if kill_node_after_s is not None else None
    try:
        with _sigterm_as_interrupt():
            run_config = deployment.workdir / "run-config.toml"  # a file: Flower's k=v strings cannot carry quotes
            run_config.write_text(flower_cmd.run_config_toml(str(scenario_path), str(out_dir), overrides))
            outcome = _deploy_and_run(deployment, devices, run_config, out_dir, app_dir=Path(app_dir).resolve(),
                                      node_auth=node_auth, victim=victim, kill_after_s=kill_node_after_s,
                                      timeout_s=timeout_s)
    finally:
        deployment.stop_all()
        shutil.rmtree(deployment.workdir, ignore_errors=True)
    summary = check_outputs(out_dir, outcome, deployment.log_dir)
    summary["deployment"] = {
        "superlink": deployment.address, "node_ports": deployment.node_ports, "tls": tls, "node_auth": node_auth,
        "wall_time_s": round(outcome.wall_time_s, 2),
        "killed_node": victim if outcome.killed_at_s is not None else None,
        "killed_at_s": None if outcome.killed_at_s is None else round(outcome.killed_at_s, 2),
    }
    return summary
