"""fed-deq tune / compare: outputs, resume after an interruption or a kill, bad input. Simulations run through the
in-process FakeGrid (real ServerApp + ClientApp code, no Ray); one test drives the real `fed-deq` CLI on Flower + Ray."""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FixedTrial, TrialState

from clients.app import app as client_app
from fed_deq.errors import InputError, RunFailed
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid
from tools import compare, runs, study, tune
from tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "scenarios" / "digits-iid.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
#: Small enough for a FakeGrid run in about a second.
TINY = ["training.rounds=2", "training.clients_per_round=3"]


def tiny_scenario(*extra: str):
    return load_scenario(DIGITS, [*TINY, *extra])


class FakeGridRunner:
    """A tuning/compare runner that simulates through the FakeGrid and counts its calls."""

    def __init__(self, fail_on: set[int] = frozenset(), interrupt_on: set[int] = frozenset(),
                 die_on: set[int] = frozenset()):
        self.calls: list[Path] = []
        self.fail_on, self.interrupt_on, self.die_on = fail_on, interrupt_on, die_on

    def __call__(self, scenario, out_dir: Path, name: str) -> dict:
        self.calls.append(Path(out_dir))
        call = len(self.calls)
        if call in self.interrupt_on:
            raise KeyboardInterrupt
        if call in self.die_on:  # like a killed process: passes through Optuna's handlers, nothing is told
            raise SystemExit(137)
        if call in self.fail_on:
            raise RunFailed("simulation failed: node exploded")
        grid = FakeGrid(client_app, fleet_size(scenario), seed=scenario.seed)
        return run_federation(grid, scenario, out_dir, name=name)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_study(out_dir: Path):
    return optuna.load_study(study_name=study.STUDY_NAME, storage=study.storage_url(out_dir))


def age_heartbeats(out_dir: Path, seconds: int = 3600) -> None:
    """Make every recorded heartbeat ``seconds`` older, as if the tune that wrote them was killed that long ago."""
    with sqlite3.connect(out_dir / study.STORAGE_FILE) as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (f"{-seconds:+d} seconds",))


# --- tune --------------------------------------------------------------------------------------------------


