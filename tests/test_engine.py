"""One engine for many runs (tools/engine.py): Ray and the client actors start once per study, not once per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fed_deq.results import read_metrics
from fed_deq.scenario import parse_scenario_text
from tests.conftest import TINY_SCENARIO
from tools import engine as engine_module
from tools.engine import RayEngine, environment, ray_init_kwargs, shared_backend_class


class FakePool:
    """The parts of Flower's BasicActorPool the engine reads."""

    def __init__(self, client_resources: dict, actors: int = 2) -> None:
        self.client_resources = client_resources
        self.pool = [f"actor-{i}" for i in range(actors)]
        self.num_actors = actors
        self._future_to_actor: dict = {}


class FakeFlowerBackend:
    """Stands for Flower's RayBackend: build makes a pool; terminate would end Ray (must never be called)."""

    builds = 0

    def __init__(self, client_resources: dict) -> None:
        self.client_resources = client_resources
        self.pool = None

    def build(self, app_fn) -> None:
        FakeFlowerBackend.builds += 1
        self.pool, self.app_fn = FakePool(self.client_resources), app_fn

    def terminate(self) -> None:
        raise AssertionError("Flower's terminate ends Ray: the shared backend must not call it")


@pytest.fixture
def fake_ray(monkeypatch):
    """No Ray: every actor answers, and ended actors are recorded instead of killed."""
    ended = []
    monkeypatch.setattr(engine_module, "actors_alive", lambda pool: True)
    monkeypatch.setattr(engine_module, "end_actors", lambda actors: ended.extend(actors))
    FakeFlowerBackend.builds = 0
    return ended


def one_run(backend_class, resources=None):
    """What Flower does with a backend in one run: build, (process messages), terminate."""
    backend = backend_class(resources or {"num_cpus": 1, "num_gpus": 0.0})
    backend.build(app_fn="app")
    pool = backend.pool
    backend.terminate()
    return pool


def test_the_second_run_borrows_the_first_runs_pool_and_ray_is_never_ended(fake_ray):
    engine = RayEngine({})
    shared = shared_backend_class(FakeFlowerBackend, engine)
    first, second = one_run(shared), one_run(shared)
    assert second is first and FakeFlowerBackend.builds == 1
    assert engine.counts["pools_built"] == 1 and fake_ray == []


def test_a_pool_returned_with_an_actor_still_busy_is_not_lent_and_the_busy_actor_ends_later(fake_ray):
    engine = RayEngine({})
    shared = shared_backend_class(FakeFlowerBackend, engine)
    backend = shared({"num_cpus": 1, "num_gpus": 0.0})
    backend.build(app_fn="app")
    busy = backend.pool
    busy._future_to_actor["future"] = busy.pool.pop()   # Ctrl-C while client "actor-1" trains
    backend.terminate()
    assert backend.pool is busy                          # Flower's threads may still hand actors back to it
    assert fake_ray == ["actor-0"]                       # the idle one at once; nobody waits on it
    assert one_run(shared) is not busy and FakeFlowerBackend.builds == 2
    assert fake_ray == ["actor-0", "actor-1"]            # the busy one before the next pool was built


def test_a_run_asking_for_other_client_resources_gets_a_new_pool(fake_ray):
    engine = RayEngine({})
    shared = shared_backend_class(FakeFlowerBackend, engine)
    first = one_run(shared, {"num_cpus": 1, "num_gpus": 0.0})
    second = one_run(shared, {"num_cpus": 2, "num_gpus": 0.0})
    assert second is not first and fake_ray == ["actor-0", "actor-1"] and FakeFlowerBackend.builds == 2


def test_a_pool_whose_actors_do_not_answer_is_replaced(fake_ray, monkeypatch):
    engine = RayEngine({})
    shared = shared_backend_class(FakeFlowerBackend, engine)
    first = one_run(shared)
    monkeypatch.setattr(engine_module, "actors_alive", lambda pool: False)  # an actor crashed between runs
    assert one_run(shared) is not first and fake_ray == ["actor-0", "actor-1"]


def test_serving_replaces_flowers_backend_for_the_run_only_and_one_run_at_a_time():
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    engine = RayEngine({})
    with engine.serving() as shared:
        assert shared is True
        assert raybackend.RayBackend is not original and issubclass(raybackend.RayBackend, original)
        with pytest.raises(RuntimeError, match="one simulation at a time"):
            with engine.serving():
                pass
    assert raybackend.RayBackend is original and engine.counts["runs"] == 1


