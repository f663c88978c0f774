"""fed-deq tune: outputs, scoring on the server's validation split over seeds, the test-set report on fresh seeds,
resume after an interruption or a kill, bad input. Simulations run through the in-process FakeGrid (real ServerApp +
ClientApp code, no Ray) or a scripted runner; one test drives the real `fed-deq` CLI on Flower + Ray."""

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
from fed_deq import results
from fed_deq.errors import InputError, RunFailed
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid
from tools import holdout, multiseed, runs, study, tune
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


class ScriptedRunner:
    """A runner that simulates nothing: it writes two rounds whose test and validation accuracies are functions
    of the run's scenario, so a test knows every figure in advance."""

    def __init__(self, val, test):
        self.val, self.test = val, test
        self.calls: list[tuple] = []

    def __call__(self, scenario, out_dir: Path, name: str) -> dict:
        self.calls.append((scenario, Path(out_dir)))
        with results.MetricsWriter(out_dir) as writer:
            for number in (1, 2):
                writer.write_round({"round": number, "sim_time_s": float(number),
                                    "accuracy": self.test(scenario) * number / 2,
                                    "server_val_accuracy": self.val(scenario) * number / 2})
        return {}


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

    # Three trials on the scenario's own seed (0), then the best one again on one fresh seed for the test set.
    assert len(runner.calls) == 4 and summary["complete"] == 3 and summary["failed"] == 0
    rows = read_rows(tmp_path / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert not {"final_accuracy", "best_accuracy", "accuracy"} & set(rows[0])  # no test-set figure in trials.csv
    for row in rows:  # each trial ran in its own folder, and its objective is that run's final validation accuracy
        metrics = read_metrics(tmp_path / "trials" / f"{int(row['number']):04d}" / "seed-0")
        assert len(metrics) == 2
        assert float(row["objective"]) == pytest.approx(metrics[-1]["server_val_accuracy"])
        assert float(row["val_final_accuracy"]) == pytest.approx(metrics[-1]["server_val_accuracy"])
        assert row["score"] in ("budget", "residual", "accuracy", "product", "probe")
        assert 0.0 <= float(row["floor"]) <= 0.5 and float(row["wall_time_s"]) > 0
    best = max(rows, key=lambda r: float(r["objective"]))
    assert summary["best_number"] == int(best["number"])

    # The test-set report: the best trial on a seed no trial ran on, its test accuracy, in its own files.
    tested = read_rows(tmp_path / holdout.ROWS_FILE)
    assert len(tested) == 1 and int(tested[0]["trial"]) == int(best["number"]) and int(tested[0]["seed"]) != 0
    rerun = runner.calls[-1]
    assert rerun == tmp_path / "best_test" / f"{int(best['number']):04d}" / f"seed-{tested[0]['seed']}"
    assert float(tested[0]["final_accuracy"]) == pytest.approx(read_metrics(rerun)[-1]["accuracy"])
    assert load_scenario(rerun / "scenario.yaml").fusion.floor == pytest.approx(float(best["floor"]))
    assert summary["test"]["final_accuracy_mean"] == pytest.approx(float(tested[0]["final_accuracy"]))
    [test_summary] = read_rows(tmp_path / holdout.SUMMARY_FILE)
    assert test_summary["final_accuracy_ci_low"] == ""  # one fresh seed: no interval

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
    settings = tune.TuneSettings(trials=2, objective="best_accuracy", test_seeds=0)
    tune.tune(tiny_scenario(), resumed, settings, run=FakeGridRunner())
    second = FakeGridRunner()
    three = tune.TuneSettings(trials=3, objective="best_accuracy", test_seeds=0)
    summary = tune.tune(tiny_scenario(), resumed, three, run=second)
    assert len(second.calls) == 1 and second.calls[0].parent.name == "0002"
    assert summary["trials_run"] == 1 and summary["complete"] == 3 and summary["test"] is None
    assert len(read_rows(resumed / "trials.csv")) == 3

    tune.tune(tiny_scenario(), fresh, three, run=FakeGridRunner())
    # Per-trial seeds from (scenario seed, trial count): stopping after 2 changes nothing about trial 2.
    assert [t.params for t in load_study(resumed).trials] == [t.params for t in load_study(fresh).trials]

    again = FakeGridRunner()
    tune.tune(tiny_scenario(), resumed, three, run=again)
    assert again.calls == []  # nothing missing


def test_a_trial_a_killed_tune_left_running_is_failed_and_rerun_with_its_parameters(tmp_path):
    scenario = tiny_scenario()
    settings = tune.TuneSettings(trials=1, test_seeds=0)
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
    assert len(runner.calls) == 1 and runner.calls[0].parent.name == "0001" and summary["complete"] == 1
    assert load_scenario(runner.calls[0] / "scenario.yaml").fusion.score == crashed.params["score"]
    rows = read_rows(tmp_path / "trials.csv")
    assert [(r["state"], r["error"], r["retry_of"]) for r in rows] == [("FAIL", "interrupted", ""),
                                                                       ("COMPLETE", "", "0")]


def test_a_running_trial_with_a_recent_heartbeat_is_not_taken_for_an_orphan(tmp_path):
    settings = tune.TuneSettings(trials=1, test_seeds=0)
    with pytest.raises(SystemExit):
        tune.tune(tiny_scenario(), tmp_path, settings, run=FakeGridRunner(die_on={1}))
    age_heartbeats(tmp_path, seconds=-3600)  # dated ahead: however slow this machine, it is not stale yet
    tune.tune(tiny_scenario(), tmp_path, settings, run=FakeGridRunner())
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.RUNNING, TrialState.COMPLETE]


