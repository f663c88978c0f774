"""The processes of a local deployment: free ports, Flower's programs, process groups, orderly stops.

Each program runs in its own session (process group) with its own ``FLWR_HOME`` and a log file, so
stopping it also stops what it spawned (SuperExecs, ``flwr-serverapp``, ``flwr-clientapp``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fed_deq.errors import RunFailed
from tools import flower_cmd
from tools.flower_cmd import Certs

FLOWER_PROGRAMS = ("flower-superlink", "flower-superexec", "flower-supernode", "flwr")
STOP_GRACE_S = 5.0


class DeploymentFailed(RunFailed):
    """A deployment started but did not produce a finished run (the CLI exits 1)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((flower_cmd.LOOPBACK, 0))
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
    certs: Certs | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port in Flower 1.42)."""
        return flower_cmd.address(self.superlink_port)

    def env(self, home: str) -> dict[str, str]:
        """Environment of one Flower program: its own FLWR_HOME, no update check, Flower on PATH."""
        env = dict(os.environ)
        # SuperLink and SuperNodes start `flower-superexec` / `flwr-*app` by name, so PATH must find them.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.workdir / "homes" / home)
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.pop("PYTHONPATH", None)  # the apps come from the FAB the SuperLink ships, not from here
        return env

    def start(self, name: str, command: list[str], *, cwd: Path | None = None, home: str | None = None,
              pipe: bool = False) -> subprocess.Popen:
        """Start one program in its own process group (so stopping it also stops what it spawned).

        Its output goes to ``<log_dir>/<name>.log``, or with ``pipe`` to the returned process's ``stdout``
        (text). ``home`` names its FLWR_HOME (default: its own, ``name``).
        """
        if pipe:
            output = subprocess.PIPE
        else:
            output = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
            self.logs.append(output)
        proc = subprocess.Popen([str(self.bin_dir / command[0]), *command[1:]], stdout=output,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=pipe,
                                errors="replace" if pipe else None,
                                env=self.env(home or name), cwd=cwd or self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def cli(self, command: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run one short `flwr` CLI command (from tools.flower_cmd) against this deployment's SuperLink."""
        return subprocess.run([str(self.bin_dir / command[0]), *command[1:]], capture_output=True, text=True,
                              timeout=timeout, env=self.env("cli"), cwd=self.workdir, check=False)

    def check_alive(self, names: Iterable[str], *, during: str) -> None:
        """Fail fast when a program the run cannot do without has exited; ``during`` says what was going on."""
        for name in names:
            code = self.procs[name].poll()
            if code is not None:
                raise DeploymentFailed(f"{name} exited with code {code} during {during}; "
                                       f"see {self.log_dir / name}.log")

    def stop(self, name: str) -> None:
        """Stop one program and everything in its process group: SIGTERM, then SIGKILL after a grace."""
        proc = self.procs.get(name)
        if proc is None:
            return
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
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


def wait_for_port(deployment: Deployment, name: str, port: int, timeout_s: float) -> None:
    """Block until ``port`` on 127.0.0.1 accepts connections; fail early if ``name`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment.check_alive([name], during="start-up")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((flower_cmd.LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentFailed(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s; "
                           f"see {deployment.log_dir / name}.log")
