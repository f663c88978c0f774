"""Real Flower deployments of a scenario's fleet: docker-compose files and a loopback federation.

Two ways to run the same topology (see docs/deploy.md):

* :func:`write_compose` — a Compose file (docker-compose 1.29 compatible) with a ``superlink``, a
  ``serverapp`` (a SuperExec that runs the ServerApp), one ``supernode-<i>`` per client with CPU and memory
  limits derived from its tier's compute speed, and a ``submit`` service (profile ``submit``) that starts the
  run. Every container joins the SuperLink's network namespace, so all Flower traffic is on 127.0.0.1.
* :func:`run_local_deployment` — the same processes without Docker, on loopback, started and stopped here.

This module drives the Flower command-line programs as subprocesses and never imports ``flwr``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fed_deq.errors import InputError
from fed_deq.fleet import Device, build_fleet
from fed_deq.scenario import Scenario, load_scenario

PROJECT_DIR = Path(__file__).resolve().parent.parent
GEN_CERTS = PROJECT_DIR / "docker" / "gen-certs.sh"
DEFAULT_IMAGE = "fed-deq:latest"
# Compose ports: every container shares the SuperLink's network namespace, so each SuperNode's own
# Runtime API (used by the SuperExec inside its container) needs a port of its own.
SUPERLINK_PORT = 9091
NODE_PORT_BASE = 9100
CONNECTION = "fed-deq"          # [superlink.fed-deq] in the image's and the local FLWR_HOME config.toml
TLS_CONNECTION = "fed-deq-tls"  # the same SuperLink, verified against /certs/ca.crt
CONTAINER_APP_DIR = "/app"
CONTAINER_RUNS_DIR = "/app/runs"
CONTAINER_SCENARIO_DIR = "/etc/fed-deq/scenarios"  # the scenario keeps its file name: runs are named after it
CONTAINER_CERTS_DIR = "/certs"
# Tier → container limits. The fastest tier gets MAX_NODE_CPUS; slower tiers get CPU in proportion to their
# compute speed (never below MIN_NODE_CPUS). Memory: NODE_MEM_FLOOR_MIB (a SuperNode, its SuperExec and a
# ClientApp importing torch fit in about 0.7 GiB) plus NODE_MEM_SPAN_MIB in proportion to speed.
MAX_NODE_CPUS = 1.0
MIN_NODE_CPUS = 0.1
NODE_MEM_FLOOR_MIB = 1024
NODE_MEM_SPAN_MIB = 1024
SUPERLINK_LIMITS = (("cpus", 0.5), ("mem_limit", "1g"))     # measured peak: about 110 MiB
SERVERAPP_LIMITS = (("cpus", 1.0), ("mem_limit", "3g"))     # measured peak: about 450 MiB (digits)
FLOWER_PROGRAMS = ("flower-superlink", "flower-superexec", "flower-supernode", "flwr")
ROUND_MARKER = "[ROUND 1/"      # Flower's strategies log this when the first round starts
STOP_GRACE_S = 5.0


class DeploymentFailed(RuntimeError):
    """A deployment started but did not produce a finished run (the CLI exits 1)."""


# --------------------------------------------------------------------------------------------------------
# Tier limits and Flower option strings.


@dataclass(frozen=True)
class TierLimits:
    """Container limits of one tier: a CPU quota and a memory cap (Compose ``cpus`` / ``mem_limit``)."""

    cpus: float
    mem_mib: int

    @property
    def mem_limit(self) -> str:
        """Compose spelling of the memory cap, e.g. ``1536m``."""
        return f"{self.mem_mib}m"


def tier_limits(scenario: Scenario) -> dict[str, TierLimits]:
    """CPU and memory limits per tier, in proportion to the tier's compute speed (fastest tier = 1 CPU)."""
    fastest = max(tier.compute_gflops for tier in scenario.fleet.tiers)
    limits = {}
    for tier in scenario.fleet.tiers:
        ratio = tier.compute_gflops / fastest
        cpus = max(MIN_NODE_CPUS, round(MAX_NODE_CPUS * ratio, 2))
        mem = NODE_MEM_FLOOR_MIB + 64 * math.ceil(NODE_MEM_SPAN_MIB * ratio / 64)
        limits[tier.name] = TierLimits(cpus=cpus, mem_mib=mem)
    return limits


