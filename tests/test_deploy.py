"""Deployment: compose generation, and real SuperLink/SuperExec/SuperNode federations on 127.0.0.1.

The federation tests start real Flower processes (one to two minutes per deployment, run concurrently) and
check afterwards that none of them is left running. Nothing here downloads anything: the scenario uses
scikit-learn's bundled digits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tools import deploy
from tools.cli import main as cli_main
from fed_deq.errors import InputError
from fed_deq.fleet import build_fleet
from fed_deq.scenario import load_scenario

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
TINY = """\
seed: 0
dataset: {name: digits, test_fraction: 0.2, validation_fraction: 0.1, partition: {kind: iid}}
model: {cell: mlp, width: 16, eval_iterations: 10}
fleet:
  tiers:
    - {name: slow, count: 1, compute_gflops: 0.01, bandwidth_mbps: 10}
    - {name: fast, count: 2, compute_gflops: 0.05, bandwidth_mbps: 50}
training: {rounds: 2, clients_per_round: 3, deadline_s: 2.0, min_iterations: 2, max_iterations: 8}
fusion: {rule: quality}
"""
FLOWER_NAMES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A 3-client, 2-round digits scenario."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def flower_processes() -> dict[int, str]:
    """Command lines of running Flower programs (by pid), zombies excluded."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(name in cmdline for name in FLOWER_NAMES):
            found[int(entry.name)] = cmdline
    return found


def leftovers(summary: dict) -> list[str]:
    """Flower processes still running that belong to the deployment described by ``summary``."""
    info = summary["deployment"]
    marks = [info["superlink"], *(f"--port {port}" for port in info["node_ports"]),
             *(f"127.0.0.1:{port}" for port in info["node_ports"])]
    return [cmd for cmd in flower_processes().values() if any(mark in cmd for mark in marks)]


def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl as a list of records."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------
# Compose files.


def test_tier_limits_scale_with_compute_speed(tiny: Path) -> None:
    limits = deploy.tier_limits(load_scenario(tiny))
    assert limits["fast"].cpus == deploy.MAX_NODE_CPUS
    assert limits["slow"].cpus == pytest.approx(0.2)  # 0.01 / 0.05 GFLOP/s
    assert limits["slow"].mem_mib < limits["fast"].mem_mib
    assert limits["fast"].mem_limit == f"{deploy.NODE_MEM_FLOOR_MIB + deploy.NODE_MEM_SPAN_MIB}m"
    assert all(limit.mem_mib % 64 == 0 for limit in limits.values())


def test_compose_has_one_supernode_per_client_with_tier_limits(tiny: Path, tmp_path: Path) -> None:
    scenario = load_scenario(tiny)
    base, _ = deploy.write_compose(tiny, tmp_path / "compose.yml", tls=True)
    services = yaml.safe_load(base.read_text())["services"]
    devices = build_fleet(scenario)
    nodes = {name: svc for name, svc in services.items() if name.startswith("supernode-")}
    assert set(services) == {"superlink", "serverapp", "submit", *nodes}
    assert len(nodes) == len(devices) == 3
    limits = deploy.tier_limits(scenario)
    ports = set()
    for device in devices:
        svc = nodes[f"supernode-{device.partition_id}"]
        command = svc["command"]
        assert command[command.index("--node-config") + 1] == (
            f"partition-id={device.partition_id} num-partitions=3 tier='{device.tier}'")
        assert (svc["cpus"], svc["mem_limit"]) == (limits[device.tier].cpus, limits[device.tier].mem_limit)
        assert svc["network_mode"] == "service:superlink" and "--insecure" in command
        ports.add(command[command.index("--port") + 1])
    assert len(ports) == 3  # nodes share one network namespace: their Runtime API ports must differ
    assert "127.0.0.1" == services["superlink"]["command"][services["superlink"]["command"].index("--host") + 1]
    assert f"./{tiny.name}:/etc/fed-deq/scenarios/tiny.yaml:ro" in services["serverapp"]["volumes"]
    assert services["submit"]["profiles"] == ["submit"]
    assert services["submit"]["command"][-1] == ("scenario='/etc/fed-deq/scenarios/tiny.yaml' "
                                                 "out-dir='/app/runs/tiny' set=''")


def test_tls_override_secures_every_service(tiny: Path, tmp_path: Path) -> None:
    _, tls = deploy.write_compose(tiny, tmp_path / "compose.yml", tls=True)
    assert tls.name == "compose.tls.yml"
    services = yaml.safe_load(tls.read_text())["services"]
    assert len(services) == 3 + 3
    for name, svc in services.items():
        assert "--insecure" not in svc["command"], name
        assert svc["volumes"] == ["./certs:/certs:ro"]
    assert "--ssl-keyfile" in services["superlink"]["command"]
    assert "--root-certificates" in services["supernode-0"]["command"]
    assert deploy.TLS_CONNECTION in services["submit"]["command"]


def test_compose_passes_overrides_to_the_run(tiny: Path, tmp_path: Path) -> None:
    overrides = ["training.rounds=1", "fleet.tiers.fast.count=3"]
    (base,) = deploy.write_compose(tiny, tmp_path / "c.yml", overrides=overrides, run_name="r1")
    services = yaml.safe_load(base.read_text())["services"]
    assert sum(name.startswith("supernode-") for name in services) == 4
    assert services["submit"]["command"][-1].endswith("out-dir='/app/runs/r1' set='training.rounds=1 "
                                                      "fleet.tiers.fast.count=3'")


