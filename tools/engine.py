"""One Ray instance and one pool of client actors for many simulations, started once and ended once.

Flower 1.42's simulation engine (``run_simulation``) starts Ray only if it is not running yet
(``RayBackend.init_ray``), builds a pool of client actors for each run (``RayBackend.build``) and, when the run
ends, kills those actors and calls ``ray.shutdown()`` (``RayBackend.terminate``). A study of many runs would pay
Ray's start and stop and the actors' start-up (a fresh Python process each, importing torch, Flower and the
ClientApp) once per run. A ``RayEngine`` pays them once:

- it starts Ray itself before the first run (or connects to ``simulation.ray_address``), so Flower finds Ray
  running and leaves it alone, and builds the actor pool with Flower's own code, giving each new actor a
  warm-up call (imports, data) so that it is ready by the time the first run's messages arrive;
- for the length of each run (``RayEngine.serving``) Flower's backend class is replaced by a subclass whose
  ``build`` lends the run the engine's pool and whose ``terminate`` hands it back instead of ending it and
  Ray. The actors keep no state between messages (Flower passes each node's state with every message), only
  their processes' memo caches (parsed scenarios, datasets), which are keyed by their inputs;
- on exit it ends its actors and Ray (a cluster it connected to is only disconnected from, never stopped).

On a Flower other than 1.42, or one whose backend looks different, nothing is replaced: each run then stops
Ray, and the next one starts it again with the same arguments (slower, same results).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Environment for Flower and Ray, set before Ray starts so that its processes inherit it.
FLOWER_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
FLOWER_SERIES = "1.42."
#: ``ray.init``'s address for a new Ray instance of this process's own, whatever cluster may be running.
LOCAL_RAY = "local"
#: How long idle actors may take to answer the check before their pool is lent again.
ALIVE_TIMEOUT_S = 30.0


class RayEngine:
    """Ray and an actor pool kept across ``run_simulation`` calls; use as a context manager.

    ``backend_config`` is the one given to ``run_simulation`` (its ``init_args`` go to ``ray.init``; with
    ``address`` the engine joins a running cluster). ``warm_up``, if given, is called once in each new actor
    (through Ray's ``__ray_call__``) right after the pool is built, so that imports and data loading happen
    while the driver prepares the run instead of during the first round; it must be picklable. ``counts``
    says what was started: ``ray_starts`` (0 when Ray was already running in this process), ``pools_built``
    and ``runs``.
    """

    def __init__(self, backend_config: dict, warm_up: Callable[[], object] | None = None) -> None:
        self.backend_config = json.loads(json.dumps(backend_config))  # Flower's backend validates its own copy
        self.warm_up = warm_up
        self.counts = {"ray_starts": 0, "pools_built": 0, "runs": 0}
        self._pool = None          # the idle pool between runs (Flower's BasicActorPool)
        self._fresh = False        # the idle pool was built by start() and has not served a run yet
        self._disconnect = False   # whether close() ends this process's Ray (or its connection to a cluster)
        self._serving = False
        self._stragglers: list = []  # actors still busy when their run ended: ended before the next pool

    def __enter__(self) -> RayEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, imported: Callable[[], object] | None = None) -> None:
        """Start Ray (or connect to ``address``) unless this process already runs it; build the actor pool.

        Call it from the thread that will outlive the engine (the main thread): Ray's processes are started
        to die with the thread that started them (Linux's parent-death signal is per thread). ``imported``,
        if given, is called after Ray has started and before Flower's backend is imported: a caller importing
        Flower in another thread while Ray starts passes a wait for that thread's imports, so that one thread
        at a time imports Flower (two threads importing one package with circular imports can see a module
        half initialised).
        """
        os.environ.update(FLOWER_ENV)
        import ray

        if not ray.is_initialized():  # else someone else's Ray: used as it is, and left running
            kwargs, env = ray_init_kwargs(self.backend_config.get("init_args", {}))
            with environment(env):
                ray.init(**kwargs)
            self.counts["ray_starts"] += 1
            self._disconnect = True
        if imported is not None:
            imported()
        module = flower_backend_module()
        if module is not None and self._pool is None:
            self._pool, self._fresh = self._build_pool(module.RayBackend), True

    def close(self) -> None:
        """End the actors; stop Ray if the engine started it (disconnect only, from a cluster it joined)."""
        import ray

        pool, self._pool = self._pool, None
        if ray.is_initialized():
            end_actors(pool.pool if pool is not None else [])
            self._end_stragglers()
        if self._disconnect and ray.is_initialized():
            shut_down_ray()
        self._disconnect = False

    def _build_pool(self, flower_backend: type):
        """An actor pool built by Flower's own backend (sized to the cluster), each actor given the warm-up."""
        backend = flower_backend(self.backend_config)  # Ray is running: Flower's init_ray does nothing
        backend.build(None)
        self.counts["pools_built"] += 1
        if self.warm_up is not None:
            for actor in backend.pool.pool:  # queued before any message; the result is not needed
                actor.__ray_call__.remote(run_warm_up, self.warm_up)
        return backend.pool

    @contextmanager
    def serving(self) -> Iterator[bool]:
        """Inside the block, Flower's simulation uses this engine's Ray and actor pool; yields whether it does
        (False on a Flower whose backend this module does not know: that run then stops Ray as Flower does).
        One run at a time: a second run would be handed the pool the first one is using."""
        if self._serving:
            raise RuntimeError("a RayEngine serves one simulation at a time")
        module = flower_backend_module()
        self.counts["runs"] += 1
        if module is None:
            yield False
            return
        original = module.RayBackend
        module.RayBackend = shared_backend_class(original, self)
        self._serving = True
        try:
            yield True
        finally:
            module.RayBackend = original
            self._serving = False

    def lend_pool(self, client_resources: dict):
        """The idle pool if it suits ``client_resources`` and its actors are alive; None means build one."""
        self._end_stragglers()  # they hold CPUs a new pool may need
        pool, self._pool = self._pool, None
        fresh, self._fresh = self._fresh, False
        if pool is None:
            return None
        # A fresh pool's actors may still be warming up: asking them now would wait for that.
        if dict(pool.client_resources) == dict(client_resources) and (fresh or actors_alive(pool)):
            return pool
        end_actors(pool.pool)
        return None

    def take_back(self, pool) -> None:
        """Keep the pool a run is done with if all its actors are back and idle. Else end its idle actors now
        and the busy ones later: a run cut short (Ctrl-C) still has threads waiting on them, which would
        report a killed actor as an error."""
        if pool is None:
            return
        idle = len(pool.pool) == pool.num_actors > 0 and not pool._future_to_actor
        if idle and self._pool is None:
            self._pool = pool
            return
        end_actors(pool.pool)
        self._stragglers += list(pool._future_to_actor.values())

    def _end_stragglers(self) -> None:
        stragglers, self._stragglers = self._stragglers, []
        end_actors(stragglers)


def shared_backend_class(base: type, engine: RayEngine) -> type:
    """A subclass of Flower's ``RayBackend`` that borrows ``engine``'s pool and never ends Ray."""

    class SharedRayBackend(base):
        """Flower's Ray backend on a pool that outlives the run (see tools/engine.py)."""

        def build(self, app_fn) -> None:
            pool = engine.lend_pool(self.client_resources)
            if pool is None:
                super().build(app_fn)  # Flower's own: as many actors as the cluster's CPUs allow
                engine.counts["pools_built"] += 1
            else:
                self.pool, self.app_fn = pool, app_fn

        def terminate(self) -> None:
            # self.pool stays: after a Ctrl-C, Flower's worker threads may still hand actors back to it.
            engine.take_back(self.pool)

    return SharedRayBackend


def flower_backend_module():
    """Flower's raybackend module if it is the 1.42 one whose pool this engine knows how to share, else None."""
    import flwr

    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError:  # another Flower layout
        return None
    backend = getattr(raybackend, "RayBackend", None)
    known = flwr.__version__.startswith(FLOWER_SERIES) and all(
        callable(getattr(backend, name, None)) for name in ("init_ray", "build", "terminate", "process_message"))
    return raybackend if known else None


def run_warm_up(actor, warm_up: Callable[[], object]) -> None:
    """Run in an actor by ``__ray_call__``: the engine's warm-up, whose failure only costs its speed-up (the
    run's own messages then meet the same problem and report it)."""
    with contextlib.suppress(Exception):
        warm_up()


def actors_alive(pool) -> bool:
    """Whether every idle actor of ``pool`` answers (a crashed actor would fail every message sent to it)."""
    import ray

    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=ALIVE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any failure means: build a fresh pool
        return False
    return True


def end_actors(actors: list) -> None:
    """Kill ``actors`` without waiting for them."""
    if not actors:
        return
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):  # already dead, or Ray already gone
            ray.kill(actor)


#: Ray's processes that ``stop_promptly`` ends first, one after the other, in this order: the raylet, given
#: the chance to end its workers cleanly, then the GCS (ending the GCS first makes the raylet wait for it).
ORDERED_FIRST = ("raylet", "gcs_server")
#: How long each of Ray's processes may take to end after SIGTERM before it is killed.
TERM_GRACE_S = 1.0
#: How long the remaining helpers (autoscaler monitor, log monitor, dashboard) get, all together.
HELPERS_GRACE_S = 0.2


def shut_down_ray() -> None:
    """``ray.shutdown()`` for a Ray this process started, without its sequential one-second waits.

    Ray's shutdown sends each of its processes SIGTERM in turn and waits up to a second for each: 1.1–1.4 s
    here, a second of it for the autoscaler's monitor, which does not react to SIGTERM in time and is killed
    anyway. ``stop_promptly`` ends the same processes first (the raylet and the GCS as Ray orders them, the
    helpers together), then Ray's own shutdown finds them ended and only tidies up. On a Ray whose node object
    looks different, Ray's own shutdown does all of it.
    """
    import ray

    try:
        from ray._private import worker

        node = worker._global_node
        kill_all = node.kill_all_processes
        processes = node.all_processes
    except Exception:  # noqa: BLE001 - another Ray layout: its own shutdown
        ray.shutdown()
        return

    def kill_all_processes(*args, **kwargs):
        stop_promptly(processes)
        return kill_all(*args, **kwargs)

    node.kill_all_processes = kill_all_processes
    try:
        ray.shutdown()
    finally:
        with contextlib.suppress(AttributeError):
            del node.kill_all_processes


def stop_promptly(processes: dict) -> None:
    """End Ray's processes (``Node.all_processes``: type -> [ProcessInfo]) except its reaper, which Ray ends
    last itself: the ``ORDERED_FIRST`` ones one by one, the others together, each killed if SIGTERM has not
    ended it within its grace."""
    import subprocess

    def popen(kind: str) -> list:
        return [info.process for info in processes.get(kind, []) if getattr(info, "process", None) is not None]

    first = [(popen(kind), TERM_GRACE_S) for kind in ORDERED_FIRST]
    rest = [p for kind in processes if kind not in (*ORDERED_FIRST, "reaper") for p in popen(kind)]
    for group, grace in [*first, (rest, HELPERS_GRACE_S)]:
        running = [p for p in group if p.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def ray_init_kwargs(init_args: dict) -> tuple[dict, dict]:
    """``ray.init`` arguments for the engine's start, and environment variables to set while Ray starts.

    Flower hands Ray's workers the driver's ``sys.path`` through PYTHONPATH. A local Ray started here inherits
    this process's environment, so the variable is set for its start only, without a ``runtime_env``: a job
    runtime environment makes Ray start the actors' workers through its runtime-env agent instead of using
    the workers it prestarts (1.7 s more per actor pool, measured here). A cluster joined by address does not
    inherit it, so it gets the runtime environment Flower would give it.
    """
    kwargs = {"include_dashboard": False, **init_args}
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    if kwargs.get("address") not in (None, "", LOCAL_RAY):
        kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": pythonpath}})
        return kwargs, {}
    return kwargs, {"PYTHONPATH": pythonpath}


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """Inside the block, ``os.environ`` also has ``variables``; their previous values are back on exit."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