def quote_value(text: str, what: str) -> str:
    """``text`` as a quoted TOML string for Flower's ``key=value`` options (which allow no escapes)."""
    for quote in ("'", '"'):
        if quote not in text:
            return f"{quote}{text}{quote}"
    raise InputError(f"{what}: {text!r} contains both quote characters, which Flower's key=value options "
                     "cannot carry")


def node_config(device: Device, num_partitions: int) -> str:
    """The ``--node-config`` string of one SuperNode: its partition, the fleet size and its tier."""
    tier = quote_value(device.tier, f"fleet.tiers: tier name of partition {device.partition_id}")
    return f"partition-id={device.partition_id} num-partitions={num_partitions} tier={tier}"


def run_config_string(scenario_path: str, out_dir: str, overrides: Sequence[str]) -> str:
    """The ``flwr run --run-config`` string: scenario path, output folder and the ``--set`` overrides."""
    sets = " ".join(shlex.quote(item) for item in overrides)
    return (f"scenario={quote_value(scenario_path, 'scenario path')} "
            f"out-dir={quote_value(out_dir, 'output folder')} set={quote_value(sets, '--set overrides')}")


# --------------------------------------------------------------------------------------------------------
# Compose files.


@dataclass(frozen=True)
class ComposeOptions:
    """Everything besides the scenario that shapes a compose file."""

    image: str = DEFAULT_IMAGE
    scenario_file: str = "./scenarios/default.yaml"  # host path mounted into the serverapp container
    run_name: str = "default"                          # the run writes to ./runs/<run_name>
    name: str = "default"                              # the scenario's file stem (names the run)
    overrides: tuple[str, ...] = ()
    superlink_port: int = SUPERLINK_PORT
    node_port_base: int = NODE_PORT_BASE


def _service(image: str, command: list[str], **extra) -> dict:
    """A service running one Flower program; all but the SuperLink share the SuperLink's network."""
    service = {"image": image, "command": command, "environment": {"FLWR_DISABLE_UPDATE_CHECK": "1"}}
    service.update(extra)
    return service


def _superlink_cmd(opts: ComposeOptions, tls: bool) -> list[str]:
    """flower-superlink on loopback; the ServerApp runs in the separate ``serverapp`` SuperExec."""
    security = ["--ssl-ca-certfile", f"{CONTAINER_CERTS_DIR}/ca.crt", "--ssl-certfile",
                f"{CONTAINER_CERTS_DIR}/server.pem", "--ssl-keyfile", f"{CONTAINER_CERTS_DIR}/server.key"]
    return ["flower-superlink", *(security if tls else ["--insecure"]), "--host", "127.0.0.1",
            "--port", str(opts.superlink_port), "--isolation", "process",
            "--disable-runtime-dependency-installation"]


def _client_security(tls: bool) -> list[str]:
    """Flags of a program that dials the SuperLink: verify its certificate, or plain HTTP."""
    return ["--root-certificates", f"{CONTAINER_CERTS_DIR}/ca.crt"] if tls else ["--insecure"]


def _serverapp_cmd(opts: ComposeOptions, tls: bool) -> list[str]:
    """A SuperExec that picks up runs from the SuperLink and starts the ServerApp for each."""
    return ["flower-superexec", *_client_security(tls), "--runtime-api-address",
            f"127.0.0.1:{opts.superlink_port}"]


def _supernode_cmd(device: Device, fleet_size: int, opts: ComposeOptions, tls: bool) -> list[str]:
    """One SuperNode serving ``device``'s partition; its ClientApps run in subprocesses of the container."""
    return ["flower-supernode", *_client_security(tls), "--superlink", f"127.0.0.1:{opts.superlink_port}",
            "--port", str(opts.node_port_base + device.partition_id),
            "--node-config", node_config(device, fleet_size)]


def _submit_cmd(opts: ComposeOptions, tls: bool) -> list[str]:
    """``flwr run`` of the app baked into the image, streaming its log until the run ends."""
    config = run_config_string(_container_scenario(opts), f"{CONTAINER_RUNS_DIR}/{opts.run_name}", opts.overrides)
    return ["flwr", "run", CONTAINER_APP_DIR, TLS_CONNECTION if tls else CONNECTION, "--stream",
            "--run-config", config]


def _container_scenario(opts: ComposeOptions) -> str:
    """Where the ServerApp container sees the scenario file."""
    return f"{CONTAINER_SCENARIO_DIR}/{opts.name}.yaml"


