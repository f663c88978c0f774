"""Compose files for a scenario's fleet (`fed-deq compose`): pure generation, no processes, no Docker.

A Compose file (docker-compose 1.29 compatible) with a ``superlink``, a ``serverapp`` (a SuperExec that runs
the ServerApp), one ``supernode-<i>`` per client with CPU and memory limits derived from its tier's compute
speed, and a ``submit`` service (profile ``submit``) that starts the run. Every container joins the
SuperLink's network namespace, so all Flower traffic is on 127.0.0.1. Command lines come from
tools/flower_cmd.py, shared with the local supervisor. See docs/deploy.md.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fed_deq.errors import InputError
from fed_deq.fleet import build_fleet
from fed_deq.scenario import Scenario, load_scenario
from tools import flower_cmd
from tools.args import checked_out_dir
from tools.flower_cmd import CONNECTION, TLS_CONNECTION, Certs

DEFAULT_IMAGE = "fed-deq:latest"
# Every container shares the SuperLink's network namespace, so each SuperNode's own Runtime API (used by
# the SuperExec inside its container) needs a port of its own.
SUPERLINK_PORT = 9091
NODE_PORT_BASE = 9100
CONTAINER_APP_DIR = "/app"
CONTAINER_RUNS_DIR = "/app/runs"
CONTAINER_SCENARIO_DIR = "/etc/fed-deq/scenarios"  # the scenario keeps its file name: runs are named after it
CONTAINER_CERTS = Certs("/certs")
# Tier → container limits. The fastest tier gets MAX_NODE_CPUS; slower tiers get CPU in proportion to their
# compute speed (never below MIN_NODE_CPUS). Memory: NODE_MEM_FLOOR_MIB (a SuperNode, its SuperExec and a
# ClientApp importing torch fit in about 0.7 GiB) plus NODE_MEM_SPAN_MIB in proportion to speed.
MAX_NODE_CPUS = 1.0
MIN_NODE_CPUS = 0.1
NODE_MEM_FLOOR_MIB = 1024
NODE_MEM_SPAN_MIB = 1024
SUPERLINK_LIMITS = (("cpus", 0.5), ("mem_limit", "1g"))     # measured peak: about 110 MiB
SERVERAPP_LIMITS = (("cpus", 1.0), ("mem_limit", "3g"))     # measured peak: about 450 MiB (digits)


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

    @property
    def container_scenario(self) -> str:
        """Where the ServerApp container sees the scenario file."""
        return f"{CONTAINER_SCENARIO_DIR}/{self.name}.yaml"


def _service(image: str, command: list[str], **extra) -> dict:
    """A service running one Flower program (the update check off: the containers have no network)."""
    service = {"image": image, "command": command, "environment": {"FLWR_DISABLE_UPDATE_CHECK": "1"}}
    service.update(extra)
    return service


def _in_superlink_namespace() -> dict:
    """Service keys that put a container in the SuperLink's network namespace (its 127.0.0.1)."""
    return {"network_mode": "service:superlink", "depends_on": ["superlink"]}


def compose_services(scenario: Scenario, opts: ComposeOptions, *, tls: bool = False) -> dict[str, dict]:
    """All services of the federation (the full definition; an override keeps only what changes)."""
    certs = CONTAINER_CERTS if tls else None
    link = flower_cmd.address(opts.superlink_port)
    volumes = [f"./runs:{CONTAINER_RUNS_DIR}", f"{opts.scenario_file}:{opts.container_scenario}:ro"]
    services = {
        "superlink": _service(opts.image, flower_cmd.superlink(opts.superlink_port, certs=certs),
                              **dict(SUPERLINK_LIMITS)),
        "serverapp": _service(opts.image, flower_cmd.serverapp_superexec(link, certs=certs),
                              **_in_superlink_namespace(), **dict(SERVERAPP_LIMITS), volumes=volumes),
    }
    devices = build_fleet(scenario)
    limits = tier_limits(scenario)
    for device in devices:
        tier = limits[device.tier]
        command = flower_cmd.supernode(link, opts.node_port_base + device.partition_id,
                                       flower_cmd.node_config(device, len(devices)), certs=certs)
        services[f"supernode-{device.partition_id}"] = _service(
            opts.image, command, **_in_superlink_namespace(), cpus=tier.cpus, mem_limit=tier.mem_limit,
            labels={"fed-deq.tier": device.tier, "fed-deq.partition-id": str(device.partition_id)})
    run_config = flower_cmd.run_config_string(opts.container_scenario, f"{CONTAINER_RUNS_DIR}/{opts.run_name}",
                                              opts.overrides)
    submit = flower_cmd.flwr_run(CONTAINER_APP_DIR, TLS_CONNECTION if tls else CONNECTION, run_config)
    services["submit"] = _service(opts.image, submit, **_in_superlink_namespace(), profiles=["submit"])
    return services


