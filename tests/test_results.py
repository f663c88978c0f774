"""Run records: metrics.jsonl durability, strict JSON, summary, plot and time-to-target."""

import json
import math

import numpy as np
import pytest

from fed_deq import results
from fed_deq.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ROUNDS = [
    {"round": 1, "accuracy": 0.40, "sim_time_s": 10.0, "accuracy_by_tier": {"phone": 0.30, "laptop": 0.50}},
    {"round": 2, "accuracy": 0.70, "sim_time_s": 22.5, "accuracy_by_tier": {"phone": 0.60, "laptop": 0.80}},
    {"round": 3, "accuracy": 0.65, "sim_time_s": 30.0, "accuracy_by_tier": {"phone": 0.55, "laptop": 0.75}},
]


def test_write_and_read_rounds(tmp_path):
    with results.MetricsWriter(tmp_path / "run") as writer:
        writer.write_round(ROUNDS[0])
        # Readable before the writer is closed: each round is flushed as it is written.
        assert results.read_metrics(tmp_path / "run" / "metrics.jsonl") == [ROUNDS[0]]
        writer.write_round({**ROUNDS[1], "loss": np.float32(0.5), "ids": np.array([1, 2])})
    back = results.read_metrics(tmp_path / "run")
    assert len(back) == 2
    assert back[1]["accuracy"] == 0.70 and back[1]["loss"] == 0.5 and back[1]["ids"] == [1, 2]


def test_nan_and_inf_become_null(tmp_path):
    with results.MetricsWriter(tmp_path) as writer:
        writer.write_round({"round": 1, "accuracy": math.nan, "sim_time_s": 1.0,
                            "residuals": [1.0, np.float64(np.inf)], "tier": {"x": -math.inf}})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    record = json.loads(line)
    assert record["accuracy"] is None and record["residuals"] == [1.0, None] and record["tier"] == {"x": None}
    path = results.write_summary(tmp_path, {"best_accuracy": math.nan, "rounds": 1})
    assert json.loads(path.read_text()) == {"best_accuracy": None, "rounds": 1}


def test_torn_last_line_is_dropped_but_corruption_elsewhere_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(ROUNDS[0]) + "\n" + '{"round": 2, "accur')
    assert results.read_metrics(path) == [ROUNDS[0]]
    path.write_text('{"round": 1\n' + json.dumps(ROUNDS[1]) + "\n")
    with pytest.raises(InputError, match="metrics.jsonl:1"):
        results.read_metrics(path)


def test_summary_and_scenario_files(tmp_path):
    summary = results.summarise(ROUNDS, scenario_name="tiers", fusion_rule="quality", wall_time_s=12.5)
    assert summary == {"scenario": "tiers", "fusion_rule": "quality", "rounds": 3, "final_accuracy": 0.65,
                       "best_accuracy": 0.70, "wall_time_s": 12.5, "sim_time_s": 30.0,
                       # rounds without bytes fields (older runs) count as 0 bytes; 0.8 is never reached
                       "total_bytes_down": 0, "total_bytes_up": 0, "total_bytes": 0, "target_accuracy": 0.8,
                       "sim_time_to_target_s": None, "bytes_to_target": None}
    results.write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    results.write_scenario(tmp_path, "seed: 0\n")
    assert (tmp_path / "scenario.yaml").read_text() == "seed: 0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenario.yaml", "summary.json"]  # no temp files left


def test_summary_skips_missing_accuracy():
    metrics = [{"round": 1, "accuracy": None, "sim_time_s": 1.0}, {"round": 2, "accuracy": 0.5, "sim_time_s": 2.0}]
    summary = results.summarise(metrics, scenario_name="s", fusion_rule="fedavg", wall_time_s=1.0)
    assert summary["best_accuracy"] == 0.5 and summary["final_accuracy"] == 0.5
    empty = results.summarise([], scenario_name="s", fusion_rule="fedavg", wall_time_s=0.0)
    assert empty["rounds"] == 0 and empty["final_accuracy"] is None and empty["best_accuracy"] is None


def test_time_to_target():
    assert results.time_to_target(ROUNDS, 0.4) == 10.0
    assert results.time_to_target(ROUNDS, 0.66) == 22.5
    assert results.time_to_target(ROUNDS, 0.9) is None


def test_sim_time_must_be_cumulative():
    bad = [{"round": 1, "accuracy": 0.1, "sim_time_s": 5.0}, {"round": 2, "accuracy": 0.2, "sim_time_s": 4.0}]
    with pytest.raises(InputError, match="cumulative"):
        results.time_to_target(bad, 0.5)


def test_plot_is_a_png(tmp_path):
    metrics = ROUNDS + [{"round": 4, "accuracy": None, "sim_time_s": 41.0, "accuracy_by_tier": {"phone": 0.6}}]
    path = results.plot_accuracy(metrics, tmp_path / "accuracy.png")
    payload = path.read_bytes()
    assert payload.startswith(PNG_SIGNATURE)
    assert len(payload) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.png"]
    with pytest.raises(InputError, match="no rounds"):
        results.plot_accuracy([], tmp_path / "empty.png")
