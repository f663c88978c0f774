"""Shared fixtures: tiny scenarios that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_SCENARIO = """\
seed: 3
dataset: {name: digits, test_fraction: 0.2, validation_fraction: 0.1, server_validation_samples: 100,
          partition: {kind: iid}}
model: {cell: mlp, width: 16, contraction: spectral, solver: anderson, tol: 1.0e-3, backward: one-step,
        eval_iterations: 10}
fleet:
  tiers:
    - {name: slow, count: 3, compute_gflops: 0.002, bandwidth_mbps: 10, availability: 1.0}
    - {name: fast, count: 3, compute_gflops: 0.02, bandwidth_mbps: 50, availability: 1.0}
training: {rounds: 2, clients_per_round: 4, local_epochs: 1, batch_size: 32, learning_rate: 0.1,
           deadline_s: 2.0, min_iterations: 2, max_iterations: 12}
fusion: {rule: quality, score: product}
simulation: {cpus_per_client: 1}
"""


@pytest.fixture(scope="session", autouse=True)
def dataset_cache_dir(tmp_path_factory) -> Path:
    """Generated datasets are cached in a folder of this test session, never in the user's ~/.cache/fed-deq.
    Set in the environment, so that child processes and Ray workers started by tests use it too."""
    folder = tmp_path_factory.mktemp("dataset-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FED_DEQ_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def tiny_scenario_path(tmp_path: Path) -> Path:
    """A 6-client, 2-round digits scenario on disk."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SCENARIO)
    return path


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module single-threaded: on tiny tensors OpenMP synchronisation costs more than it saves, and two
    threads on a loaded 2-core machine made a training step ~25x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