def _in_superlink_namespace() -> dict:
    """Service keys that put a container in the SuperLink's network namespace (its 127.0.0.1)."""
    return {"network_mode": "service:superlink", "depends_on": ["superlink"]}


def compose_services(scenario: Scenario, opts: ComposeOptions, *, tls: bool = False) -> dict[str, dict]:
    """All services of the federation (the full definition; an override keeps only what changes)."""
    volumes = [f"./runs:{CONTAINER_RUNS_DIR}", f"{opts.scenario_file}:{_container_scenario(opts)}:ro"]
    services = {
        "superlink": _service(opts.image, _superlink_cmd(opts, tls), **dict(SUPERLINK_LIMITS)),
        "serverapp": _service(opts.image, _serverapp_cmd(opts, tls), **_in_superlink_namespace(),
                              **dict(SERVERAPP_LIMITS), volumes=volumes),
    }
    devices = build_fleet(scenario)
    limits = tier_limits(scenario)
    for device in devices:
        tier = limits[device.tier]
        services[f"supernode-{device.partition_id}"] = _service(
            opts.image, _supernode_cmd(device, len(devices), opts, tls), **_in_superlink_namespace(),
            cpus=tier.cpus, mem_limit=tier.mem_limit,
            labels={"fed-deq.tier": device.tier, "fed-deq.partition-id": str(device.partition_id)})
    services["submit"] = _service(opts.image, _submit_cmd(opts, tls), **_in_superlink_namespace(),
                                  profiles=["submit"])
    return services


def _tls_override(scenario: Scenario, opts: ComposeOptions) -> dict[str, dict]:
    """Per service: the TLS command and the certificate folder mounted read-only."""
    services = compose_services(scenario, opts, tls=True)
    return {name: {"command": svc["command"], "volumes": [f"./certs:{CONTAINER_CERTS_DIR}:ro"]}
            for name, svc in services.items()}


def _header(scenario: Scenario, opts: ComposeOptions, what: str) -> str:
    """The comment on top of a generated file: what it is, where it came from, how limits were chosen."""
    overrides = "".join(f" --set {shlex.quote(item)}" for item in opts.overrides)
    lines = [
        f"# {what}",
        f"# Generated by `fed-deq compose {opts.scenario_file}{overrides}`; regenerate instead of editing.",
        "# Services share the SuperLink's network namespace: all Flower traffic stays on 127.0.0.1.",
        f"# Tier limits: cpus = {MAX_NODE_CPUS} x tier GFLOP/s / fastest tier GFLOP/s (>= {MIN_NODE_CPUS}),",
        f"# mem_limit = {NODE_MEM_FLOOR_MIB} MiB + {NODE_MEM_SPAN_MIB} MiB x the same ratio (rounded up to 64 MiB).",
    ]
    for name, limit in tier_limits(scenario).items():
        lines.append(f"#   {name}: cpus {limit.cpus}, mem_limit {limit.mem_limit}")
    return "\n".join(lines) + "\n"


class _ComposeDumper(yaml.SafeDumper):
    """Block style for mappings, one-line lists for commands and volumes, no YAML anchors."""

    def ignore_aliases(self, data) -> bool:  # noqa: ARG002 - a compose file reads better without &id001
        return True


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    """Lists of plain values (commands, volumes) on one line: `[flower-supernode, --port, '9100', ...]`."""
    flow = all(isinstance(item, (str, int, float)) for item in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)


_ComposeDumper.add_representer(list, _represent_list)


def _dump(data: dict) -> str:
    """YAML in insertion order, wide lines (commands stay on one line)."""
    return yaml.dump(data, Dumper=_ComposeDumper, sort_keys=False, width=1000, default_flow_style=False)


