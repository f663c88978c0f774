"""TensorBoard scalars: `--tensorboard` writes each round's numbers under DIR/tb, readable by TensorBoard."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clients.app import app as client_app
from fed_deq import results
from fed_deq.recorder import RunRecorder
from fed_deq.rounds import RoundReport
from fed_deq.scenario import load_scenario
from fed_deq.tensorboard import TB_DIR, ScalarWriter, scalar_tags
from fed_deq.workload import fleet_size, model_arrays
from server.federation import run_federation
from tests.fakegrid import FakeGrid
from tools.cli import main as cli_main


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``log_dir``'s event files: tag → [(step, value)]."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


ROWS = [
    {"round": 1, "accuracy": 0.25, "loss": 2.0, "sim_time_s": 10.0, "bytes_down": 400, "bytes_up": 200,
     "cumulative_bytes": 600, "mean_iterations": 6.5, "accuracy_by_tier": {"phone": 0.2, "laptop": 0.3}},
    {"round": 2, "accuracy": 0.5, "loss": math.nan, "sim_time_s": 25.0, "bytes_down": 400, "bytes_up": 100,
     "cumulative_bytes": 1100, "mean_iterations": None, "accuracy_by_tier": {"phone": 0.4, "laptop": None}},
]


def test_the_writer_puts_each_rounds_scalars_at_its_step_and_skips_missing_values(tmp_path):
    writer = ScalarWriter(tmp_path / "tb")
    for row in ROWS:
        writer.write_round(row)
    writer.close()
    writer.close()   # closing twice is harmless
    with pytest.raises(RuntimeError, match="after close"):
        writer.write_round(ROWS[0])
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["accuracy/test"] == [(1, 0.25), (2, 0.5)]
    assert scalars["bytes/round_up"] == [(1, 200.0), (2, 100.0)]
    assert scalars["bytes/cumulative"] == [(1, 600.0), (2, 1100.0)]
    assert scalars["time/sim_s"] == [(1, 10.0), (2, 25.0)]
    assert scalars["loss/test"] == [(1, 2.0)]                      # NaN in round 2: left out, not a zero
    assert scalars["iterations/mean_client"] == [(1, 6.5)]
    assert scalars["accuracy_by_tier/phone"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.4))]
    assert scalars["accuracy_by_tier/laptop"] == [(1, pytest.approx(0.3))]
    assert set(scalars) == set(scalar_tags(ROWS[0]))


def test_a_new_run_in_the_same_folder_replaces_the_old_event_files(tmp_path):
    first = ScalarWriter(tmp_path / "tb")
    first.write_round(ROWS[1])
    first.close()
    second = ScalarWriter(tmp_path / "tb")
    second.write_round(ROWS[0])
    second.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert read_scalars(tmp_path / "tb")["accuracy/test"] == [(1, 0.25)]


def test_a_federated_run_with_tensorboard_writes_what_metrics_jsonl_holds(tiny_scenario_path, tmp_path,
                                                                          single_torch_thread):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.rounds=1", "training.upload=float16"])
    run_federation(FakeGrid(client_app, fleet_size(scenario)), scenario, tmp_path / "run", tensorboard=True)
    (row,) = results.read_metrics(tmp_path / "run")
    scalars = read_scalars(tmp_path / "run" / TB_DIR)
    for tag in ("accuracy/test", "loss/test", "bytes/round_down", "bytes/round_up", "bytes/cumulative",
                "iterations/mean_client", "time/sim_s", "accuracy_by_tier/slow", "accuracy_by_tier/fast"):
        assert tag in scalars, tag
    assert set(scalars) == set(scalar_tags(row))
    assert scalars["bytes/cumulative"] == [(1, float(row["cumulative_bytes"]))]
    assert scalars["accuracy/test"] == [(1, pytest.approx(row["accuracy"]))]
    assert scalars["accuracy_by_tier/slow"] == [(1, pytest.approx(row["accuracy_by_tier"]["slow"]))]


def test_without_the_flag_no_tensorboard_folder_is_made(tiny_scenario_path, tmp_path, single_torch_thread):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.rounds=1"])
    run_federation(FakeGrid(client_app, fleet_size(scenario)), scenario, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / TB_DIR).exists()


def test_an_interrupted_run_closes_its_event_file_with_the_rounds_done(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path)
    with pytest.raises(KeyboardInterrupt):
        with RunRecorder(scenario, tmp_path / "run", tensorboard=True) as recorder:
            recorder.record_round(1, model_arrays(recorder.model), RoundReport(server_round=1, bytes_down=7))
            raise KeyboardInterrupt
    assert recorder._tb is None
    assert read_scalars(tmp_path / "run" / TB_DIR)["bytes/cumulative"] == [(1, 7.0)]


def test_simulate_passes_the_flag_on(tiny_scenario_path, tmp_path, monkeypatch):
    seen = {}

    def fake_simulate(scenario, out_dir, *, name, progress, tensorboard=False):
        seen["tensorboard"] = tensorboard
        with results.MetricsWriter(out_dir) as writer:
            writer.write_round(ROWS[0])
        return results.summarise([ROWS[0]], scenario_name=name, fusion_rule="quality", wall_time_s=0.0)

    monkeypatch.setattr("tools.simulate.simulate", fake_simulate)
    assert cli_main(["simulate", str(tiny_scenario_path), "--out", str(tmp_path / "a"), "--no-progress",
                     "--tensorboard"]) == 0
    assert seen == {"tensorboard": True}
    assert cli_main(["simulate", str(tiny_scenario_path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert seen == {"tensorboard": False}


def test_a_study_engine_passes_the_flag_to_every_run(tiny_scenario_path, tmp_path, monkeypatch):
    import contextlib
    import json

    from tools import runs

    scenario = load_scenario(tiny_scenario_path)
    seen = []

    def fake_simulate(variant, out_dir, *, name, progress, engine=None, tensorboard=False):
        seen.append(("in process", tensorboard))
        return {}

    monkeypatch.setattr("tools.simulate.simulate", fake_simulate)
    monkeypatch.setattr("tools.simulate.open_engine", lambda s: contextlib.nullcontext("engine"))
    for flag in (True, False):
        with runs.study_engine(scenario, 1, tensorboard=flag) as run:
            run(scenario, tmp_path / f"one-{flag}", "tiny")

    class Finished:
        returncode = 0

    def fake_child(command, **kwargs):  # a child `fed-deq simulate`: only its command line matters here
        seen.append(("child", "--tensorboard" in command))
        out = tmp_path / command[command.index("--out") + 1]
        (out / results.SUMMARY_FILE).write_text(json.dumps({"rounds": 0}))
        return Finished()

    monkeypatch.setattr(runs.subprocess, "run", fake_child)
    for flag in (True, False):
        with runs.study_engine(scenario, 2, tensorboard=flag) as run:
            run(scenario, tmp_path / f"two-{flag}", "tiny")
    assert seen == [("in process", True), ("in process", False), ("child", True), ("child", False)]


@pytest.mark.parametrize("command", [
    ["compare", "--rules", "quality"],
    ["tune", "--trials", "1", "--test-seeds", "0"],
])
def test_compare_and_tune_pass_the_flag_to_their_study_engine(command, tiny_scenario_path, tmp_path, monkeypatch):
    import contextlib

    from tools import runs

    seen = []

    @contextlib.contextmanager
    def fake_engine(scenario, jobs=1, tensorboard=False):
        seen.append(tensorboard)

        def run(variant, out_dir, name):
            return run_federation(FakeGrid(client_app, fleet_size(variant)), variant, out_dir, name=name,
                                  tensorboard=tensorboard)

        yield run

    monkeypatch.setattr(runs, "study_engine", fake_engine)
    name, *options = command
    argv = [name, str(tiny_scenario_path), *options, "--set", "training.rounds=1"]
    assert cli_main([*argv, "--out", str(tmp_path / "with"), "--tensorboard"]) == 0
    assert cli_main([*argv, "--out", str(tmp_path / "without")]) == 0
    assert seen == [True, False]
    written = sorted((tmp_path / "with").rglob(TB_DIR))
    assert written and all(read_scalars(folder)["accuracy/test"] for folder in written)
    assert not list((tmp_path / "without").rglob(TB_DIR))


def test_flwr_run_takes_tensorboard_from_the_run_config(tiny_scenario_path, tmp_path, single_torch_thread):
    from flwr.app import Context, RecordDict

    from fed_deq.errors import InputError
    from server import app as server_app

    def context(**extra):
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
            "scenario": str(tiny_scenario_path), "set": "training.rounds=1", **extra})

    scenario = load_scenario(tiny_scenario_path)
    for value, writes in ((True, True), ("false", False), (False, False)):
        out = tmp_path / f"run-{value}"
        server_app.main(FakeGrid(client_app, fleet_size(scenario)), context(**{"out-dir": str(out),
                                                                               "tensorboard": value}))
        assert (out / "metrics.jsonl").exists() and (out / TB_DIR).exists() == writes
    with pytest.raises(InputError, match="run config tensorboard: must be true or false, got 'yes'"):
        server_app.main(FakeGrid(client_app, fleet_size(scenario)), context(tensorboard="yes"))


def test_a_study_engine_hands_freed_memory_back_after_every_run(tiny_scenario_path, tmp_path, monkeypatch):
    import contextlib

    from tools import runs

    scenario = load_scenario(tiny_scenario_path)
    released, outcomes = [], iter([{}, RuntimeError("run failed")])

    def fake_simulate(variant, out_dir, *, name, progress, engine=None, tensorboard=False):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr("tools.simulate.simulate", fake_simulate)
    monkeypatch.setattr("tools.simulate.open_engine", lambda s: contextlib.nullcontext("engine"))
    monkeypatch.setattr(runs, "release_memory", lambda: released.append(True))
    with runs.study_engine(scenario, 1) as run:
        run(scenario, tmp_path / "a", "tiny")
        with pytest.raises(RuntimeError, match="run failed"):
            run(scenario, tmp_path / "b", "tiny")
    assert released == [True, True]
    monkeypatch.undo()
    runs.release_memory()  # on this machine's libc: it runs and returns
