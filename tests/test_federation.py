"""ServerApp + ClientApp together on an in-process Grid: screening, faults, stragglers, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clients.app import app as client_app
from fed_deq.rounds import REQUIRED_METRICS
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from server.records import from_array_record, to_array_record
from server.strategies import FleetBinding, QualityFedAvg, build_strategy
from tests.fakegrid import FakeGrid


def _run(scenario, out_dir, **grid_kwargs):
    grid = FakeGrid(client_app, fleet_size(scenario), **grid_kwargs)
    summary = run_federation(grid, scenario, out_dir)
    return summary, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _without_wall_time(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def test_full_run_writes_every_file_with_consistent_counts(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path)
    summary, records = _run(scenario, tmp_path / "out")
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["clients_sampled"] == 4
        assert r["clients_completed"] + r["clients_dropped"] + r["clients_rejected"] + r["clients_failed"] == 4
        assert sum(r["fusion_weights"].values()) == pytest.approx(1.0)
        assert set(r["accuracy_by_tier"]) == {"slow", "fast"}
        assert 0.0 <= r["accuracy"] <= 1.0
    assert records[1]["sim_time_s"] == pytest.approx(records[0]["sim_time_s"] + records[1]["round_sim_time_s"])
    assert summary["final_accuracy"] == records[-1]["accuracy"]
    assert summary["nodes_discovered"] == 6
    for name in ("metrics.jsonl", "summary.json", "scenario.yaml", "accuracy.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # Training actually happened: the digits model beats chance after two rounds.
    assert summary["best_accuracy"] > 0.2


def test_same_seed_same_metrics_whatever_the_node_ids(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path)
    _, first = _run(scenario, tmp_path / "a", seed=1)
    _, second = _run(scenario, tmp_path / "b", seed=99)  # different random node ids, same partitions
    assert _without_wall_time(first) == _without_wall_time(second)
    _, other = _run(load_scenario(tiny_scenario_path, overrides=["seed=4"]), tmp_path / "c", seed=1)
    assert _without_wall_time(other) != _without_wall_time(first)


def test_a_client_that_raises_is_counted_and_the_run_goes_on(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    summary, records = _run(scenario, tmp_path / "out", raise_for={2})
    assert [r["clients_failed"] for r in records] == [1, 1]
    assert all("2" in r["failed"] and "2" not in r["fusion_weights"] for r in records)
    assert summary["rounds"] == 2 and summary["faults"]["clients_failed"] == 2


def _set_metric(key, value, pids):
    """A tamper hook that overwrites one reply metric of the given partitions."""
    def tamper(pid, reply):
        if pid in pids:
            metrics = dict(reply.content["metrics"])
            metrics[key] = value
            reply.content["metrics"] = MetricRecord(metrics)
        return reply
    return tamper


def test_a_straggler_past_the_deadline_is_dropped_and_never_fused(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    _, records = _run(scenario, tmp_path / "out", tamper=_set_metric("sim-time-s", 99.0, {1}))
    for r in records:
        assert r["dropped"]["1"].startswith("straggler")
        assert "1" not in r["fusion_weights"]
        assert r["round_sim_time_s"] == pytest.approx(scenario.training.deadline_s)


def test_a_late_reply_from_an_earlier_round_is_rejected(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    _, records = _run(scenario, tmp_path / "out", tamper=_set_metric("server-round", 0.0, {4}))
    assert all(r["rejected"]["4"].startswith("late reply") for r in records)


# --- strategy-level checks on hand-made replies -------------------------------------------------------

def _binding(scenario, n):
    from fed_deq import fleet

    return FleetBinding(scenario=scenario, scenario_text="", devices=fleet.build_fleet(scenario),
                        partitions={100 + i: i for i in range(n)})


def _reply(node, arrays, **metrics):
    base = {k: 0.0 for k in REQUIRED_METRICS}
    base.update({"num-examples": 10.0, "local-steps": 1.0, "budget-share": 0.5, "val-accuracy": 0.5,
                 "sim-time-s": 0.1, "server-round": 1.0, "partition-id": float(node - 100)})
    base.update(metrics)
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({k: _arr(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(base)}), reply_to=instruction)


def _arr(value):
    from flwr.app import Array

    return Array(np.asarray(value, dtype=np.float32))


def _strategy(scenario, rule_overrides=()):
    scenario = load_scenario(scenario, overrides=list(rule_overrides))
    strategy = build_strategy(scenario)
    strategy.bind(_binding(scenario, 6))
    reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    strategy._reference = reference
    from fed_deq.rounds import RoundReport

    strategy.reports[1] = RoundReport(server_round=1, sampled=list(range(6)))
    return strategy


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def test_quality_fusion_equals_flower_fedavg_when_qualities_are_equal(tiny_scenario_path):
    strategy = _strategy(tiny_scenario_path, ["fusion.score=accuracy", "fusion.size_exponent=1.0"])
    assert isinstance(strategy, QualityFedAvg)
    replies = [
        _reply(100, {"w": np.full((2, 3), 1.0), "b": [1, 2, 3]}, **{"num-examples": 10.0}),
        _reply(101, {"w": np.full((2, 3), 3.0), "b": [3, 2, 1]}, **{"num-examples": 30.0}),
        _reply(102, {"w": np.arange(6).reshape(2, 3), "b": [0, 0, 9]}, **{"num-examples": 20.0}),
    ]
    ours, _ = strategy.aggregate_train(1, replies)
    flowers, _ = FedAvg().aggregate_train(1, replies)
    for key in ("w", "b"):
        np.testing.assert_allclose(from_array_record(ours)[key], from_array_record(flowers)[key], rtol=1e-6)
    # By hand: b = (10·[1,2,3] + 30·[3,2,1] + 20·[0,0,9]) / 60
    np.testing.assert_allclose(from_array_record(ours)["b"], [100 / 60, 80 / 60, 240 / 60], rtol=1e-6)


def test_quality_fusion_favours_the_better_model(tiny_scenario_path):
    strategy = _strategy(tiny_scenario_path, ["fusion.score=accuracy", "fusion.floor=0.01"])
    replies = [_reply(100, {"w": np.zeros((2, 3)), "b": [0, 0, 0]}, **{"val-accuracy": 0.9}),
               _reply(101, {"w": np.ones((2, 3)), "b": [1, 1, 1]}, **{"val-accuracy": 0.1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_array_record(arrays)["b"], [0.1, 0.1, 0.1], rtol=1e-6)
    assert strategy.reports[1].fusion_weights == pytest.approx({0: 0.9, 1: 0.1})


@pytest.mark.parametrize("bad_first", [True, False])
@pytest.mark.parametrize("bad, reason", [
    ({"w": np.full((2, 3), np.nan), "b": [0, 0, 0]}, "non-finite"),
    ({"w": np.full((2, 3), np.inf), "b": [0, 0, 0]}, "non-finite"),
    ({"w": np.zeros((2, 3)), "b": [0, 0]}, "shape"),
    ({"w": np.zeros(3), "b": [0, 0, 0]}, "shape"),
    ({"w": np.zeros((2, 3))}, "missing"),
])
def test_invalid_replies_are_rejected_in_either_arrival_order(tiny_scenario_path, bad, reason, bad_first):
    strategy = _strategy(tiny_scenario_path, ["fusion.rule=fedavg"])
    good = [_reply(100, {"w": np.full((2, 3), 2.0), "b": [1, 2, 3]}),
            _reply(102, {"w": np.full((2, 3), 4.0), "b": [3, 2, 1]})]
    broken = _reply(101, bad)
    replies = [broken, *good] if bad_first else [*good, broken]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert list(report.rejected) == [1] and reason in report.rejected[1]
    np.testing.assert_allclose(from_array_record(arrays)["w"], np.full((2, 3), 3.0))
    np.testing.assert_allclose(from_array_record(arrays)["b"], [2, 2, 2])


def test_a_reply_missing_its_weight_metric_is_rejected_not_fatal(tiny_scenario_path):
    strategy = _strategy(tiny_scenario_path, ["fusion.rule=fedavg"])
    good = _reply(100, {"w": np.ones((2, 3)), "b": [1, 1, 1]})
    broken = _reply(101, {"w": np.ones((2, 3)), "b": [1, 1, 1]})
    metrics = {k: v for k, v in broken.content["metrics"].items() if k != "num-examples"}
    broken.content["metrics"] = MetricRecord(metrics)
    arrays, _ = strategy.aggregate_train(1, [good, broken])
    assert "num-examples" in strategy.reports[1].rejected[1]
    np.testing.assert_allclose(from_array_record(arrays)["b"], [1, 1, 1])


def test_an_update_far_above_the_round_median_is_rejected(tiny_scenario_path):
    strategy = _strategy(tiny_scenario_path, ["fusion.rule=fedavg", "fusion.max_norm_ratio=10"])
    replies = [_reply(100 + i, {"w": np.full((2, 3), 1.0 + 0.1 * i), "b": [1, 1, 1]}) for i in range(3)]
    replies.append(_reply(103, {"w": np.full((2, 3), 1e4), "b": [1, 1, 1]}))
    strategy.aggregate_train(1, replies)
    assert "norm" in strategy.reports[1].rejected[3]
    assert set(strategy.reports[1].accepted) == {0, 1, 2}


def test_fednova_with_equal_steps_matches_fedavg(tiny_scenario_path):
    nova = _strategy(tiny_scenario_path, ["fusion.rule=fednova"])
    avg = _strategy(tiny_scenario_path, ["fusion.rule=fedavg"])
    replies = [_reply(100, {"w": np.full((2, 3), 1.0), "b": [1, 2, 3]}, **{"num-examples": 10.0}),
               _reply(101, {"w": np.full((2, 3), 5.0), "b": [0, 0, 0]}, **{"num-examples": 30.0})]
    a, _ = nova.aggregate_train(1, replies)
    b, _ = avg.aggregate_train(1, replies)
    for key in ("w", "b"):
        np.testing.assert_allclose(from_array_record(a)[key], from_array_record(b)[key], rtol=1e-6)


@pytest.mark.parametrize("rule", ["fedavg", "fednova", "fedprox", "fedmedian", "fedtrimmedavg", "krum", "quality"])
def test_every_rule_aggregates_valid_replies(tiny_scenario_path, rule):
    strategy = _strategy(tiny_scenario_path, [f"fusion.rule={rule}", "fusion.krum_malicious=0"])
    replies = [_reply(100 + i, {"w": np.full((2, 3), float(i)), "b": [i, i, i]}) for i in range(5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    w = from_array_record(arrays)["w"]
    assert w.shape == (2, 3) and np.isfinite(w).all() and 0.0 <= w.min() <= w.max() <= 4.0


def test_each_train_message_has_its_own_config(tiny_scenario_path):
    scenario = load_scenario(tiny_scenario_path)
    strategy = build_strategy(scenario)
    grid = FakeGrid(client_app, 6)
    strategy.bind(FleetBinding(scenario=scenario, scenario_text="x", devices=__import__("fed_deq.fleet").fleet.build_fleet(scenario),
                               partitions=dict(grid.partition_of)))
    messages = list(strategy.configure_train(1, to_array_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), grid))
    assert len(messages) == 4
    messages[0].content["config"]["server-round"] = 99
    assert messages[1].content["config"]["server-round"] == 1


def test_a_node_that_never_answers_counts_as_dropped(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    grid = FakeGrid(client_app, fleet_size(scenario))
    original = grid.send_and_receive

    def lose_partition_5(messages, *, timeout=None):
        replies = list(original(messages, timeout=timeout))
        return [r for r in replies if not (r.metadata.message_type == "train"
                                           and grid.partition_of[r.metadata.src_node_id] == 5)]

    grid.send_and_receive = lose_partition_5
    run_federation(grid, scenario, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dropped"].get("5", "").startswith("no reply") for r in records)
    assert all(r["clients_completed"] + r["clients_dropped"] + r["clients_rejected"] + r["clients_failed"]
               == r["clients_sampled"] for r in records)


def test_an_error_reply_from_the_superlink_is_filed_under_the_dead_nodes_partition(tiny_scenario_path):
    from flwr.app import Error

    from server.records import to_reply

    sent = Message(RecordDict(), dst_node_id=777, message_type="train")
    sent.metadata.__dict__["_message_id"] = "abc"  # what a Grid does when it pushes the message
    error = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent)
    error.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that died
    reply = to_reply(error, {777: 4, 1: 9}, {"abc": 777})
    assert reply.partition_id == 4 and reply.node_id == 777 and "Unavailable" in reply.error