def test_tune_writes_trials_best_and_plot(tmp_path):
    runner = FakeGridRunner()
    settings = tune.TuneSettings(trials=3, objective="final_accuracy")
    summary = tune.tune(tiny_scenario(), tmp_path, settings, name="digits", run=runner)

    assert len(runner.calls) == 3 and summary["complete"] == 3 and summary["failed"] == 0
    rows = read_rows(tmp_path / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert all(r["state"] == "COMPLETE" for r in rows)
    for row in rows:  # each trial ran in its own folder, and its objective is that run's final accuracy
        metrics = read_metrics(tmp_path / "trials" / f"{int(row['number']):04d}")
        assert len(metrics) == 2
        assert float(row["objective"]) == pytest.approx(metrics[-1]["accuracy"])
        assert float(row["final_accuracy"]) == pytest.approx(metrics[-1]["accuracy"])
        assert row["score"] in ("budget", "residual", "accuracy", "product", "probe")
        assert 0.0 <= float(row["floor"]) <= 0.5 and float(row["wall_time_s"]) > 0
    best = max(rows, key=lambda r: float(r["objective"]))
    assert summary["best_number"] == int(best["number"])

    # best.yaml is a valid, runnable scenario carrying the best trial's fusion values.
    assert cli_main(["validate", str(tmp_path / "best.yaml")]) == 0
    best_scenario = load_scenario(tmp_path / "best.yaml")
    assert best_scenario.fusion.score == best["score"]
    assert best_scenario.fusion.size_exponent == pytest.approx(float(best["size_exponent"]))
    assert best_scenario.fusion.floor == pytest.approx(float(best["floor"]))
    assert best_scenario.training == tiny_scenario().training
    assert (tmp_path / "tuning.png").read_bytes().startswith(PNG)
    assert (tmp_path / study.STORAGE_FILE).exists()


def test_resume_runs_only_the_missing_trials_and_samples_like_an_uninterrupted_tune(tmp_path):
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    settings = tune.TuneSettings(trials=2, objective="best_accuracy")
    tune.tune(tiny_scenario(), resumed, settings, run=FakeGridRunner())
    second = FakeGridRunner()
    summary = tune.tune(tiny_scenario(), resumed, tune.TuneSettings(trials=3, objective="best_accuracy"),
                          run=second)
    assert len(second.calls) == 1 and second.calls[0].name == "0002"
    assert summary["trials_run"] == 1 and summary["complete"] == 3
    assert len(read_rows(resumed / "trials.csv")) == 3

    tune.tune(tiny_scenario(), fresh, tune.TuneSettings(trials=3, objective="best_accuracy"), run=FakeGridRunner())
    # Per-trial seeds from (scenario seed, trial count): stopping after 2 changes nothing about trial 2.
    assert [t.params for t in load_study(resumed).trials] == [t.params for t in load_study(fresh).trials]

    again = FakeGridRunner()
    tune.tune(tiny_scenario(), resumed, tune.TuneSettings(trials=3, objective="best_accuracy"), run=again)
    assert again.calls == []  # nothing missing


def test_a_trial_a_killed_tune_left_running_is_failed_and_rerun_with_its_parameters(tmp_path):
    scenario = tiny_scenario()
    settings = tune.TuneSettings(trials=1)
    with pytest.raises(SystemExit):
        tune.tune(scenario, tmp_path, settings, run=FakeGridRunner(die_on={1}))
    crashed = load_study(tmp_path).trials[0]
    assert crashed.state == TrialState.RUNNING  # what a killed tune leaves behind, its last heartbeat with it
    age_heartbeats(tmp_path)

    runner = FakeGridRunner()
    summary = tune.tune(scenario, tmp_path, settings, run=runner)
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == crashed.params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert len(runner.calls) == 1 and runner.calls[0].name == "0001" and summary["complete"] == 1
    assert load_scenario(runner.calls[0] / "scenario.yaml").fusion.score == crashed.params["score"]
    rows = read_rows(tmp_path / "trials.csv")
    assert [(r["state"], r["error"], r["retry_of"]) for r in rows] == [("FAIL", "interrupted", ""),
                                                                       ("COMPLETE", "", "0")]


def test_a_running_trial_with_a_recent_heartbeat_is_not_taken_for_an_orphan(tmp_path):
    settings = tune.TuneSettings(trials=1)
    with pytest.raises(SystemExit):
        tune.tune(tiny_scenario(), tmp_path, settings, run=FakeGridRunner(die_on={1}))
    age_heartbeats(tmp_path, seconds=-3600)  # dated ahead: however slow this machine, it is not stale yet
    tune.tune(tiny_scenario(), tmp_path, settings, run=FakeGridRunner())
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.RUNNING, TrialState.COMPLETE]


def test_ctrl_c_marks_the_trial_failed_and_the_next_tune_reruns_it_first(tmp_path):
    settings = tune.TuneSettings(trials=2)
    with pytest.raises(KeyboardInterrupt):
        tune.tune(tiny_scenario(), tmp_path, settings, run=FakeGridRunner(interrupt_on={2}))
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].params == trials[1].params
    rows = read_rows(tmp_path / "trials.csv")  # written on the way out
    assert [(r["state"], r["error"]) for r in rows] == [("COMPLETE", ""), ("FAIL", "interrupted"), ("WAITING", "")]

    runner = FakeGridRunner()
    tune.tune(tiny_scenario(), tmp_path, settings, run=runner)
    trials = load_study(tmp_path).trials
    assert len(runner.calls) == 1 and runner.calls[0].name == "0002"
    assert trials[-1].state == TrialState.COMPLETE and trials[-1].params == trials[1].params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[-1]) == 1


def test_a_failed_run_is_recorded_and_the_tune_goes_on(tmp_path):
    summary = tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=2), run=FakeGridRunner(fail_on={1}))
    rows = read_rows(tmp_path / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]
    assert "node exploded" in rows[0]["error"] and rows[0]["objective"] == ""
    assert summary["failed"] == 1 and summary["complete"] == 1  # one attempt per missing trial, no retry loop