def test_a_local_ray_gets_the_path_by_inheritance_and_a_cluster_by_runtime_env():
    kwargs, env = ray_init_kwargs({"num_cpus": 2, "log_to_driver": False})
    assert kwargs == {"include_dashboard": False, "num_cpus": 2, "log_to_driver": False}
    assert env["PYTHONPATH"].split(os.pathsep)[:len(sys.path)] == sys.path
    kwargs, env = ray_init_kwargs({"address": "10.0.0.1:6379"})
    assert env == {} and kwargs["address"] == "10.0.0.1:6379"
    assert kwargs["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[:len(sys.path)] == sys.path
    # "local" (what a scenario without ray_address asks for) starts a Ray of this process: inheritance again.
    kwargs, env = ray_init_kwargs({"address": "local", "num_cpus": 2})
    assert "runtime_env" not in kwargs and kwargs["address"] == "local" and "PYTHONPATH" in env


def test_a_scenario_without_ray_address_asks_for_a_ray_of_its_own():
    from tools.simulate import backend_config

    assert backend_config(parse_scenario_text(TINY_SCENARIO))["init_args"]["address"] == "local"


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("FED_DEQ_TEST_SET", "before")
    monkeypatch.delenv("FED_DEQ_TEST_UNSET", raising=False)
    with environment({"FED_DEQ_TEST_SET": "during", "FED_DEQ_TEST_UNSET": "during"}):
        assert os.environ["FED_DEQ_TEST_SET"] == os.environ["FED_DEQ_TEST_UNSET"] == "during"
    assert os.environ["FED_DEQ_TEST_SET"] == "before" and "FED_DEQ_TEST_UNSET" not in os.environ


# --- on Ray -------------------------------------------------------------------------------------------------


def tiny(extra: str = ""):
    return parse_scenario_text(TINY_SCENARIO.replace("simulation: {cpus_per_client: 1}",
                                                     "simulation: {cpus_per_client: 1, num_cpus: 2" + extra + "}"))


def run_twice(scenario, tmp_path: Path, monkeypatch) -> tuple[list[int], int]:
    """Two runs of ``scenario`` in one study; returns the ray.init calls made and the actor pools Flower built."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from tools import runs

    inits, builds = [], []
    real_init, real_build = ray.init, raybackend.RayBackend.build
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(k) or real_init(*a, **k))
    monkeypatch.setattr(raybackend.RayBackend, "build", lambda self, fn: builds.append(1) or real_build(self, fn))
    with runs.study_engine(scenario, 1) as run:
        for name in ("first", "second"):
            run(scenario, tmp_path / name, "tiny")
        assert ray.is_initialized()
    return inits, len(builds)


@pytest.mark.ray
def test_a_study_starts_ray_and_the_actors_once_and_reused_actors_change_no_result(tmp_path, monkeypatch):
    import ray

    inits, pools = run_twice(tiny(), tmp_path, monkeypatch)
    assert len(inits) == 1 and pools == 1
    assert not ray.is_initialized()  # stopped when the study ended
    first, second = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "second")
    assert len(first) == 2
    strip = lambda rows: [{k: v for k, v in r.items() if "wall" not in k} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)  # the same scenario twice: same rounds, actors reused or not


@pytest.mark.ray
def test_a_study_on_a_cluster_by_address_leaves_the_cluster_running(tmp_path, monkeypatch):
    import ray

    cluster = subprocess.Popen(  # someone else's Ray cluster, here a local one
        [sys.executable, "-c", "import json, logging, ray, sys; ray.init(num_cpus=2, include_dashboard=False, "
         "logging_level=logging.ERROR); print(json.dumps(ray.get_runtime_context().gcs_address), flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(cluster.stdout.readline())
        inits, pools = run_twice(tiny(f", ray_address: '{address}'"), tmp_path, monkeypatch)
        assert [k.get("address") for k in inits] == [address] and pools == 1
        assert not ray.is_initialized()  # disconnected...
        monkeypatch.undo()
        ray.init(address=address, logging_level="ERROR")  # ...but the cluster still runs
        try:
            assert any(node["Alive"] for node in ray.nodes())
        finally:
            ray.shutdown()
        assert len(read_metrics(tmp_path / "second")) == 2
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=60)


class FakeProcess:
    """A Popen stand-in that logs terminate/kill calls; ``stubborn`` ones ignore SIGTERM."""

    def __init__(self, name: str, log: list, stubborn: bool = False) -> None:
        self.name, self.log, self.stubborn, self.returncode = name, log, stubborn, None

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        self.log.append(("term", self.name))
        if not self.stubborn:
            self.returncode = -15

    def wait(self, timeout=None):
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.name, timeout)
        return self.returncode

    def kill(self) -> None:
        self.log.append(("kill", self.name))
        self.returncode = -9


def test_ray_processes_are_ended_raylet_first_then_gcs_then_the_helpers_and_never_the_reaper():
    from types import SimpleNamespace

    log: list = []
    kinds = {"gcs_server": False, "monitor": True, "log_monitor": False, "raylet": False, "reaper": False}
    processes = {kind: [SimpleNamespace(process=FakeProcess(kind, log, stubborn))] for kind, stubborn in kinds.items()}
    engine_module.stop_promptly(processes)
    assert log[:2] == [("term", "raylet"), ("term", "gcs_server")]
    assert set(log[2:4]) == {("term", "monitor"), ("term", "log_monitor")}
    assert log[4:] == [("kill", "monitor")]  # the one that ignored SIGTERM is killed after its grace
    assert processes["reaper"][0].process.returncode is None  # Ray ends its reaper itself, last