def tls_override_path(path: str | Path) -> Path:
    """Where the TLS override of compose file ``path`` goes: ``<stem>.tls.yml`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tls.yml")


def write_compose(scenario: str | Path, path: str | Path, *, image: str = DEFAULT_IMAGE, tls: bool = False,
                  overrides: Iterable[str] = (), run_name: str | None = None, scenario_file: str | None = None,
                  superlink_port: int = SUPERLINK_PORT, node_port_base: int = NODE_PORT_BASE) -> list[Path]:
    """Write a compose file for the fleet of scenario file ``scenario`` (with ``tls`` also its TLS override).

    The scenario file is mounted into the ServerApp container and the run re-applies ``overrides`` to it, so
    fleet and run agree. ``scenario_file`` is the volume source as written (default: the file's path relative
    to the compose file's folder); ``run_name`` names the output folder ``./runs/<run_name>`` (default: the
    scenario file's stem). Returns the written paths.
    """
    scenario_path, path = Path(scenario), Path(path)
    loaded = load_scenario(scenario_path, overrides=overrides)
    opts = ComposeOptions(image=image, scenario_file=scenario_file or _mount_source(scenario_path, path.parent),
                          run_name=run_name or scenario_path.stem, name=scenario_path.stem,
                          overrides=tuple(overrides), superlink_port=superlink_port, node_port_base=node_port_base)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_header(loaded, opts, "fed-deq federation: SuperLink, ServerApp SuperExec, one SuperNode "
                                          "per client.") + _dump({"services": compose_services(loaded, opts)}))
    written = [path]
    if tls:
        override = tls_override_path(path)
        override.write_text(_header(loaded, opts, f"TLS override for {path.name}: certificates from "
                                                  "`bash docker/gen-certs.sh certs`.")
                            + _dump({"services": _tls_override(loaded, opts)}))
        written.append(override)
    return written


def _mount_source(scenario_path: Path, compose_dir: Path) -> str:
    """The scenario file as a Compose volume source: ``./relative/path`` from the compose file's folder."""
    relative = os.path.relpath(scenario_path.resolve(), compose_dir.resolve())
    return relative if relative.startswith("..") else f"./{relative}"


# --------------------------------------------------------------------------------------------------------
# Local deployment: processes, ports, cleanup.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_bin_dir() -> Path:
    """The folder holding the Flower programs (this interpreter's, else the first on PATH)."""
    local = Path(sys.executable).parent
    if all((local / name).exists() for name in FLOWER_PROGRAMS):
        return local
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeploymentFailed("flower-superlink not found: install flwr (pip install 'flwr[simulation]')")
    return Path(found).parent


@dataclass
class Deployment:
    """The processes of one local deployment and the files they use (all under ``workdir``)."""

    workdir: Path
    log_dir: Path
    bin_dir: Path
    superlink_port: int
    node_ports: list[int]
    certs: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port in Flower 1.42)."""
        return f"127.0.0.1:{self.superlink_port}"

    def env(self, home: str) -> dict[str, str]:
        """Environment of one Flower program: its own FLWR_HOME, no update check, Flower on PATH."""
        env = dict(os.environ)
        # SuperLink and SuperNodes start `flower-superexec` / `flwr-*app` by name, so PATH must find them.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.workdir / "homes" / home)
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.pop("PYTHONPATH", None)  # the apps come from the FAB the SuperLink ships, not from here
        return env

    def start(self, name: str, args: list[str], *, cwd: Path | None = None) -> subprocess.Popen:
        """Start one program in its own process group (so stopping it also stops what it spawned)."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self.logs.append(log)
        proc = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env(name), cwd=cwd or self.workdir,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run one short `flwr` CLI command against this deployment's SuperLink connection."""
        return subprocess.run([str(self.bin_dir / "flwr"), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env("cli"), cwd=self.workdir, check=False)

    def stop(self, name: str) -> None:
        """Stop one program and everything in its process group: SIGTERM, then SIGKILL after a grace."""
        proc = self.procs.get(name)
        if proc is None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # Children (ClientApps, the ServerApp) may outlive their parent's exit: always sweep the group.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)

    def kill(self, name: str) -> None:
        """Kill one program and its process group at once, as a crash or a pulled plug would."""
        proc = self.procs.get(name)
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)

    def stop_all(self) -> None:
        """Stop every program started here, newest first, and close the log files."""
        for name in reversed(list(self.procs)):
            self.stop(name)
        for log in self.logs:
            log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group led by ``proc`` (it was started in a new session); ignore if gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def write_flwr_config(home: Path, address: str, certs: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` of the `flwr` CLI: one connection to this deployment's SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(str(certs / 'ca.crt'))}" if certs else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "{address}"\n{security}\n')


def generate_certs(out: Path, num_node_keys: int = 0) -> Path:
    """CA, SuperLink certificate (and node keys) from docker/gen-certs.sh; needs bash and openssl."""
    if not GEN_CERTS.is_file() or shutil.which("openssl") is None:
        raise DeploymentFailed(f"TLS needs {GEN_CERTS} and openssl")
    done = subprocess.run(["bash", str(GEN_CERTS), str(out), str(num_node_keys)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise DeploymentFailed(f"gen-certs.sh failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def wait_for_port(deployment: Deployment, name: str, port: int, timeout_s: float) -> None:
    """Block until ``port`` on 127.0.0.1 accepts connections; fail early if ``name`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if deployment.procs[name].poll() is not None:
            raise DeploymentFailed(f"{name} exited with code {deployment.procs[name].returncode}; "
                                   f"see {deployment.log_dir / name}.log")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentFailed(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def online_nodes(deployment: Deployment) -> int:
    """How many SuperNodes the SuperLink reports online (``flwr supernode list --format json``)."""
    done = deployment.flwr("supernode", "list", CONNECTION, "--format", "json")
    try:
        nodes = json.loads(done.stdout).get("nodes", [])
    except (json.JSONDecodeError, AttributeError):
        return 0
    return sum(1 for node in nodes if node.get("status") == "online")


def check_alive(deployment: Deployment, names: Iterable[str]) -> None:
    """Fail fast when a program the run cannot do without has exited."""
    for name in names:
        code = deployment.procs[name].poll()
        if code is not None:
            raise DeploymentFailed(f"{name} exited with code {code} mid-run; see {deployment.log_dir / name}.log")


def wait_for_nodes(deployment: Deployment, expected: int, timeout_s: float) -> None:
    """Block until every SuperNode is online: the ServerApp learns the fleet once, when the run starts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [name for name, proc in deployment.procs.items() if proc.poll() is not None]
        if dead:
            raise DeploymentFailed(f"{dead[0]} exited early; see {deployment.log_dir / dead[0]}.log")
        if online_nodes(deployment) >= expected:
            return
        time.sleep(1.0)
    raise DeploymentFailed(f"fewer than {expected} SuperNodes online after {timeout_s:.0f} s")


def register_nodes(deployment: Deployment, count: int) -> None:
    """Register each SuperNode's public key with the SuperLink (SuperNode authentication)."""
    for i in range(count):
        done = deployment.flwr("supernode", "register", str(deployment.certs / f"supernode-{i}.pub"), CONNECTION)
        if done.returncode != 0:
            raise DeploymentFailed(f"flwr supernode register failed for node {i}: {done.stdout.strip()[-200:]}")


def start_superlink(deployment: Deployment, *, node_auth: bool) -> None:
    """flower-superlink on 127.0.0.1; ServerApps run in the separate SuperExec (process isolation)."""
    certs = deployment.certs
    security = (["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                 "--ssl-keyfile", str(certs / "server.key")] if certs else ["--insecure"])
    deployment.start("superlink", ["flower-superlink", *security, "--host", "127.0.0.1",
                                   "--port", str(deployment.superlink_port), "--isolation", "process",
                                   "--disable-runtime-dependency-installation",
                                   *(["--enable-supernode-auth"] if node_auth else [])])
    wait_for_port(deployment, "superlink", deployment.superlink_port, timeout_s=60.0)


def _dial_security(deployment: Deployment) -> list[str]:
    """Flags of a program dialling the SuperLink: the CA to verify it, or plain HTTP."""
    return ["--root-certificates", str(deployment.certs / "ca.crt")] if deployment.certs else ["--insecure"]


def start_serverapp(deployment: Deployment) -> None:
    """The SuperExec that launches the ServerApp of each submitted run."""
    deployment.start("serverapp", ["flower-superexec", *_dial_security(deployment),
                                   "--runtime-api-address", deployment.address])


def start_supernodes(deployment: Deployment, devices: Sequence[Device], *, node_auth: bool) -> None:
    """One flower-supernode per device, each with its partition and tier in ``--node-config``."""
    for device, port in zip(devices, deployment.node_ports):
        auth = (["--auth-supernode-private-key", str(deployment.certs / f"supernode-{device.partition_id}")]
                if node_auth else [])
        deployment.start(f"supernode-{device.partition_id}", [
            "flower-supernode", *_dial_security(deployment), "--superlink", deployment.address, *auth,
            "--port", str(port), "--node-config", node_config(device, len(devices))])


@dataclass
class RunWatch:
    """What the `flwr run` log stream showed: when the first round started."""

    first_round_at: float | None = None


def _follow(stream, log_path: Path, watch: RunWatch) -> None:
    """Copy `flwr run --stream` output to its log file (seconds since submission first), noting round 1."""
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        for line in stream:
            log.write(f"{time.monotonic() - started:7.1f}s {line}")
            log.flush()
            if watch.first_round_at is None and ROUND_MARKER in line:
                watch.first_round_at = time.monotonic()


def submit_run(deployment: Deployment, app_dir: Path, run_config: Path, *, timeout_s: float,
               kill_node: str | None, kill_after_s: float | None) -> dict:
    """`flwr run APP fed-deq --stream`; optionally kill one SuperNode ``kill_after_s`` into round 1."""
    proc = subprocess.Popen([str(deployment.bin_dir / "flwr"), "run", str(app_dir), CONNECTION, "--stream",
                             "--run-config", str(run_config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=deployment.env("cli"), cwd=app_dir, start_new_session=True)
    deployment.procs["flwr-run"] = proc
    watch = RunWatch()
    reader = threading.Thread(target=_follow, args=(proc.stdout, deployment.log_dir / "flwr-run.log", watch),
                              daemon=True)
    reader.start()
    started, submitted_at, killed_at = time.monotonic(), time.time(), None
    while proc.poll() is None:
        now = time.monotonic()
        if now - started > timeout_s:
            raise DeploymentFailed(f"run did not finish within {timeout_s:.0f} s; see {deployment.log_dir}")
        check_alive(deployment, ("superlink", "serverapp"))
        if (kill_node and killed_at is None and watch.first_round_at is not None
                and now - watch.first_round_at >= (kill_after_s or 0.0)):
            deployment.kill(kill_node)
            killed_at = now - started
        time.sleep(0.2)
    reader.join(timeout=5.0)
    return {"returncode": proc.returncode, "wall_time_s": time.monotonic() - started, "submitted_at": submitted_at,
            "killed_at_s": killed_at}


def write_run_config(path: Path, scenario_path: Path, out_dir: Path, overrides: Sequence[str]) -> Path:
    """A run-config TOML file (values with spaces or quotes survive a file, not a `k=v` string)."""
    sets = " ".join(shlex.quote(item) for item in overrides)
    # JSON string literals are valid TOML basic strings.
    path.write_text(f"scenario = {json.dumps(str(scenario_path))}\nout-dir = {json.dumps(str(out_dir))}\n"
                    f"set = {json.dumps(sets)}\n")
    return path


def check_outputs(out_dir: Path, outcome: dict, log_dir: Path) -> dict:
    """The run's summary.json, after checking `flwr run` succeeded and the output files exist."""
    # Files older than the submission are left over from an earlier run in the same folder.
    missing = [name for name in ("metrics.jsonl", "summary.json")
               if not (out_dir / name).is_file() or (out_dir / name).stat().st_mtime < outcome["submitted_at"]]
    if outcome["returncode"] != 0 or missing:
        reason = f"no new {', '.join(missing)}" if missing else f"flwr run exited {outcome['returncode']}"
        raise DeploymentFailed(f"run failed ({reason}); logs in {log_dir}")
    return json.loads((out_dir / "summary.json").read_text())


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
    deployment = Deployment(workdir=workdir, log_dir=log_dir, bin_dir=flower_bin_dir(),
                            superlink_port=free_port(), node_ports=[free_port() for _ in range(fleet_size)])
    try:
        if tls:
            deployment.certs = generate_certs(workdir / "certs", fleet_size if node_auth else 0)
        write_flwr_config(workdir / "homes" / "cli", deployment.address, deployment.certs)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return deployment


def run_local_deployment(scenario_path: str | Path, out_dir: str | Path, *, overrides: Sequence[str] = (),
                         tls: bool = False, node_auth: bool = False, kill_node_after_s: float | None = None,
                         timeout_s: float = 1800.0, app_dir: str | Path = PROJECT_DIR) -> dict:
    """Run ``scenario_path`` on a real SuperLink + SuperExec + one SuperNode per client on 127.0.0.1.

    Returns the run's summary (summary.json) plus a ``deployment`` entry (ports, wall time, killed node).
    ``kill_node_after_s`` kills the last SuperNode that many seconds after the first round starts, to show
    the run survives a lost node. ``node_auth`` (needs ``tls``) registers every SuperNode's key first.
    Every process started here is stopped before returning, also on errors and Ctrl-C.
    """
    if node_auth and not tls:
        raise InputError("deploy-local: --node-auth needs --tls (Flower authenticates SuperNodes over TLS only)")
    scenario_path, out_dir = Path(scenario_path).resolve(), Path(out_dir).resolve()
    scenario = load_scenario(scenario_path, overrides=overrides)
    devices = build_fleet(scenario)
    out_dir.mkdir(parents=True, exist_ok=True)
    deployment = _new_deployment(out_dir, len(devices), tls=tls, node_auth=node_auth)
    try:
        with _sigterm_as_interrupt():
            start_superlink(deployment, node_auth=node_auth)
            if node_auth:
                register_nodes(deployment, len(devices))
            start_serverapp(deployment)
            start_supernodes(deployment, devices, node_auth=node_auth)
            wait_for_nodes(deployment, len(devices), timeout_s=120.0)
            run_config = write_run_config(deployment.workdir / "run-config.toml", scenario_path, out_dir, overrides)
            victim = f"supernode-{devices[-1].partition_id}" if kill_node_after_s is not None else None
            outcome = submit_run(deployment, Path(app_dir).resolve(), run_config, timeout_s=timeout_s,
                                 kill_node=victim, kill_after_s=kill_node_after_s)
    finally:
        deployment.stop_all()
        shutil.rmtree(deployment.workdir, ignore_errors=True)
    summary = check_outputs(out_dir, outcome, deployment.log_dir)
    summary["deployment"] = {
        "superlink": deployment.address, "node_ports": deployment.node_ports, "tls": tls, "node_auth": node_auth,
        "wall_time_s": round(outcome["wall_time_s"], 2),
        "killed_node": victim if outcome["killed_at_s"] is not None else None,
        "killed_at_s": None if outcome["killed_at_s"] is None else round(outcome["killed_at_s"], 2),
    }
    return summary


# --------------------------------------------------------------------------------------------------------
# Command line: `fed-deq compose` and `fed-deq deploy-local`.


def cmd_compose(args: argparse.Namespace) -> int:
    """Write the compose file (and with --tls its TLS override) for a scenario's fleet."""
    written = write_compose(args.scenario, args.out, image=args.image, tls=args.tls, overrides=args.overrides,
                            run_name=args.run_name)
    services = yaml.safe_load(written[0].read_text())["services"]
    nodes = sum(name.startswith("supernode-") for name in services)
    print(f"{nodes} SuperNodes; wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """Run a scenario on a loopback SuperLink/SuperNode deployment; exit 1 if the run fails."""
    try:
        summary = run_local_deployment(args.scenario, args.out, overrides=args.overrides, tls=args.tls,
                                       node_auth=args.node_auth, kill_node_after_s=args.kill_node_after,
                                       timeout_s=args.timeout)
    except DeploymentFailed as exc:
        print(f"fed-deq: deployment failed: {exc}", file=sys.stderr)
        return 1
    info = summary["deployment"]
    print(f"finished {summary.get('rounds')} rounds in {info['wall_time_s']} s on {info['superlink']}; "
          f"final accuracy {summary.get('final_accuracy')}; outputs in {args.out}")
    return 0


def _scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """SCENARIO and repeatable --set, as in every other fed-deq command."""
    parser.add_argument("scenario", help="scenario YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one scenario value (repeatable); the run applies it too")


def register(subparsers) -> None:
    """Add the `compose` and `deploy-local` sub-commands to the fed-deq command line."""
    p = subparsers.add_parser("compose", help="write a docker-compose file for a scenario's fleet")
    _scenario_arguments(p)
    p.add_argument("--out", default="docker-compose.yml", help="compose file to write (default docker-compose.yml)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"image of every service (default {DEFAULT_IMAGE})")
    p.add_argument("--tls", action="store_true", help="also write the TLS override <stem>.tls.yml beside it")
    p.add_argument("--run-name", default=None, help="outputs go to ./runs/NAME (default: scenario file stem)")
    p.set_defaults(func=cmd_compose)
    p = subparsers.add_parser("deploy-local", help="run a scenario on a real SuperLink + SuperNodes on 127.0.0.1")
    _scenario_arguments(p)
    p.add_argument("--out", required=True, help="output folder (metrics.jsonl, summary.json, deploy-logs/)")
    p.add_argument("--tls", action="store_true", help="TLS with a throwaway CA (docker/gen-certs.sh)")
    p.add_argument("--node-auth", action="store_true", help="SuperNode authentication (needs --tls)")
    p.add_argument("--kill-node-after", type=float, default=None, metavar="SECONDS",
                   help="kill the last SuperNode this long after round 1 starts (fault drill)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    p.set_defaults(func=cmd_deploy_local)