def test_parallel_trials_each_get_their_share_of_the_cores(tmp_path):
    runner = FakeGridRunner()
    summary = tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=3, jobs=2), run=runner)
    assert summary["complete"] == 3 and len(runner.calls) == 3
    assert sorted(p.name for p in runner.calls) == ["0000", "0001", "0002"]
    trials = load_study(tmp_path).trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # asks are serialised: no duplicates
    cpus = max(1, (os.cpu_count() or 1) // 2)
    assert all(load_scenario(p / "scenario.yaml").simulation.num_cpus == cpus for p in runner.calls)
    assert runs.default_runner(2) is runs.run_in_subprocess and runs.default_runner(1) is runs.run_in_process


def test_a_study_of_another_objective_is_not_resumed(tmp_path):
    tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=1), run=FakeGridRunner())
    before = (tmp_path / "trials.csv").read_text()
    with pytest.raises(InputError, match="objective"):
        tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=2, objective="time_to_target"),
                    run=FakeGridRunner())
    with pytest.raises(InputError, match="scenario"):
        tune.tune(tiny_scenario("seed=3"), tmp_path, tune.TuneSettings(trials=2), run=FakeGridRunner())
    assert (tmp_path / "trials.csv").read_text() == before


def test_time_to_target_is_minimised_and_a_miss_ranks_after_every_hit():
    scenario = tiny_scenario()  # 2 rounds x 1 s deadline: no run can last longer than 2 s
    hit = [{"round": 1, "accuracy": 0.5, "sim_time_s": 1.0}, {"round": 2, "accuracy": 0.9, "sim_time_s": 1.9}]
    near = [{"round": 1, "accuracy": 0.5, "sim_time_s": 0.5}, {"round": 2, "accuracy": 0.79, "sim_time_s": 0.9}]
    far = [{"round": 1, "accuracy": 0.2, "sim_time_s": 0.5}, {"round": 2, "accuracy": 0.3, "sim_time_s": 0.9}]
    value_hit, figures = tune.score_run(scenario, hit, "time_to_target", 0.8)
    value_near, _ = tune.score_run(scenario, near, "time_to_target", 0.8)
    value_far, near_figures = tune.score_run(scenario, far, "time_to_target", 0.8)
    assert value_hit == 1.9 and figures["time_to_target_s"] == 1.9
    assert value_hit < 2.0 < value_near < value_far  # a miss is penalised past the longest possible run
    assert value_near == pytest.approx(2.0 * (1 + 0.01 / 0.8))
    assert near_figures["time_to_target_s"] is None
    assert tune.TuneSettings(trials=1, objective="time_to_target").direction == "minimize"
    assert tune.score_run(scenario, hit, "final_accuracy", 0.8)[0] == 0.9


def test_search_space_only_samples_what_the_rule_reads():
    assert tune.suggest_fusion(FixedTrial({"rule": "fedavg"}), search_rule=True) == {"rule": "fedavg"}
    assert tune.suggest_fusion(FixedTrial({"rule": "fedprox", "proximal_mu": 0.1}), True) == \
        {"rule": "fedprox", "proximal_mu": 0.1}
    budget = {"score": "budget", "size_exponent": 1.0, "quality_exponent": 2.0, "floor": 0.1}
    assert tune.suggest_fusion(FixedTrial(budget), search_rule=False) == budget  # no beta without residuals
    product = tune.suggest_fusion(FixedTrial({**budget, "score": "product", "beta": 3.0}), search_rule=False)
    assert product["beta"] == 3.0 and "rule" not in product
    scenario = tune.apply_fusion(tiny_scenario(), product)
    assert scenario.fusion.score == "product" and scenario.fusion.beta == 3.0
    with pytest.raises(InputError, match="fusion.floor"):
        tune.apply_fusion(tiny_scenario(), {"floor": 1.5})


def test_importances_rank_the_parameter_that_drives_the_objective_and_are_plotted(tmp_path):
    import matplotlib

    synthetic = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    assert study.importances(synthetic, seed=0) == {}  # nothing to tell apart yet
    synthetic.optimize(lambda t: 10 * t.suggest_float("floor", 0, 0.5) + 0.01 * t.suggest_float("beta", 0.1, 20),
                       n_trials=20)
    scores = study.importances(synthetic, seed=0)
    assert set(scores) == {"floor", "beta"} and scores["floor"] > scores["beta"]
    style = dict(matplotlib.rcParams)
    study.plot_importances(synthetic, tune.TuneSettings(trials=1), 0, tmp_path / "importances.png")
    study.plot_history(synthetic, tune.TuneSettings(trials=1), tmp_path / "tuning.png")
    assert (tmp_path / "importances.png").read_bytes().startswith(PNG)
    assert (tmp_path / "tuning.png").read_bytes().startswith(PNG)
    assert dict(matplotlib.rcParams) == style  # Optuna's ggplot style sheet does not leak into later plots


