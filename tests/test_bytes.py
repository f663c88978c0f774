"""Bytes on the wire: per-round counts, quantised uploads, the clock that charges them, summaries."""

from __future__ import annotations

import json

import pytest

from benchmarks.bare_loop import bare_loop
from clients.app import app as client_app
from fed_deq import fleet, results, workload
from fed_deq.errors import InputError
from fed_deq.rounds import Reply, RoundDriver
from fed_deq.scenario import load_scenario, parse_scenario
from fed_deq.workload import fleet_size, run_client_round
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid
from tools.cli import main as cli_main

# The tiny scenario's model, by hand: mlp of width 16 on digits (64 inputs, 10 classes).
# encoder 16x64 + 16, cell 16x16 (no bias), head 10x16 + 10: five tensors.
PARAMS = 16 * 64 + 16 + 16 * 16 + 10 * 16 + 10          # 1,466
TENSORS = 5
MODEL_BYTES = {"float32": 4 * PARAMS, "float16": 2 * PARAMS, "int8": PARAMS + 4 * TENSORS}
INSTRUCTED = 4                                          # clients_per_round, availability 1, no dropout


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path


def _round_one(path, upload: str):
    """Round 1 of the tiny scenario through the driver with direct calls: (driver, open round, replies)."""
    driver = RoundDriver(load_scenario(path, overrides=[f"training.upload={upload}"]))
    open_round = driver.open_round(1, driver.initial_arrays())
    replies = []
    for pid, instruction in open_round.instructions.items():
        result = run_client_round(driver.scenario, pid, 1, open_round.reference, budget=instruction.budget)
        replies.append(Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics)))
    return driver, open_round, replies


@pytest.fixture(scope="module")
def rounds(tiny_path, single_torch_thread):
    """Round 1 closed under every upload encoding: encoding → (report, replies)."""
    closed = {}
    for upload in MODEL_BYTES:
        driver, open_round, replies = _round_one(tiny_path, upload)
        _, report = driver.close_round(open_round, replies)
        closed[upload] = (report, replies)
    return closed


def test_each_round_records_the_bytes_of_every_model_sent_and_received(rounds):
    for upload, (report, _) in rounds.items():
        assert len(report.sampled) == INSTRUCTED
        assert report.bytes_down == INSTRUCTED * MODEL_BYTES["float32"], upload   # the global model: float32
        assert report.bytes_up == INSTRUCTED * MODEL_BYTES[upload], upload
        record = report.to_record()
        assert (record["bytes_down"], record["bytes_up"]) == (report.bytes_down, report.bytes_up)


def test_float16_halves_bytes_up_exactly_and_int8_is_about_a_quarter(rounds):
    up = {upload: report.bytes_up for upload, (report, _) in rounds.items()}
    assert up["float16"] * 2 == up["float32"]
    assert up["int8"] == pytest.approx(up["float32"] / 4, rel=0.02)


def test_honest_quantised_uploads_pass_every_check_including_the_clock(rounds):
    """The client validates and prices what it sends; the server decodes and measures what it received."""
    for upload, (report, replies) in rounds.items():
        assert report.accepted == sorted(r.partition_id for r in replies), (upload, report.rejected)
        assert not report.rejected and not report.dropped
    comm = {upload: sorted(r.metrics["comm-s"] for r in replies) for upload, (_, replies) in rounds.items()}
    assert all(a > b > c for a, b, c in zip(comm["float32"], comm["float16"], comm["int8"]))


def test_rejected_and_duplicate_replies_count_in_bytes_up_but_models_not_sent_do_not(tiny_path, single_torch_thread):
    driver, open_round, replies = _round_one(tiny_path, "float16")
    offline = replies[0].partition_id
    stranger = Reply(node_id=999, partition_id=None, arrays=replies[1].arrays, metrics=replies[1].metrics)
    failed = Reply(node_id=replies[2].node_id, partition_id=replies[2].partition_id, error="client raised")
    sent = [stranger, replies[1], replies[1], failed, replies[3]]
    _, report = driver.close_round(open_round, sent, offline=[offline])
    assert report.bytes_down == (INSTRUCTED - 1) * MODEL_BYTES["float32"]
    assert report.bytes_up == 4 * MODEL_BYTES["float16"]           # stranger, two copies, one more; error: none
    assert len(report.rejected) == 2 and report.failed and report.dropped[offline] == "node offline"


