"""dataset.server_validation_samples: the split the server holds back from every partition, the test set and the
probe set, and the per-round ``server_val_accuracy`` measured on it."""

from __future__ import annotations

import numpy as np
import pytest

from clients.app import app as client_app
from fed_deq import data, workload
from fed_deq.errors import InputError
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario, parse_scenario
from fed_deq.training import evaluate
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.conftest import TINY_SCENARIO
from tests.fakegrid import FakeGrid

SRC = "s.yaml"


def rows(x) -> set[bytes]:
    return {r.tobytes() for r in x}


def test_the_split_is_disjoint_from_train_probe_and_test_and_leaves_them_alone():
    bundle = data.load_dataset("mnist1d", seed=3, num_samples=300, test_fraction=0.2, probe_samples=40)
    held = data.hold_server_validation(bundle, 60, 3)
    assert data.hold_server_validation(bundle, 60, 3) is held  # memoised: every caller sees one split
    assert len(held.y_server_val) == 60 and len(held.y_train) == len(bundle.y_train) - 60
    np.testing.assert_array_equal(held.x_test, bundle.x_test)
    np.testing.assert_array_equal(held.x_probe, bundle.x_probe)
    val = rows(held.x_server_val)  # MNIST-1D samples are continuous: no duplicates
    assert len(val) == 60 and val <= rows(bundle.x_train)
    assert not val & rows(held.x_train) and not val & rows(held.x_probe) and not val & rows(held.x_test)
    assert not held.x_server_val.flags.writeable
    other = data.hold_server_validation(bundle, 60, 4)
    assert rows(other.x_server_val) != val  # drawn from the seed
    none = data.hold_server_validation(bundle, 0, 3)
    assert len(none.y_server_val) == 0 and len(none.y_train) == len(bundle.y_train)
    with pytest.raises(InputError, match="dataset.server_validation_samples"):
        data.hold_server_validation(bundle, len(bundle.y_train), 3)


def test_clients_never_see_the_servers_validation_split():
    scenario = parse_scenario({"dataset": {"name": "digits", "server_validation_samples": 200},
                               "fleet": {"num_clients": 4}}, SRC)
    bundle = workload.scenario_data(scenario)
    assert len(bundle.y_server_val) == 200
    val = rows(bundle.x_server_val)
    for pid in range(4):
        local = workload.client_partition(scenario, pid)
        assert not val & rows(local.x_train) and not val & rows(local.x_val)


def test_the_split_counts_against_the_training_samples():
    with pytest.raises(InputError, match="dataset.num_samples: must leave at least"):
        parse_scenario({"dataset": {"num_samples": 1000, "server_validation_samples": 700}}, SRC)
    ok = parse_scenario({"dataset": {"num_samples": 1000, "server_validation_samples": 0}}, SRC)
    assert ok.dataset.server_validation_samples == 0
    assert parse_scenario({}, SRC).dataset.server_validation_samples == 500
    with pytest.raises(InputError, match="dataset.server_validation_samples: must be an integer >= 0"):
        parse_scenario({"dataset": {"server_validation_samples": -1}}, SRC)


def test_every_round_records_the_global_models_accuracy_on_the_split(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SCENARIO)
    scenario = load_scenario(tmp_path / "tiny.yaml", ["dataset.server_validation_samples=300"])
    run_federation(FakeGrid(client_app, fleet_size(scenario), seed=scenario.seed), scenario, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert all(0.0 <= m["server_val_accuracy"] <= 1.0 for m in metrics)

    # evaluate_global measures the split at the evaluation budget: the same call by hand gives the same number.
    bundle = workload.scenario_data(scenario)
    model = workload.build_scenario_model(scenario, bundle)
    evaluation = workload.evaluate_global(scenario, model, workload.model_arrays(model), {})
    expected = evaluate(model, bundle.x_server_val, bundle.y_server_val, solver=scenario.model.solver,
                        max_iter=scenario.model.eval_iterations, tol=scenario.model.tol).accuracy
    assert evaluation["server_val_accuracy"] == expected

    none = load_scenario(tmp_path / "tiny.yaml", ["dataset.server_validation_samples=0"])
    assert workload.evaluate_global(none, model, workload.model_arrays(model), {})["server_val_accuracy"] is None
