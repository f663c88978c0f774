"""benchmarks/: the results.json schema checker, the docs section writer, and the measuring helpers."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run_all
from benchmarks.bare_loop import bare_loop
from benchmarks.proctree import TreeSampler, descendants, run_measured
from benchmarks.schema import (
    FIGURES, FLEET_END, FLEET_START, SchemaError, check_results, replace_fleet_section,
)
from clients.app import app as client_app
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"


def valid_results() -> dict:
    """A results.json document as run_all writes it (values invented, shapes real)."""
    values = {"overhead_ratio": 1.3, "overhead_per_update_s": 0.05, "study_extra_run_s": 1.1,
              "large_fleet_peak_rss_gib": 2.4, "fleet_size_round_ratio": 1.05,
              "anderson_over_picard_iters": 0.72, "solver_time_ratio_vs_torchdeq": 0.88,
              "warm_over_cold_iters": 0.8, "quality_over_fedavg_time_to_target": 0.9}
    figures = {name: run_all.figure(name, value, f"cmd {name}", {"a": 1.5, "nested": {"b": [1, 2.0]}})
               for name, value in values.items()}
    return {"schema": 1, "generated": "2026-11-29T18:00:00+00:00", "total_wall_s": 700.0,
            "machine": {"cpus": 2, "python": "3.11"}, "figures": figures}


def test_a_document_as_run_all_writes_it_passes():
    data = valid_results()
    check_results(data)
    assert data["figures"]["overhead_ratio"]["met"] is False      # 1.3 > 1.0
    assert data["figures"]["fleet_size_round_ratio"]["met"] is True
    assert data["figures"]["quality_over_fedavg_time_to_target"]["met"] is None  # no goal
    assert data["figures"]["study_extra_run_s"]["met"] is True       # 1.1 <= 2.0
    assert data["figures"]["overhead_per_update_s"]["met"] is None
    check_results(json.loads(json.dumps(data)))  # and after a JSON round trip


def _set(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("figures.overhead_ratio", KeyError, "figures.overhead_ratio: missing"),
    ("figures.overhead_ratio.value", math.nan, "finite number"),
    ("figures.overhead_ratio.value", math.inf, "finite number"),
    ("figures.overhead_ratio.value", "1.3", "finite number"),
    ("figures.overhead_ratio.value", True, "finite number"),
    ("figures.overhead_ratio.value", None, "must be measured"),
    ("figures.overhead_ratio.met", True, "says True"),
    ("figures.overhead_ratio.unit", "GiB", "unit"),
    ("figures.overhead_ratio.goal_max", 2.0, "goal_max"),
    ("figures.overhead_ratio.command", None, "command"),
    ("figures.overhead_ratio.details.a", math.nan, "details.a: must be finite"),
    ("figures.quality_over_fedavg_time_to_target.met", False, "must be null"),
    ("figures.anderson_over_picard_iters.value", None, "missing value needs a reason"),
    ("figures.warm_over_cold", {}, "unknown figure"),
    ("schema", 2, "schema"),
    ("generated", "yesterday", "ISO"),
    ("total_wall_s", -1, "total_wall_s"),
    ("machine", {}, "machine"),
])
def test_each_defect_is_named(path, value, message):
    with pytest.raises(SchemaError, match=message):
        check_results(_set(valid_results(), path, value))


def test_only_solver_figures_may_be_missing_with_a_reason():
    data = valid_results()
    name = "solver_time_ratio_vs_torchdeq"
    data["figures"][name] = run_all.figure(name, None, "cmd", {}, missing="benchmarks/solvers.json is missing")
    check_results(data)
    assert [n for n, spec in FIGURES.items() if spec[2]] == ["anderson_over_picard_iters",
                                                            "solver_time_ratio_vs_torchdeq"]


def test_the_committed_results_file_passes():
    assert RESULTS.exists(), "benchmarks/results.json is missing: run `make bench`"
    data = json.loads(RESULTS.read_text())
    check_results(data)
    for name in FIGURES:
        assert name in data["figures"]


# --- docs/benchmarks.md: only the fleet section is ours ------------------------------------------------------


def test_fleet_section_replaced_without_touching_the_others():
    doc = ("# Benchmarks\n\n<!-- solvers:start -->\nsolver text\n<!-- solvers:end -->\n\n"
           f"{FLEET_START}\nold fleet text\n{FLEET_END}\n\n<!-- containers:start -->\nc\n<!-- containers:end -->\n")
    new = replace_fleet_section(doc, "## Fleet\nnew text")
    assert "old fleet text" not in new and "## Fleet\nnew text" in new
    assert new.replace(f"{FLEET_START}\n## Fleet\nnew text\n{FLEET_END}", "") == \
        doc.replace(f"{FLEET_START}\nold fleet text\n{FLEET_END}", "")
    assert replace_fleet_section(new, "## Fleet\nnew text") == new  # idempotent


def test_fleet_section_appended_when_absent_and_bad_markers_refused():
    doc = "# Benchmarks\n\n<!-- solvers:start -->\ns\n<!-- solvers:end -->\n"
    new = replace_fleet_section(doc, "fleet")
    assert new.startswith(doc.rstrip()) and new.endswith(f"{FLEET_START}\nfleet\n{FLEET_END}\n")
    with pytest.raises(SchemaError, match="exactly one"):
        replace_fleet_section(new + FLEET_START, "x")


# --- measuring helpers --------------------------------------------------------------------------------------


def test_tree_sampler_counts_memory_held_by_a_grandchild(tmp_path):
    # A child that starts a grandchild holding 200 MiB: the peak must include the grandchild.
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(200 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(1.5)'])")
    measured = run_measured([sys.executable, "-c", code], tmp_path / "log.txt")
    assert measured.returncode == 0
    assert measured.peak.processes >= 2
    assert measured.peak.rss_gib > 200 / 1024
    assert measured.peak.pss_gib > 150 / 1024
    assert measured.wall_s >= 1.5


def test_descendants_of_this_process_include_a_running_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in descendants(__import__("os").getpid())
        with TreeSampler(child.pid, interval_s=0.05) as sampler:
            __import__("time").sleep(0.2)
        assert sampler.peak.samples >= 2 and sampler.peak.rss_kib > 0
    finally:
        child.kill()
        child.wait()


def test_bare_loop_reproduces_the_federated_run(tmp_path, tiny_scenario_path):
    """The overhead baseline does the same work: same clients, same fusion, same accuracy, round by round.

    Both drive the same RoundDriver; floats are compared with a tolerance because the client work runs in
    different call paths (the ClientApp's Message round trip vs a direct call)."""
    scenario = load_scenario(tiny_scenario_path)
    bare_loop(scenario, tmp_path / "bare", name="tiny")
    run_federation(FakeGrid(client_app, fleet_size(scenario), seed=7), scenario, tmp_path / "grid", name="tiny")
    bare, grid = read_metrics(tmp_path / "bare"), read_metrics(tmp_path / "grid")
    assert len(bare) == len(grid) == scenario.training.rounds
    for a, b in zip(bare, grid):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["sim_time_s"] == pytest.approx(b["sim_time_s"], rel=1e-9)
        assert a["mean_iterations"] == pytest.approx(b["mean_iterations"], rel=1e-9)
        assert a["fusion_weights"].keys() == b["fusion_weights"].keys()
        assert list(a["fusion_weights"].values()) == pytest.approx(list(b["fusion_weights"].values()), rel=1e-9)
        assert a["rejected"] == b["rejected"] and a["dropped"] == b["dropped"]
    clients = [json.loads(line) for line in (tmp_path / "bare" / "clients.jsonl").read_text().splitlines()]
    assert {c["round"] for c in clients} == {1, 2}
    assert all(c["had_warm_start"] is False for c in clients if c["round"] == 1)


def test_warm_over_cold_pairs_the_same_client_rounds():
    warm = [{"round": 4, "partition_id": 1, "had_warm_start": True, "forward-iterations": 3.0, "budget-total": 10.0,
             "backward-iterations": 1.0, "rel-residual": 0.01},
            {"round": 4, "partition_id": 2, "had_warm_start": False, "forward-iterations": 9.0, "budget-total": 10.0,
             "backward-iterations": 1.0, "rel-residual": 0.01},
            {"round": 2, "partition_id": 1, "had_warm_start": True, "forward-iterations": 1.0, "budget-total": 10.0,
             "backward-iterations": 1.0, "rel-residual": 0.01}]
    cold = [{**r, "had_warm_start": False, "forward-iterations": 6.0, "rel-residual": 0.02} for r in warm]
    result = run_all.warm_over_cold(warm, cold)
    assert result["client_rounds_compared"] == 1  # round 2 is too early, client 2 had no warm start
    assert result["ratio"] == pytest.approx(0.5)
    assert result["ratio_by_forward_budget"] == {"9": pytest.approx(0.5)}


@pytest.fixture
def fake_mnist1d(monkeypatch):
    """MNIST-1D replaced by zeros with cycling labels (any size at once); the data memos are emptied before
    and after, so no other test sees the fake data."""
    import numpy as np

    from fed_deq import data

    def fake(seed, num_samples):
        return np.zeros((num_samples, 40), np.float32), np.arange(num_samples, dtype=np.int64) % 10, 10

    monkeypatch.setattr(data, "_make_mnist1d", fake)
    data.load_dataset.cache_clear()
    data.hold_server_validation.cache_clear()
    yield
    data.load_dataset.cache_clear()
    data.hold_server_validation.cache_clear()


def split_sizes(scenario):
    """Sizes of the sets a run of ``scenario`` loads: test, probe, server validation, and each client's
    (train, validation) as a sorted list, by the calls the run makes."""
    from fed_deq import workload

    bundle = workload.scenario_data(scenario)
    clients = sorted((len(c.y_train), len(c.y_val)) for c in
                     (workload.client_partition(scenario, i) for i in range(fleet_size(scenario))))
    return len(bundle.y_test), len(bundle.y_probe), len(bundle.y_server_val), clients


def test_small_fleet_keeps_per_client_data_and_the_server_sets(fake_mnist1d):
    # The 100-client fleet once had 9 training samples and no validation sample per client against the
    # 1,000-client fleet's 15 and 1 (the probe set and the server's validation split were not counted),
    # so the larger fleet's rounds did more work.
    big = load_scenario(ROOT / "scenarios" / "large-fleet.yaml")
    small = load_scenario(ROOT / "scenarios" / "large-fleet.yaml", run_all.small_fleet_overrides()[1::2])
    assert small.fleet.num_clients == 100 and big.fleet.num_clients == 1000
    assert small.training.clients_per_round == big.training.clients_per_round
    *big_sets, big_clients = split_sizes(big)
    *small_sets, small_clients = split_sizes(small)
    assert small_sets == big_sets
    assert set(small_clients) == set(big_clients)  # the same sizes (a remainder spreads one sample wider)
    assert sum(n for n, _ in small_clients) / 100 == pytest.approx(sum(n for n, _ in big_clients) / 1000, abs=0.01)
    assert any(v for _, v in small_clients)


def test_scale_fleets_keep_the_10000_client_fleets_data_per_client(fake_mnist1d):
    from benchmarks import scale

    big, small = (load_scenario(ROOT / scale.SCENARIO, scale.fleet_overrides(n, 3)[1::2])
                  for n in (scale.BIG, scale.SMALL))
    assert (big.fleet.num_clients, small.fleet.num_clients) == (scale.BIG, scale.SMALL)
    *big_sets, big_clients = split_sizes(big)
    *small_sets, small_clients = split_sizes(small)
    assert small_sets == big_sets
    assert set(small_clients) <= set(big_clients)
    assert sum(n for n, _ in small_clients) / scale.SMALL == pytest.approx(
        sum(n for n, _ in big_clients) / scale.BIG, abs=0.01)


def test_steady_round_wall_skips_round_one():
    metrics = [{"wall_time_s": 10.0}, {"wall_time_s": 12.0}, {"wall_time_s": 15.0}, {"wall_time_s": 17.0}]
    assert run_all.steady_round_wall(metrics) == 2.0


def test_fusion_study_interval_by_hand():
    from benchmarks.fusion_study import interval

    cell = interval([0.5, 0.6, 0.7])
    # mean 0.6, sd 0.1, t(0.975, 2 dof) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    assert cell["mean"] == pytest.approx(0.6) and cell["sd"] == pytest.approx(0.1)
    assert cell["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(interval([0.4])["ci95"])


def test_fusion_study_pairs_runs_by_seed_and_counts_a_missed_target_at_the_horizon():
    from benchmarks import fusion_study

    def run(late, final, times):
        metrics = [{"round": i + 1, "accuracy": a, "sim_time_s": t} for i, (a, t) in enumerate(times)]
        return {"late_accuracy": late, "final_accuracy": final, "best_accuracy": final, "sim_time_s": times[-1][1],
                "metrics": metrics, "rejected": 0, "probe_wall_s_per_round": None, "command": "c"}

    by_label = {"fedavg": {1: run(0.5, 0.5, [(0.7, 30.0)]), 2: run(0.6, 0.6, [(0.5, 30.0), (0.6, 60.0)])},
                "quality/probe": {1: run(0.6, 0.6, [(0.5, 30.0)]), 2: run(0.8, 0.8, [(0.65, 30.0)])}}
    rows = fusion_study.summarise("default", by_label, [1, 2])   # target 0.6 on default
    assert rows["quality/probe"]["late_minus_fedavg"]["values"] == pytest.approx([0.1, 0.2])
    assert rows["fedavg"]["time_to_target_s"]["values"] == [30.0, 60.0]
    assert rows["quality/probe"]["time_to_target_s"]["values"] == [30.0, 30.0]  # seed 1 never reached: horizon
    assert rows["quality/probe"]["reached_target"] == 1
    assert fusion_study.best_config(rows) == "quality/probe"


def test_study_step_subtracts_the_bare_work_from_the_wall_each_extra_run_adds(tmp_path):
    """benchmarks/study_cost.py with the child processes faked: 2 runs take 10 s, 6 runs 18 s, so each of the 4
    extra runs adds 2 s of wall, of which the bare loop needs 0.5 s: 1.5 s of fixed cost per run."""
    from types import SimpleNamespace

    from benchmarks import study_cost

    seeds = [0, 7, 9]
    commands = []

    def fake_run(command, log):
        commands.append(command)
        log.parent.mkdir(parents=True, exist_ok=True)
        if command[1] == "compare":
            count = int(command[command.index("--seeds") + 1])
            out = Path(command[command.index("--out") + 1])
            rows = ["rule,seed,wall_time_s"]
            for seed in seeds[:count]:
                for rule in ("fedavg", "quality"):
                    rows.append(f"{rule},{seed},1.25")
                    (out / rule / f"seed-{seed}").mkdir(parents=True)
                    (out / rule / f"seed-{seed}" / "summary.json").write_text('{"wall_time_s": 0.75}')
            (out / "compare.csv").write_text("\n".join(rows) + "\n")
            return SimpleNamespace(wall_s={1: 10.0, 3: 18.0}[count])
        variants = command[command.index("--variants") + 1].split(",")
        walls = [{"rule": v.split("@")[0], "seed": int(v.split("@")[1]), "wall_s": 0.5} for v in variants]
        log.write_text("noise\n" + json.dumps({"runs": walls}) + "\n")
        return SimpleNamespace(wall_s=3.0)

    fig = study_cost.step_study(tmp_path, fake_run, run_all.figure)["study_extra_run_s"]
    assert fig["value"] == pytest.approx(18.0 / 4 - 10.0 / 4 - 0.5)
    assert fig["details"]["extra_run_outside_rounds_s"] == [0.5] * 4 and fig["met"] is True
    assert commands[-1][commands[-1].index("--variants") + 1] == "fedavg@0,quality@0,fedavg@7,quality@7,fedavg@9,quality@9"