def _tls_override(scenario: Scenario, opts: ComposeOptions) -> dict[str, dict]:
    """Per service: the TLS command and the certificate folder mounted read-only."""
    services = compose_services(scenario, opts, tls=True)
    return {name: {"command": svc["command"], "volumes": [f"./certs:{CONTAINER_CERTS.folder}:ro"]}
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


def checked_out_file(value: str | Path, *, flag: str = "--out") -> Path:
    """A file path that can be written: not a folder, in a folder that exists or can be made (else InputError)."""
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{flag}: {path} is a folder; name the compose file, e.g. {path / 'docker-compose.yml'}")
    checked_out_dir(path.parent, flag=flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag}: {path} is not writable")
    return path


def write_compose(scenario: str | Path, path: str | Path, *, image: str = DEFAULT_IMAGE, tls: bool = False,
                  overrides: Iterable[str] = (), run_name: str | None = None, scenario_file: str | None = None,
                  superlink_port: int = SUPERLINK_PORT, node_port_base: int = NODE_PORT_BASE) -> list[Path]:
    """Write a compose file for the fleet of scenario file ``scenario`` (with ``tls`` also its TLS override).

    The scenario file is mounted into the ServerApp container and the run re-applies ``overrides`` to it, so
    fleet and run agree. ``scenario_file`` is the volume source as written (default: the file's path relative
    to the compose file's folder); ``run_name`` names the output folder ``./runs/<run_name>`` (default: the
    scenario file's stem). Every input is checked before anything is written (InputError). Returns the
    written paths.
    """
    overrides = tuple(overrides)
    scenario_path, path = Path(scenario), checked_out_file(path)
    override = checked_out_file(tls_override_path(path)) if tls else None
    loaded = load_scenario(scenario_path, overrides=overrides)
    opts = ComposeOptions(image=image, scenario_file=scenario_file or _mount_source(scenario_path, path.parent),
                          run_name=run_name or scenario_path.stem, name=scenario_path.stem,
                          overrides=overrides, superlink_port=superlink_port, node_port_base=node_port_base)
    texts = {path: _header(loaded, opts, "fed-deq federation: SuperLink, ServerApp SuperExec, one SuperNode "
                                         "per client.") + _dump({"services": compose_services(loaded, opts)})}
    if override is not None:
        texts[override] = (_header(loaded, opts, f"TLS override for {path.name}: certificates from "
                                                 "`bash docker/gen-certs.sh certs`.")
                           + _dump({"services": _tls_override(loaded, opts)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in texts.items():
        target.write_text(text)
    return list(texts)


def _mount_source(scenario_path: Path, compose_dir: Path) -> str:
    """The scenario file as a Compose volume source: ``./relative/path`` from the compose file's folder."""
    relative = os.path.relpath(scenario_path.resolve(), compose_dir.resolve())
    return relative if relative.startswith("..") else f"./{relative}"


def supernode_count(compose_file: Path) -> int:
    """How many SuperNode services a written compose file defines."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    return sum(name.startswith("supernode-") for name in services)