def test_the_flower_path_and_the_in_process_loop_record_the_same_bytes(tiny_path, tmp_path, single_torch_thread):
    scenario = load_scenario(tiny_path, overrides=["training.upload=int8"])
    summary = run_federation(FakeGrid(client_app, fleet_size(scenario)), scenario, tmp_path / "flower")
    bare = bare_loop(scenario, tmp_path / "bare")
    flower_rows, bare_rows = (results.read_metrics(tmp_path / name) for name in ("flower", "bare"))
    keys = ("bytes_down", "bytes_up", "cumulative_bytes", "accuracy", "clients_completed")
    assert [[r[k] for k in keys] for r in flower_rows] == [[r[k] for k in keys] for r in bare_rows]
    running = 0
    for row in flower_rows:
        assert row["bytes_up"] == row["clients_completed"] * MODEL_BYTES["int8"]
        running += row["bytes_down"] + row["bytes_up"]
        assert row["cumulative_bytes"] == running
    for s in (summary, bare, json.loads((tmp_path / "flower" / "summary.json").read_text())):
        assert s["total_bytes_down"] == sum(r["bytes_down"] for r in flower_rows)
        assert s["total_bytes_up"] == sum(r["bytes_up"] for r in flower_rows)
        assert s["total_bytes"] == running and s["target_accuracy"] == results.DEFAULT_TARGET


def test_the_budget_is_planned_for_the_bytes_the_upload_really_takes(tiny_path):
    model = workload.build_scenario_model(load_scenario(tiny_path), workload.scenario_data(load_scenario(tiny_path)))
    assert workload.num_parameters(model) == PARAMS
    for upload, up_bytes in MODEL_BYTES.items():
        scenario = load_scenario(tiny_path, overrides=[f"training.upload={upload}"])
        device = fleet.device_of(scenario, 0)
        planned = workload.planned_comm_seconds(scenario, device, model)
        assert planned == pytest.approx((4 * PARAMS + up_bytes) * 8 / device.bandwidth_bps, rel=1e-12)
        if upload == "float32":   # as the clock planned before uploads could be encoded
            assert planned == pytest.approx(fleet.comm_seconds(device, fleet.model_bytes(PARAMS)), rel=1e-12)


def test_bytes_and_time_to_target_on_hand_made_rounds():
    rows = [{"round": 1, "accuracy": 0.5, "sim_time_s": 10.0, "bytes_down": 100, "bytes_up": 50,
             "cumulative_bytes": 150},
            {"round": 2, "accuracy": None, "sim_time_s": 20.0, "bytes_down": 100, "bytes_up": 30,
             "cumulative_bytes": 280},
            {"round": 3, "accuracy": 0.81, "sim_time_s": 35.0, "bytes_down": 100, "bytes_up": 40,
             "cumulative_bytes": 420},
            {"round": 4, "accuracy": 0.9, "sim_time_s": 50.0, "bytes_down": 100, "bytes_up": 40,
             "cumulative_bytes": 560}]
    assert results.bytes_to_target(rows, 0.8) == 420
    assert results.bytes_to_target(rows, 0.5) == 150
    assert results.bytes_to_target(rows, 0.95) is None
    assert results.bytes_to_target([], 0.1) is None
    # Rows written without cumulative_bytes: the running sum of down + up.
    bare = [{k: v for k, v in r.items() if k != "cumulative_bytes"} for r in rows]
    assert results.bytes_to_target(bare, 0.85) == 560
    summary = results.summarise(rows, scenario_name="x", fusion_rule="fedavg", wall_time_s=1.0)
    assert (summary["total_bytes_down"], summary["total_bytes_up"], summary["total_bytes"]) == (400, 160, 560)
    assert summary["target_accuracy"] == results.DEFAULT_TARGET == 0.8
    assert summary["sim_time_to_target_s"] == 35.0 and summary["bytes_to_target"] == 420
    assert results.summarise(rows, scenario_name="x", fusion_rule="fedavg", wall_time_s=1.0,
                             target=0.9)["bytes_to_target"] == 560


def test_an_unknown_upload_encoding_is_a_one_line_error_naming_the_key(tiny_path, capsys):
    with pytest.raises(InputError, match=r"^x\.yaml: training\.upload: must be one of float32, float16, int8, "
                                         r"got 'float8'"):
        parse_scenario({"training": {"upload": "float8"}}, "x.yaml")
    assert cli_main(["validate", str(tiny_path), "--set", "training.upload=float8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training.upload" in err and "float8" in err
    assert parse_scenario({}, "x.yaml").training.upload == "float32"