def no_simulation(*_args):
    raise AssertionError("a simulation started although --out was refused")


@pytest.mark.parametrize("command", [["tune", "--trials", "1"], ["compare", "--rules", "fedavg"]])
def test_an_out_that_is_a_file_or_inside_one_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(runs, "run_in_process", no_simulation)
    monkeypatch.setattr(runs, "run_in_subprocess", no_simulation)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "study"):
        assert cli_main([command[0], str(DIGITS), *command[1:], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and str(blocker) in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--trials", "0"], "--trials"),
    (["--trials", "2", "--jobs", "0"], "--jobs"),
    (["--trials", "2", "--objective", "time_to_target", "--target", "1.5"], "--target"),
])
def test_tune_rejects_bad_settings_before_writing_anything(tmp_path, capsys, argv, message):
    out = tmp_path / "study"
    assert cli_main(["tune", str(DIGITS), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --- compare -----------------------------------------------------------------------------------------------


def test_compare_two_rules_writes_csv_and_plot(tmp_path):
    runner = FakeGridRunner()
    rows = compare.compare(tiny_scenario(), ["fedavg", "quality"], tmp_path, target=0.3, name="digits", run=runner)
    assert [r["rule"] for r in rows] == ["fedavg", "quality"]
    assert [p.name for p in runner.calls] == ["fedavg", "quality"]
    written = read_rows(tmp_path / "compare.csv")
    assert list(written[0]) == list(compare.COMPARE_COLUMNS)
    for row in written:
        metrics = read_metrics(tmp_path / row["rule"])
        assert load_scenario(tmp_path / row["rule"] / "scenario.yaml").fusion.rule == row["rule"]
        assert float(row["final_accuracy"]) == pytest.approx(metrics[-1]["accuracy"])
        assert float(row["best_accuracy"]) == pytest.approx(max(m["accuracy"] for m in metrics))
        reached = [m["sim_time_s"] for m in metrics if m["accuracy"] >= 0.3]
        assert row["sim_time_to_target_s"] == ("" if not reached else repr(reached[0]))
        assert float(row["wall_time_s"]) > 0
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)
    table = compare.compare_table(rows, 0.3)
    assert table.row_count == 2


def test_compare_unknown_rule_exits_2_naming_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(DIGITS), "--rules", "fedavg,fedsgd", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fedsgd" in err and all(rule in err for rule in runs.fusion_rules())
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(InputError, match="more than once"):
        compare.parse_rules("quality,quality")


# --- the real CLI on Flower + Ray ----------------------------------------------------------------------------


@pytest.mark.ray
def test_cli_tune_on_ray_then_best_yaml_validates_and_simulates_to_the_same_accuracy(tmp_path):
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    script = Path(sys.executable).parent / "fed-deq"  # the installed console script, as a user runs it
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "tools.cli"]
    study_dir = tmp_path / "study"
    tuned = subprocess.run([*cli, "tune", str(DIGITS), "--trials", "1", "--set", "training.rounds=2",
                            "--out", str(study_dir)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    rows = read_rows(study_dir / "trials.csv")
    assert len(rows) == 1 and rows[0]["state"] == "COMPLETE"
    for name in ("best.yaml", "tuning.png", "optuna.db"):
        assert (study_dir / name).exists()

    validate = subprocess.run([*cli, "validate", str(study_dir / "best.yaml")], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
    assert validate.returncode == 0 and "ok" in validate.stdout
    rerun = tmp_path / "rerun"
    simulate = subprocess.run([*cli, "simulate", str(study_dir / "best.yaml"), "--out", str(rerun), "--no-progress"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    assert simulate.returncode == 0, simulate.stderr[-2000:]
    # Same scenario, same seed: the best trial's run is reproduced exactly.
    summary = json.loads((rerun / "summary.json").read_text())
    assert summary["final_accuracy"] == pytest.approx(float(rows[0]["final_accuracy"]), abs=1e-12)
    assert math.isfinite(float(rows[0]["objective"]))
