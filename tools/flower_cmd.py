"""The one place that spells Flower 1.42's command lines and option strings for fed-deq's deployments.

Compose generation (tools/compose.py) and the local supervisor (tools/supervisor.py) both build their
``flower-superlink``, ``flower-superexec``, ``flower-supernode`` and ``flwr`` invocations here, so a
container and a local process of the same role always get the same flags. Everything is pure: lists of
strings and text, parameterised by address, ports, TLS material and paths as the program will see them
(``/certs`` inside a container, a temporary folder on this machine).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from fed_deq.errors import InputError
from fed_deq.fleet import Device

LOOPBACK = "127.0.0.1"
CONNECTION = "fed-deq"          # the `flwr` CLI connection: [superlink.fed-deq] in FLWR_HOME/config.toml
TLS_CONNECTION = "fed-deq-tls"  # the same SuperLink, verified against the CA (the image's config has both)


@dataclass(frozen=True)
class Certs:
    """TLS material as written by docker/gen-certs.sh, in folder ``folder`` as the program sees it."""

    folder: str

    @property
    def ca(self) -> str:
        """The throwaway CA's certificate: what every client of the SuperLink verifies it against."""
        return f"{self.folder}/ca.crt"

    @property
    def server_cert(self) -> str:
        """The SuperLink's certificate (valid for 127.0.0.1, localhost and superlink)."""
        return f"{self.folder}/server.pem"

    @property
    def server_key(self) -> str:
        """The SuperLink's private key."""
        return f"{self.folder}/server.key"

    def node_key(self, partition_id: int) -> str:
        """SuperNode ``partition_id``'s private authentication key (EC P-384, OpenSSH format)."""
        return f"{self.folder}/supernode-{partition_id}"

    def node_public_key(self, partition_id: int) -> str:
        """The public half of :meth:`node_key`, registered with the SuperLink."""
        return f"{self.node_key(partition_id)}.pub"


def address(port: int, host: str = LOOPBACK) -> str:
    """``host:port`` of the SuperLink (Fleet, Control and Runtime APIs share one port in Flower 1.42)."""
    return f"{host}:{port}"


def dial_security(certs: Certs | None) -> list[str]:
    """Flags of a program that dials the SuperLink: verify its certificate, or plain HTTP."""
    return ["--root-certificates", certs.ca] if certs else ["--insecure"]


def superlink(port: int, *, certs: Certs | None = None, node_auth: bool = False,
              host: str = LOOPBACK) -> list[str]:
    """``flower-superlink`` on ``host:port``; ServerApps run in a separate SuperExec (process isolation).

    ``--disable-runtime-dependency-installation`` stops it running ``uv sync`` for each app, which needs a
    network; ``node_auth`` (needs ``certs``) admits only SuperNodes whose public key was registered.
    """
    if node_auth and certs is None:
        raise ValueError("SuperNode authentication needs TLS (Flower authenticates SuperNodes over TLS only)")
    security = (["--ssl-ca-certfile", certs.ca, "--ssl-certfile", certs.server_cert,
                 "--ssl-keyfile", certs.server_key] if certs else ["--insecure"])
    return ["flower-superlink", *security, "--host", host, "--port", str(port), "--isolation", "process",
            "--disable-runtime-dependency-installation", *(["--enable-supernode-auth"] if node_auth else [])]


def serverapp_superexec(superlink_address: str, *, certs: Certs | None = None) -> list[str]:
    """A ``flower-superexec`` that picks up each submitted run and starts its ServerApp."""
    return ["flower-superexec", *dial_security(certs), "--runtime-api-address", superlink_address]


def supernode(superlink_address: str, port: int, node_config: str, *, certs: Certs | None = None,
              auth_key: str | None = None) -> list[str]:
    """One ``flower-supernode``; ``port`` is its own Runtime API (distinct per node on a shared loopback)."""
    auth = ["--auth-supernode-private-key", auth_key] if auth_key else []
    return ["flower-supernode", *dial_security(certs), "--superlink", superlink_address, *auth,
            "--port", str(port), "--node-config", node_config]


def flwr_run(app_dir: str, connection: str, run_config: str) -> list[str]:
    """``flwr run`` of the app in ``app_dir``, streaming its log until the run ends.

    ``run_config`` is either a ``k=v`` string (see :func:`run_config_string`) or a TOML file's path.
    """
    return ["flwr", "run", app_dir, connection, "--stream", "--run-config", run_config]


def register_node(public_key: str, connection: str = CONNECTION) -> list[str]:
    """``flwr supernode register``: admit the SuperNode holding the private half of ``public_key``."""
    return ["flwr", "supernode", "register", public_key, connection]


def list_nodes(connection: str = CONNECTION) -> list[str]:
    """``flwr supernode list`` as JSON: which SuperNodes the SuperLink knows and whether they are online."""
    return ["flwr", "supernode", "list", connection, "--format", "json"]


def connection_toml(superlink_address: str, *, certs: Certs | None = None, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one default connection, ``name``, to the SuperLink."""
    security = f"root-certificates = {json.dumps(certs.ca)}" if certs else "insecure = true"
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
            f'address = "{superlink_address}"\n{security}\n')


# --------------------------------------------------------------------------------------------------------
# Option strings: --node-config and the run config.


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


def _run_config(scenario_path: str, out_dir: str, overrides: Sequence[str]) -> dict[str, str]:
    """The ServerApp's run config (server/app.py): scenario path, output folder, the ``--set`` overrides."""
    return {"scenario": scenario_path, "out-dir": out_dir, "set": " ".join(shlex.quote(o) for o in overrides)}


def run_config_string(scenario_path: str, out_dir: str, overrides: Sequence[str]) -> str:
    """The run config as a ``flwr run --run-config`` string (values may not hold both quote characters)."""
    what = {"scenario": "scenario path", "out-dir": "output folder", "set": "--set overrides"}
    return " ".join(f"{key}={quote_value(value, what[key])}"
                    for key, value in _run_config(scenario_path, out_dir, overrides).items())


def run_config_toml(scenario_path: str, out_dir: str, overrides: Sequence[str]) -> str:
    """The run config as a TOML file's text: values with spaces or both quotes survive a file."""
    # JSON string literals are valid TOML basic strings.
    return "".join(f"{key} = {json.dumps(value)}\n"
                   for key, value in _run_config(scenario_path, out_dir, overrides).items())
