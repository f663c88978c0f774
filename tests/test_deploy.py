"""Deployment: Flower command lines, compose generation, the progress marker, and real
SuperLink/SuperExec/SuperNode federations on 127.0.0.1.

The tests marked ``deploy`` start real Flower processes (one to two minutes per deployment, run concurrently)
and check afterwards that none of them is left running; the others are pure and fast. Nothing here downloads
anything: the scenario uses scikit-learn's bundled digits.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from fed_deq.errors import InputError
from fed_deq.fleet import Device, build_fleet
from fed_deq.recorder import PROGRESS_FILE, RunRecorder, read_progress
from fed_deq.rounds import RoundDriver, run_rounds
from fed_deq.scenario import load_scenario
from tools import compose, flower_cmd, supervisor
from tools.cli import main as cli_main
from tools.flower_cmd import Certs

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
# Flower command lines (tools/flower_cmd.py): the one builder both compose files and deploy-local use.


def test_superlink_command_plain_and_with_tls_and_node_auth() -> None:
    assert flower_cmd.superlink(9091) == [
        "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", "9091", "--isolation", "process",
        "--disable-runtime-dependency-installation"]
    secured = flower_cmd.superlink(18000, certs=Certs("/c"), node_auth=True)
    assert secured[1:7] == ["--ssl-ca-certfile", "/c/ca.crt", "--ssl-certfile", "/c/server.pem",
                            "--ssl-keyfile", "/c/server.key"]
    assert secured[-1] == "--enable-supernode-auth" and "--insecure" not in secured
    with pytest.raises(ValueError, match="needs TLS"):
        flower_cmd.superlink(9091, node_auth=True)


def test_programs_that_dial_the_superlink() -> None:
    assert flower_cmd.serverapp_superexec("127.0.0.1:9091") == [
        "flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9091"]
    assert flower_cmd.supernode("127.0.0.1:9091", 9102, "partition-id=2", certs=Certs("/c"),
                                auth_key="/c/supernode-2") == [
        "flower-supernode", "--root-certificates", "/c/ca.crt", "--superlink", "127.0.0.1:9091",
        "--auth-supernode-private-key", "/c/supernode-2", "--port", "9102", "--node-config", "partition-id=2"]
    assert flower_cmd.flwr_run("/app", "fed-deq", "run.toml") == [
        "flwr", "run", "/app", "fed-deq", "--stream", "--run-config", "run.toml"]
    assert flower_cmd.register_node(Certs("/c").node_public_key(1)) == [
        "flwr", "supernode", "register", "/c/supernode-1.pub", "fed-deq"]
    assert flower_cmd.list_nodes("fed-deq-tls") == ["flwr", "supernode", "list", "fed-deq-tls", "--format", "json"]


def test_option_strings_and_connection_config() -> None:
    device = Device(partition_id=1, tier="phone", compute_flops=1.0, bandwidth_bps=1.0, availability=1.0,
                    dropout=0.0, straggler_prob=0.0, straggler_slowdown=1.0)
    assert flower_cmd.node_config(device, 3) == "partition-id=1 num-partitions=3 tier='phone'"
    assert flower_cmd.run_config_string("/s.yaml", "/o", ["a.b=1", "c=x y"]) == (
        "scenario='/s.yaml' out-dir='/o' set=\"a.b=1 'c=x y'\"")
    # Both quote characters fit in the TOML file (not in a k=v string); the ServerApp shlex-splits `set`.
    overrides = ["c=it's", 'd="x"']
    toml_config = tomllib.loads(flower_cmd.run_config_toml("/s.yaml", "/o", overrides))
    assert toml_config.keys() == {"scenario", "out-dir", "set"} and toml_config["out-dir"] == "/o"
    assert shlex.split(toml_config["set"]) == overrides
    with pytest.raises(InputError, match="--set overrides"):
        flower_cmd.run_config_string("/s.yaml", "/o", overrides)
    assert flower_cmd.connection_toml("127.0.0.1:5", certs=Certs("/c")) == (
        '[superlink]\ndefault = "fed-deq"\n\n[superlink.fed-deq]\naddress = "127.0.0.1:5"\n'
        'root-certificates = "/c/ca.crt"\n')


def test_image_connections_match_the_compose_superlink() -> None:
    """docker/flwr-config.toml (copied into every container) names the port and CA the compose files use."""
    config = tomllib.loads((ROOT / "docker" / "flwr-config.toml").read_text())["superlink"]
    expected = flower_cmd.address(compose.SUPERLINK_PORT)
    assert config[flower_cmd.CONNECTION] == {"address": expected, "insecure": True}
    assert config[flower_cmd.TLS_CONNECTION] == {"address": expected, "root-certificates": compose.CONTAINER_CERTS.ca}


# ------------------------------------------------------------------------------------------------------
# Compose files.


def test_tier_limits_scale_with_compute_speed(tiny: Path) -> None:
    limits = compose.tier_limits(load_scenario(tiny))
    assert limits["fast"].cpus == compose.MAX_NODE_CPUS
    assert limits["slow"].cpus == pytest.approx(0.2)  # 0.01 / 0.05 GFLOP/s
    assert limits["slow"].mem_mib < limits["fast"].mem_mib
    assert limits["fast"].mem_limit == f"{compose.NODE_MEM_FLOOR_MIB + compose.NODE_MEM_SPAN_MIB}m"
    assert all(limit.mem_mib % 64 == 0 for limit in limits.values())


def test_compose_has_one_supernode_per_client_with_tier_limits(tiny: Path, tmp_path: Path) -> None:
    scenario = load_scenario(tiny)
    base, _ = compose.write_compose(tiny, tmp_path / "compose.yml", tls=True)
    services = yaml.safe_load(base.read_text())["services"]
    devices = build_fleet(scenario)
    nodes = {name: svc for name, svc in services.items() if name.startswith("supernode-")}
    assert set(services) == {"superlink", "serverapp", "submit", *nodes}
    assert len(nodes) == len(devices) == 3
    limits = compose.tier_limits(scenario)
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
    _, tls = compose.write_compose(tiny, tmp_path / "compose.yml", tls=True)
    assert tls.name == "compose.tls.yml"
    services = yaml.safe_load(tls.read_text())["services"]
    assert len(services) == 3 + 3
    for name, svc in services.items():
        assert "--insecure" not in svc["command"], name
        assert svc["volumes"] == ["./certs:/certs:ro"]
    assert "--ssl-keyfile" in services["superlink"]["command"]
    assert "--root-certificates" in services["supernode-0"]["command"]
    assert flower_cmd.TLS_CONNECTION in services["submit"]["command"]


def test_compose_passes_overrides_to_the_run(tiny: Path, tmp_path: Path) -> None:
    overrides = ["training.rounds=1", "fleet.tiers.fast.count=3"]
    (base,) = compose.write_compose(tiny, tmp_path / "c.yml", overrides=overrides, run_name="r1")
    services = yaml.safe_load(base.read_text())["services"]
    assert sum(name.startswith("supernode-") for name in services) == 4
    assert services["submit"]["command"][-1].endswith("out-dir='/app/runs/r1' set='training.rounds=1 "
                                                      "fleet.tiers.fast.count=3'")


def test_quote_value_rejects_text_with_both_quotes() -> None:
    assert flower_cmd.quote_value("it's", "x") == '"it\'s"'
    with pytest.raises(InputError, match="both quote characters"):
        flower_cmd.quote_value("'\"", "--set overrides")


def test_compose_cli_writes_files_and_maps_bad_input_to_exit_2(tiny: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "docker-compose.yml"
    assert cli_main(["compose", str(tiny), "--out", str(out), "--tls"]) == 0
    assert out.is_file() and (tmp_path / "sub" / "docker-compose.tls.yml").is_file()
    assert cli_main(["compose", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert cli_main(["compose", str(tiny), "--set", "training.nope=1"]) == 2
    assert "fed-deq: error:" in capsys.readouterr().err


def test_compose_refuses_an_out_path_it_cannot_write(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert cli_main(["compose", str(tiny), "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path} is a folder" in capsys.readouterr().err
    assert cli_main(["compose", str(tiny), "--out", str(blocker / "c.yml")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "d" / "c.tls.yml").mkdir(parents=True)  # the TLS override's path is taken by a folder
    assert cli_main(["compose", str(tiny), "--out", str(tmp_path / "d" / "c.yml"), "--tls"]) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.tls.yml", "d", "file.txt", "tiny.yaml"]


def test_top_level_compose_matches_default_scenario(tmp_path: Path) -> None:
    """docker-compose.yml is `fed-deq compose scenarios/default.yaml --tls`, regenerated after changes."""
    fresh = compose.write_compose(ROOT / "scenarios" / "default.yaml", tmp_path / "docker-compose.yml", tls=True,
                                  scenario_file="./scenarios/default.yaml")
    for path in fresh:
        committed = yaml.safe_load((ROOT / path.name).read_text())
        assert committed == yaml.safe_load(path.read_text()), f"regenerate {path.name}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_files(tiny: Path, tmp_path: Path) -> None:
    base, tls = compose.write_compose(tiny, tmp_path / "docker-compose.yml", tls=True)
    host = ROOT / "docker" / "compose.host-network.yml"
    for files in ([base], [base, tls], [base, tls, host], [ROOT / "docker-compose.yml"],
                  [ROOT / "docker-compose.yml", ROOT / "docker-compose.tls.yml", host]):
        args = [arg for path in files for arg in ("-f", str(path))]
        done = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True,
                              cwd=files[0].parent, check=False)
        assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------------------
# The progress marker: how deploy-local learns that round 1 started and that the run finished.


def test_recorder_marks_progress_as_the_run_loop_goes(tiny: Path, tmp_path: Path) -> None:
    scenario, out = load_scenario(tiny), tmp_path / "run"
    seen_at_exchange = []

    def exchange(open_round):
        seen_at_exchange.append(read_progress(out))
        return [], list(open_round.instructions)  # every sampled node offline: the round closes empty

    with RunRecorder(scenario, out) as recorder:
        assert read_progress(out) == {"rounds": 2, "rounds_done": 0, "running_round": None, "finished": False}
        run_rounds(RoundDriver(scenario), recorder, exchange)
        assert read_progress(out)["finished"] is False  # summary.json not written yet
        recorder.finish()
    # When round r's messages go out, the marker already says round r is under way.
    assert [(p["running_round"], p["rounds_done"]) for p in seen_at_exchange] == [(1, 0), (2, 1)]
    assert read_progress(out) == {"rounds": 2, "rounds_done": 2, "running_round": None, "finished": True}
    assert (out / "summary.json").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_run_watch_follows_the_marker_and_says_where_the_run_got(tmp_path: Path) -> None:
    watch = supervisor.RunWatch(tmp_path)

    def mark(**state) -> None:
        (tmp_path / PROGRESS_FILE).write_text(json.dumps({"rounds": 2, "finished": False, **state}))
        watch.poll()

    watch.poll()
    assert watch.first_round_at is None and f"no {PROGRESS_FILE}" in watch.describe()
    mark(rounds_done=0, running_round=None)
    assert watch.first_round_at is None and "round 1 had not started" in watch.describe()
    mark(rounds_done=0, running_round=1)
    first = watch.first_round_at
    assert first is not None and watch.describe() == "round 1 of 2 under way, 0 done"
    mark(rounds_done=1, running_round=2)
    assert watch.first_round_at == first and watch.finished_at is None
    mark(rounds_done=2, running_round=None, finished=True)
    assert watch.finished_at is not None and watch.describe() == "all 2 rounds finished"


def test_check_outputs_names_how_far_a_failed_run_got(tmp_path: Path) -> None:
    failed = supervisor.RunOutcome(returncode=1, wall_time_s=3.0, killed_at_s=None, finished=False,
                                   progress="round 1 of 2 under way, 0 done")
    with pytest.raises(supervisor.DeploymentFailed,
                       match=r"flwr run exited 1; round 1 of 2 under way, 0 done\); logs in .*logs"):
        supervisor.check_outputs(tmp_path, failed, tmp_path / "logs")
    (tmp_path / "summary.json").write_text('{"rounds": 2}')
    done = supervisor.RunOutcome(returncode=None, wall_time_s=3.0, killed_at_s=None, finished=True,
                                 progress="all 2 rounds finished")
    assert supervisor.check_outputs(tmp_path, done, tmp_path / "logs") == {"rounds": 2}


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
        runs = {name: (root / name, pool.submit(supervisor.run_local_deployment, scenario, root / name,
                                                timeout_s=600, **kwargs))
                for name, kwargs in variants.items()}
        yield runs


def finished(federations: dict, name: str) -> tuple[Path, dict]:
    """Output folder and summary of one of the concurrent deployments (re-raises its failure)."""
    out, future = federations[name]
    return out, future.result(timeout=900)


@pytest.mark.deploy
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
    assert read_progress(out) == {"rounds": 2, "rounds_done": 2, "running_round": None, "finished": True}
    assert leftovers(summary) == []


@pytest.mark.deploy
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


@pytest.mark.deploy
def test_tls_deployment_with_supernode_auth(federations: dict) -> None:
    out, summary = finished(federations, "tls")
    assert [r["round"] for r in read_metrics(out)] == [1, 2]
    assert summary["deployment"]["tls"] and summary["deployment"]["node_auth"]
    log = (out / "deploy-logs" / "superlink.log").read_text()
    assert "insecure" not in log.lower()  # Flower warns loudly when it runs without TLS
    assert "authentication is disabled" not in log
    assert leftovers(summary) == []


@pytest.mark.deploy
def test_failed_deployment_stops_everything(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports: list[int] = []
    pick = supervisor.free_port
    monkeypatch.setattr(supervisor, "free_port", lambda: ports.append(pick()) or ports[-1])
    with pytest.raises(supervisor.DeploymentFailed, match="did not finish"):
        supervisor.run_local_deployment(tiny, tmp_path / "run", timeout_s=1.0)
    assert len(ports) == 4
    marks = [f"127.0.0.1:{port}" for port in ports] + [f"--port {port}" for port in ports]
    assert [cmd for cmd in flower_processes().values() if any(mark in cmd for mark in marks)] == []


def test_deploy_local_cli_rejects_bad_input_before_starting_anything(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    started = []
    monkeypatch.setattr(supervisor, "_new_deployment", lambda *args, **kwargs: started.append(args))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert cli_main(["deploy-local", str(tiny), "--out", str(tmp_path / "o"), "--node-auth"]) == 2
    assert cli_main(["deploy-local", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert cli_main(["deploy-local", str(tiny), "--out", str(blocker)]) == 2
    assert f"--out: {blocker} exists and is not a folder" in capsys.readouterr().err
    assert cli_main(["deploy-local", str(tiny), "--out", str(blocker / "o")]) == 2
    assert not (tmp_path / "o").exists() and started == []