def test_quote_value_rejects_text_with_both_quotes() -> None:
    assert deploy.quote_value("it's", "x") == '"it\'s"'
    with pytest.raises(InputError, match="both quote characters"):
        deploy.quote_value("'\"", "--set overrides")


def test_compose_cli_writes_files_and_maps_bad_input_to_exit_2(tiny: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "docker-compose.yml"
    assert cli_main(["compose", str(tiny), "--out", str(out), "--tls"]) == 0
    assert out.is_file() and (tmp_path / "sub" / "docker-compose.tls.yml").is_file()
    assert cli_main(["compose", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert cli_main(["compose", str(tiny), "--set", "training.nope=1"]) == 2
    assert "fed-deq: error:" in capsys.readouterr().err


def test_top_level_compose_matches_default_scenario(tmp_path: Path) -> None:
    """docker-compose.yml is `fed-deq compose scenarios/default.yaml --tls`, regenerated after changes."""
    fresh = deploy.write_compose(ROOT / "scenarios" / "default.yaml", tmp_path / "docker-compose.yml", tls=True,
                                 scenario_file="./scenarios/default.yaml")
    for path in fresh:
        committed = yaml.safe_load((ROOT / path.name).read_text())
        assert committed == yaml.safe_load(path.read_text()), f"regenerate {path.name}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_files(tiny: Path, tmp_path: Path) -> None:
    base, tls = deploy.write_compose(tiny, tmp_path / "docker-compose.yml", tls=True)
    host = ROOT / "docker" / "compose.host-network.yml"
    for files in ([base], [base, tls], [base, tls, host], [ROOT / "docker-compose.yml"],
                  [ROOT / "docker-compose.yml", ROOT / "docker-compose.tls.yml", host]):
        args = [arg for path in files for arg in ("-f", str(path))]
        done = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True,
                              cwd=files[0].parent, check=False)
        assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------------------
# Real federations on loopback. The three runs start together (each spends most of its minute or two
# waiting on Flower's polling and heartbeat timers) and each test waits for and checks its own.


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Plain, node-killed and TLS + SuperNode-auth deployments of the tiny scenario, running concurrently."""
    root = tmp_path_factory.mktemp("federations")
    scenario = root / "tiny.yaml"
    scenario.write_text(TINY)
    variants = {"plain": {"overrides": ["model.width=12", "fusion.score=probe"]}, "killed": {"kill_node_after_s": 1.0},
                "tls": {"tls": True, "node_auth": True}}
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        runs = {name: (root / name, pool.submit(deploy.run_local_deployment, scenario, root / name,
                                                timeout_s=600, **kwargs))
                for name, kwargs in variants.items()}
        yield runs


def finished(federations: dict, name: str) -> tuple[Path, dict]:
    """Output folder and summary of one of the concurrent deployments (re-raises its failure)."""
    out, future = federations[name]
    return out, future.result(timeout=900)


def test_three_node_federation_completes_two_rounds(federations: dict) -> None:
    out, summary = finished(federations, "plain")
    records = read_metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients_completed"] == 3 for r in records)
    assert summary["rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert yaml.safe_load((out / "scenario.yaml").read_text())["model"]["width"] == 12  # --set reached the run
    assert all(r["probe"]["clients"] == 3 for r in records)  # the server scored each model on its probe set
    assert (out / "accuracy.png").is_file() and (out / "deploy-logs" / "superlink.log").is_file()
    assert summary["deployment"]["killed_node"] is None
    assert leftovers(summary) == []


def test_killed_supernode_does_not_stop_the_run(federations: dict) -> None:
    out, summary = finished(federations, "killed")
    info = summary["deployment"]
    assert info["killed_node"] == "supernode-2" and info["killed_at_s"] < info["wall_time_s"]
    records = read_metrics(out)
    assert [r["round"] for r in records] == [1, 2]  # every round finished ...
    assert all(r["clients_completed"] >= 2 for r in records)  # ... with the surviving nodes
    assert any(r["clients_completed"] < 3 for r in records)  # and the kill cost at least one reply
    # The loss is filed under the killed node's partition (2), even though the SuperLink sends the error.
    assert all(set(r["failed"]) | set(r["dropped"]) <= {"2"} for r in records)
    assert any("2" in r["failed"] or "2" in r["dropped"] for r in records)
    assert leftovers(summary) == []


def test_tls_deployment_with_supernode_auth(federations: dict) -> None:
    out, summary = finished(federations, "tls")
    assert [r["round"] for r in read_metrics(out)] == [1, 2]
    assert summary["deployment"]["tls"] and summary["deployment"]["node_auth"]
    log = (out / "deploy-logs" / "superlink.log").read_text()
    assert "insecure" not in log.lower()  # Flower warns loudly when it runs without TLS
    assert "authentication is disabled" not in log
    assert leftovers(summary) == []


def test_failed_deployment_stops_everything(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports: list[int] = []
    pick = deploy.free_port
    monkeypatch.setattr(deploy, "free_port", lambda: ports.append(pick()) or ports[-1])
    with pytest.raises(deploy.DeploymentFailed, match="did not finish"):
        deploy.run_local_deployment(tiny, tmp_path / "run", timeout_s=1.0)
    assert len(ports) == 4
    marks = [f"127.0.0.1:{port}" for port in ports] + [f"--port {port}" for port in ports]
    assert [cmd for cmd in flower_processes().values() if any(mark in cmd for mark in marks)] == []


def test_deploy_local_cli_rejects_bad_input(tiny: Path, tmp_path: Path) -> None:
    assert cli_main(["deploy-local", str(tiny), "--out", str(tmp_path / "o"), "--node-auth"]) == 2
    assert cli_main(["deploy-local", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