def test_ctrl_c_marks_the_trial_failed_and_the_next_tune_reruns_it_first(tmp_path):
    settings = tune.TuneSettings(trials=2, test_seeds=0)
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
    assert len(runner.calls) == 1 and runner.calls[0].parent.name == "0002"
    assert trials[-1].state == TrialState.COMPLETE and trials[-1].params == trials[1].params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[-1]) == 1


def test_a_failed_run_is_recorded_and_the_tune_goes_on(tmp_path):
    summary = tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=2, test_seeds=0),
                        run=FakeGridRunner(fail_on={1}))
    rows = read_rows(tmp_path / "trials.csv")
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]
    assert "node exploded" in rows[0]["error"] and rows[0]["objective"] == ""
    assert summary["failed"] == 1 and summary["complete"] == 1  # one attempt per missing trial, no retry loop


def test_parallel_trials_each_get_their_share_of_the_cores(tmp_path):
    runner = FakeGridRunner()
    summary = tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=3, jobs=2, test_seeds=0), run=runner)
    assert summary["complete"] == 3 and len(runner.calls) == 3
    assert sorted(p.parent.name for p in runner.calls) == ["0000", "0001", "0002"]
    trials = load_study(tmp_path).trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # asks are serialised: no duplicates
    cpus = max(1, (os.cpu_count() or 1) // 2)
    assert all(load_scenario(p / "scenario.yaml").simulation.num_cpus == cpus for p in runner.calls)


def test_a_study_of_another_objective_is_not_resumed(tmp_path):
    tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=1), run=FakeGridRunner())
    before = (tmp_path / "trials.csv").read_text()
    with pytest.raises(InputError, match="objective"):
        tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=2, objective="time_to_target"),
                    run=FakeGridRunner())
    with pytest.raises(InputError, match="scenario"):
        tune.tune(tiny_scenario("seed=3"), tmp_path, tune.TuneSettings(trials=2), run=FakeGridRunner())
    with pytest.raises(InputError, match="seeds"):
        tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=2, seeds=2), run=FakeGridRunner())
    assert (tmp_path / "trials.csv").read_text() == before


