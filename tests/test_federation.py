"""ServerApp + ClientApp together on an in-process Grid: screening, faults, stragglers, determinism."""

from __future__ import annotations

import json

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from clients.app import app as client_app
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid


def _run(scenario, out_dir, **grid_kwargs):
    grid = FakeGrid(client_app, fleet_size(scenario), **grid_kwargs)
    summary = run_federation(grid, scenario, out_dir)
    return summary, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _without_wall_time(records):
    return [{k: ({**v, "wall_s": None} if k == "probe" and v else v) for k, v in r.items() if k != "wall_time_s"}
            for r in records]


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


def test_a_client_lying_about_its_time_is_rejected_not_let_through(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    _, records = _run(scenario, tmp_path / "out", tamper=_set_metric("sim-time-s", 0.001, {1}))
    for r in records:
        assert "sim-time-s claims" in r["rejected"]["1"]
        assert "1" not in r["fusion_weights"]


def test_a_late_reply_from_an_earlier_round_is_rejected(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    _, records = _run(scenario, tmp_path / "out", tamper=_set_metric("server-round", 0.0, {4}))
    assert all(r["rejected"]["4"].startswith("late reply") for r in records)


def test_a_reply_whose_metrics_are_unreadable_is_rejected_with_the_reason(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    _, records = _run(scenario, tmp_path / "out", tamper=_set_metric("num-examples", [1.0, 2.0], {0}))
    assert all("metric 'num-examples' is not a number" in r["rejected"]["0"] for r in records)


MIXED = ("adversaries=[{tier: slow, count: 1, attack: inflate_examples}, {tier: slow, count: 1, attack: crash},"
         " {tier: fast, count: 1, attack: nan_update}, {tier: fast, count: 1, attack: silent}]")


def test_a_fleet_with_mixed_adversaries_completes_and_names_each_symptom(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6", MIXED])
    summary, records = _run(scenario, tmp_path / "out")
    planted = summary["adversaries"]
    assert sorted(planted.values()) == ["crash", "inflate_examples", "nan_update", "silent"]
    where = {attack: pid for pid, attack in planted.items()}
    for r in records:
        assert "num-examples" in r["rejected"][where["inflate_examples"]]
        assert "non-finite" in r["rejected"][where["nan_update"]]
        assert "crash" in r["failed"][where["crash"]]
        assert r["dropped"][where["silent"]] == "no reply by the deadline"
        assert not set(planted) & set(r["fusion_weights"])
        assert sum(r["fusion_weights"].values()) == pytest.approx(1.0)
    assert summary["rounds"] == 2 and summary["faults"]["clients_failed"] == 2


def test_discovery_refuses_malformed_replies_and_duplicate_claims(tiny_scenario_path, tmp_path):
    scenario = load_scenario(tiny_scenario_path, overrides=["training.clients_per_round=6"])
    grid = FakeGrid(client_app, fleet_size(scenario))
    nodes = {pid: node for node, pid in grid.partition_of.items()}
    grid.contexts[nodes[1]].node_config["partition-id"] = 2   # two nodes claim partition 2
    grid.contexts[nodes[4]].node_config["partition-id"] = 40  # outside the fleet
    summary = run_federation(grid, scenario, tmp_path / "out")
    refused = summary["discovery_refused"]
    assert refused[str(nodes[1])] == refused[str(nodes[2])] == "partition 2 claimed by 2 nodes"
    assert "outside the fleet" in refused[str(nodes[4])]
    assert summary["nodes_discovered"] == 3
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert {"1", "2", "4"} <= set(r["dropped"]) and r["dropped"]["2"] == "node offline"


def test_each_train_message_has_its_own_config_with_the_assigned_budget(tiny_scenario_path, tmp_path):
    from fed_deq.rounds import RoundDriver

    scenario = load_scenario(tiny_scenario_path, overrides=["training.rounds=1"])
    grid = FakeGrid(client_app, fleet_size(scenario))
    run_federation(grid, scenario, tmp_path / "out")
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 4
    facts = RoundDriver(scenario).facts
    for message in train:
        pid = grid.partition_of[message.metadata.dst_node_id]
        config = message.content["config"]
        assert (config["budget-forward"], config["budget-backward"]) == (facts[pid].budget.forward,
                                                                         facts[pid].budget.backward)
    train[0].content["config"]["server-round"] = 99
    assert train[1].content["config"]["server-round"] == 1


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
    from flwr.supercore.task_identity import TaskIdentity

    from server.records import to_reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    sent = Message(RecordDict(), dst_node_id=777, message_type="train")
    sent.metadata.__dict__["_message_id"] = "abc"  # what a Grid does when it pushes the message
    error = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent)
    error.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that died
    reply = to_reply(error, {777: 4, 1: 9}, {"abc": 777})
    assert reply.partition_id == 4 and reply.node_id == 777 and "Unavailable" in reply.error


@pytest.mark.parametrize("rule", ["fedmedian", "fedtrimmedavg", "krum"])
def test_flowers_robust_rules_fuse_behind_the_driver(tiny_scenario_path, tmp_path, rule):
    scenario = load_scenario(tiny_scenario_path, overrides=[f"fusion.rule={rule}", "fusion.krum_malicious=0",
                                                            "training.rounds=2"])
    summary, records = _run(scenario, tmp_path / "out")
    assert all(r["clients_completed"] == 4 and r["fusion_error"] is None for r in records)
    assert summary["final_accuracy"] > summary["initial_accuracy"]  # two rounds of it already learn something
