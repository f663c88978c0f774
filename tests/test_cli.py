"""The `fed-deq` command end to end: bad input exits 2 with one line; simulate runs on Flower + Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fed_deq(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (module entry point of this checkout)."""
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("override, needle", [
    ("model.solverr=picard", "model.solverr"),
    ("training.rounds=-1", "training.rounds"),
    ("fleet.tiers.0.compute_gflops=fast", "fleet.tiers"),
])
def test_bad_scenario_value_exits_2_with_one_line_and_writes_nothing(tiny_scenario_path, tmp_path, override, needle):
    out = tmp_path / "out"
    result = fed_deq("simulate", str(tiny_scenario_path), "--out", str(out), "--set", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_file_and_broken_yaml_exit_2(tmp_path):
    missing = fed_deq("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1, 2\n")
    result = fed_deq("validate", str(broken))
    assert result.returncode == 2 and "broken.yaml" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_validate_accepts_every_shipped_scenario():
    files = sorted(str(p) for p in (ROOT / "scenarios").glob("*.yaml"))
    result = fed_deq("validate", *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(files) >= 4


def test_out_that_is_a_file_exits_2_before_anything_starts(tiny_scenario_path, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder\n")
    result = fed_deq("simulate", str(tiny_scenario_path), "--out", str(taken), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(taken) in lines[0] and "--out" in lines[0]
    assert "simulating" not in result.stderr  # refused before the run (and Ray) started
    assert taken.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "tiny.yaml"]  # no runs/ folder either


def test_version_names_the_installed_fed_deq():
    from importlib.metadata import version

    result = fed_deq("--version", timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith(f"fed-deq {version('fed-deq')} (flwr ")


def test_help_says_what_fed_deq_is_and_lists_every_command():
    result = fed_deq("--help", timeout=60)
    assert result.returncode == 0
    assert "federated learning" in result.stdout and "deep-equilibrium" in result.stdout
    for command in ("simulate", "validate", "compare", "tune", "compose", "deploy-local"):
        assert f"\n    {command} " in result.stdout or f"\n    {command}\n" in result.stdout, command
    simulate_help = fed_deq("simulate", "--help", timeout=60).stdout
    for word in ("metrics.jsonl", "summary.json", "Ctrl-C"):
        assert word in simulate_help, word
    for word in ("Ray", "Flower", "backend"):  # what it does for the user, not what it runs on
        assert word not in simulate_help, word


@pytest.mark.ray
def test_simulate_on_ray_writes_the_run_files_and_is_deterministic(tiny_scenario_path, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = fed_deq("simulate", str(tiny_scenario_path), "--out", str(out), "--no-progress",
                         "--set", "fusion.score=probe")
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(out)
    records = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in runs]
    assert len(records[0]) == 2
    def strip(rs):  # wall-clock fields aside, two runs of one scenario write the same metrics
        return [{k: ({**v, "wall_s": None} if k == "probe" else v) for k, v in r.items() if k != "wall_time_s"}
                for r in rs]

    assert strip(records[0]) == strip(records[1])
    first = records[0][0]
    for key in ("round", "accuracy", "loss", "sim_time_s", "round_sim_time_s", "clients_sampled",
                "clients_completed", "clients_dropped", "clients_rejected", "clients_failed", "mean_iterations",
                "mean_rel_residual", "fusion_weights", "accuracy_by_tier"):
        assert key in first, key
    assert first["clients_sampled"] == 4 and first["clients_completed"] >= 1
    assert 2 <= first["mean_iterations"] <= 12  # within the scenario's min/max budget
    # The server scored every accepted model on its probe set and said what that cost.
    assert first["probe"]["clients"] == first["clients_completed"] and first["probe"]["wall_s"] > 0
    assert set(first["quality_scores"]) == set(first["fusion_weights"])
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["fusion_rule"] == "quality" and summary["scenario"] == "tiny"
    assert summary["final_accuracy"] == records[0][-1]["accuracy"]
    assert summary["sim_time_s"] == pytest.approx(records[0][-1]["sim_time_s"])
    assert (runs[0] / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rule: quality" in (runs[0] / "scenario.yaml").read_text()