def test_time_to_target_is_minimised_and_a_miss_ranks_after_every_hit():
    scenario = tiny_scenario()  # 2 rounds x 1 s deadline: no run can last longer than 2 s
    def rows(*points):  # the test accuracy always says "reached at once": scoring must not read it
        return [{"round": r, "server_val_accuracy": acc, "accuracy": 1.0, "sim_time_s": t}
                for r, (acc, t) in enumerate(points, start=1)]

    hit, near, far = rows((0.5, 1.0), (0.9, 1.9)), rows((0.5, 0.5), (0.79, 0.9)), rows((0.2, 0.5), (0.3, 0.9))
    value_hit, figures = tune.score_run(scenario, hit, "time_to_target", 0.8)
    value_near, _ = tune.score_run(scenario, near, "time_to_target", 0.8)
    value_far, near_figures = tune.score_run(scenario, far, "time_to_target", 0.8)
    assert value_hit == 1.9 and figures["sim_time_to_target_s"] == 1.9
    assert value_hit < 2.0 < value_near < value_far  # a miss is penalised past the longest possible run
    assert value_near == pytest.approx(2.0 * (1 + 0.01 / 0.8))
    assert near_figures["sim_time_to_target_s"] is None
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


@pytest.mark.parametrize("argv, message", [
    (["--trials", "1", "--seeds", "0"], "--seeds"),
    (["--trials", "1", "--test-seeds", "-1"], "--test-seeds"),
    (["--trials", "1", "--set", "dataset.server_validation_samples=0"], "dataset.server_validation_samples"),
    (["--trials", "1", "--search-tier-weights", "--set", "fleet.tiers=[{name: only, count: 10}]"],
     "--search-tier-weights"),
])
def test_tune_rejects_what_it_cannot_score_or_search(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(runs, "run_in_process", no_simulation)
    monkeypatch.setattr(runs, "run_in_subprocess", no_simulation)
    out = tmp_path / "study"
    assert cli_main(["tune", str(DIGITS), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --- seeds, the validation split and the test-set report ----------------------------------------------------


def floor_val_runner() -> ScriptedRunner:
    """Validation accuracy rises with fusion.floor, test accuracy falls with it: the two disagree on the best."""
    return ScriptedRunner(val=lambda s: s.fusion.floor, test=lambda s: 1.0 - s.fusion.floor)


def test_the_choice_follows_the_validation_split_and_the_test_report_uses_fresh_seeds(tmp_path):
    runner = floor_val_runner()
    settings = tune.TuneSettings(trials=4, seeds=2, test_seeds=3)
    summary = tune.tune(tiny_scenario(), tmp_path, settings, run=runner)

    trials = [t for t in load_study(tmp_path).trials if t.state == TrialState.COMPLETE]
    best = max(trials, key=lambda t: t.params["floor"])
    assert summary["best_number"] == best.number  # the highest validation score, the lowest test accuracy
    assert summary["best_value"] == pytest.approx(best.params["floor"])
    tuning_seeds, fresh_seeds = settings.seed_lists(tiny_scenario().seed)
    assert tuning_seeds == multiseed.study_seeds(0, 2) and tuning_seeds[0] == 0
    trial_runs = runner.calls[:8]
    assert sorted(s.seed for s, _ in trial_runs) == sorted(tuning_seeds * 4)
    test_runs = runner.calls[8:]
    assert [s.seed for s, _ in test_runs] == fresh_seeds and not set(fresh_seeds) & set(tuning_seeds)
    assert all(s.fusion.floor == best.params["floor"] for s, _ in test_runs)

    tested = read_rows(tmp_path / holdout.ROWS_FILE)
    assert [int(r["seed"]) for r in tested] == fresh_seeds
    assert all(float(r["final_accuracy"]) == pytest.approx(1.0 - best.params["floor"]) for r in tested)
    [report] = read_rows(tmp_path / holdout.SUMMARY_FILE)
    assert int(report["trial"]) == best.number and int(report["seeds"]) == 3
    assert float(report["final_accuracy_mean"]) == pytest.approx(1.0 - best.params["floor"])
    rows = read_rows(tmp_path / "trials.csv")
    assert all(float(r["val_final_accuracy"]) == pytest.approx(float(r["floor"])) for r in rows)
    assert "validation" in (tmp_path / "best.yaml").read_text().splitlines()[0]

    again = floor_val_runner()  # same best trial, all its fresh seeds reported: nothing to run
    tune.tune(tiny_scenario(), tmp_path, settings, run=again)
    assert again.calls == [] and read_rows(tmp_path / holdout.ROWS_FILE) == tested


def test_a_trial_scores_the_mean_over_its_seeds(tmp_path):
    # Validation accuracy 0.2 on the scenario's own seed, 0.6 on every other: the objective is their mean.
    runner = ScriptedRunner(val=lambda s: 0.2 if s.seed == 0 else 0.6, test=lambda s: 0.9)
    tune.tune(tiny_scenario(), tmp_path, tune.TuneSettings(trials=1, seeds=2, test_seeds=0), run=runner)
    [row] = read_rows(tmp_path / "trials.csv")
    assert float(row["objective"]) == pytest.approx(0.4) and float(row["val_final_accuracy"]) == pytest.approx(0.4)
    assert float(row["val_best_accuracy"]) == pytest.approx(0.4)
    assert sorted(p.name for _, p in runner.calls) == sorted(f"seed-{s}" for s in multiseed.study_seeds(0, 2))
    assert not (tmp_path / holdout.ROWS_FILE).exists()


def test_search_tier_weights_adds_one_multiplier_per_tier_to_the_quality_rule(tmp_path):
    values = tune.suggest_fusion(FixedTrial({"score": "budget", "size_exponent": 1.0, "quality_exponent": 1.0,
                                             "floor": 0.1, "tier_weights.slow": 0.5, "tier_weights.fast": 2.0}),
                                 search_rule=False, tiers=["slow", "fast"])
    assert values["tier_weights"] == {"slow": 0.5, "fast": 2.0}
    assert tune.suggest_fusion(FixedTrial({"rule": "fedavg"}), True, ["slow", "fast"]) == {"rule": "fedavg"}
    params = {"score": "budget", "floor": 0.1, "tier_weights.slow": 0.5, "tier_weights.fast": 2.0}
    assert study.fusion_values(params) == {"score": "budget", "floor": 0.1,
                                           "tier_weights": {"slow": 0.5, "fast": 2.0}}

    runner = ScriptedRunner(val=lambda s: s.fusion.tier_weights["fast"] / 2, test=lambda s: 0.5)
    settings = tune.TuneSettings(trials=3, search_tier_weights=True, test_seeds=0)
    summary = tune.tune(tiny_scenario(), tmp_path, settings, run=runner)
    assert {"tier_weights.slow", "tier_weights.fast"} <= set(summary["best_params"])
    searched = [s.fusion.tier_weights for s, _ in runner.calls]
    assert all(set(w) == {"slow", "fast"} and all(0 <= v <= 2 for v in w.values()) for w in searched)
    best = load_scenario(tmp_path / "best.yaml").fusion.tier_weights
    assert best["fast"] == pytest.approx(max(w["fast"] for w in searched))


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
    for name in ("best.yaml", "tuning.png", "optuna.db", holdout.ROWS_FILE, holdout.SUMMARY_FILE):
        assert (study_dir / name).exists()
    [tested] = read_rows(study_dir / holdout.ROWS_FILE)  # the one trial re-run on one fresh seed, in the same engine
    assert int(tested["seed"]) != 0 and 0.0 <= float(tested["final_accuracy"]) <= 1.0

    validate = subprocess.run([*cli, "validate", str(study_dir / "best.yaml")], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
    assert validate.returncode == 0 and "ok" in validate.stdout
    rerun = tmp_path / "rerun"
    simulate = subprocess.run([*cli, "simulate", str(study_dir / "best.yaml"), "--out", str(rerun), "--no-progress"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    assert simulate.returncode == 0, simulate.stderr[-2000:]
    # Same scenario, same seed: the best trial's run is reproduced exactly, validation split and test set alike.
    summary = json.loads((rerun / "summary.json").read_text())
    trial_run = read_metrics(study_dir / "trials" / "0000" / "seed-0")
    assert summary["final_accuracy"] == pytest.approx(trial_run[-1]["accuracy"], abs=1e-12)
    assert read_metrics(rerun)[-1]["server_val_accuracy"] == pytest.approx(float(rows[0]["val_final_accuracy"]),
                                                                          abs=1e-12)
    assert math.isfinite(float(rows[0]["objective"]))
