"""What `fed-deq tune` and `fed-deq compare` share: running one simulation, scoring it, and writing outputs.

A *runner* is a callable ``run(scenario, out_dir, name) -> summary`` that simulates the whole scenario and
leaves metrics.jsonl in ``out_dir``. The default runs Flower + Ray in this process; several runs at once
each need their own process (Ray is one per process). Tests pass a runner that simulates in-process
without Ray.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fed_deq import results
from fed_deq.errors import InputError, RunFailed
from fed_deq.scenario import Scenario, dump_scenario, parse_scenario

DEFAULT_TARGET = results.DEFAULT_TARGET

#: ``run(scenario, out_dir, name) -> summary``: one whole simulation writing metrics.jsonl into ``out_dir``.
RunFn = Callable[[Scenario, Path, str], dict]


def fusion_rules() -> tuple[str, ...]:
    """Names of the fusion rules a scenario may choose (``fusion.rule``), from the core's registry."""
    from fed_deq.rules import FUSION_RULES

    return tuple(FUSION_RULES)


def quality_scores() -> tuple[str, ...]:
    """Names of the client quality scores the quality rule may use (``fusion.score``), from the core's registry."""
    from fed_deq.fusion import QUALITY_SCORES

    return tuple(QUALITY_SCORES)


def check_target(target: float) -> None:
    """A target accuracy must lie in (0, 1]."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise InputError(f"--target: must be an accuracy in (0, 1], got {target}")


def with_values(scenario: Scenario, section: str, values: Mapping[str, Any], source: str) -> Scenario:
    """A new scenario with keys of one section replaced, validated like a scenario file read from ``source``."""
    import yaml

    data = yaml.safe_load(dump_scenario(scenario))  # the public round trip: scenarios are immutable
    data[section].update(values)
    return parse_scenario(data, source)


# --------------------------------------------------------------------------------------------------------
# Runners


def run_in_process(scenario: Scenario, out_dir: Path, name: str, engine=None, *, tensorboard: bool = False) -> dict:
    """One simulation through Flower + Ray in this process: on ``engine`` (a ``tools.engine.RayEngine``, left
    running for the next run) if given, else on a Ray instance started and stopped for this run alone.
    ``tensorboard``: also write the run's TensorBoard scalars to ``out_dir/tb``."""
    from tools.simulate import simulate

    return simulate(scenario, out_dir, name=name, progress=False, engine=engine, tensorboard=tensorboard)


def run_in_subprocess(scenario: Scenario, out_dir: Path, name: str, *, tensorboard: bool = False) -> dict:
    """One simulation in a ``fed-deq simulate`` child process: Ray is per process, so parallel runs need one each.
    ``tensorboard``: as for ``run_in_process``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "input" / f"{name}.yaml"  # the file stem names the run
    source.parent.mkdir(exist_ok=True)
    dump_scenario(scenario, source)
    command = [sys.executable, "-m", "tools.cli", "simulate", str(source), "--out", str(out_dir), "--no-progress",
               *(["--tensorboard"] if tensorboard else [])]
    log_path = out_dir / "simulate.log"
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code in (130, -2):  # the child got the terminal's Ctrl-C too: the whole command is being interrupted
        raise KeyboardInterrupt
    if code != 0:
        lines = log_path.read_text(encoding="utf-8").strip().splitlines()
        raise RunFailed(f"fed-deq simulate exited {code}: {lines[-1] if lines else 'no output'}")
    return json.loads((out_dir / results.SUMMARY_FILE).read_text(encoding="utf-8"))


def release_memory() -> None:
    """Hand the memory a finished run freed back to the operating system (glibc only; elsewhere a no-op).

    Each simulation runs Flower's threads anew, and glibc gives threads heaps of their own that it keeps after
    the objects in them are freed: a study's process grew by about 9 MB per round run until a 183-run study
    of the default scenario passed 20 GB and Ray's memory monitor killed its actors. ``malloc_trim`` returns
    the free pages; measured on five 3-round runs of the default scenario, growth fell from 28 to 9 MB a run.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def study_engine(scenario: Scenario, jobs: int = 1, tensorboard: bool = False) -> Iterator[RunFn]:
    """The runner a study (compare, tune) uses for all its simulations, set up once for the whole study.

    One job: every run goes through this process's one Ray instance and one pool of client actors, started
    by the first run (so a study that fails before it starts none) and stopped when the block ends, however
    it ends (``scenario.simulation`` says how: ``num_cpus``, ``ray_address``; see tools/engine.py). Several
    jobs: each run in a child process with its own Ray (Ray is one per process). Generated datasets come
    from the on-disk cache either way (fed_deq/datacache.py). ``tensorboard``: every run also writes its
    TensorBoard scalars to its own ``tb`` folder, so ``tensorboard --logdir STUDY_DIR`` shows them side by side.
    """
    if jobs != 1:
        yield functools.partial(run_in_subprocess, tensorboard=tensorboard)
        return
    from tools.simulate import open_engine

    with contextlib.ExitStack() as stack:
        engines: list = []

        def run(variant: Scenario, out_dir: Path, name: str) -> dict:
            if not engines:
                engines.append(stack.enter_context(open_engine(scenario)))
            try:
                return run_in_process(variant, out_dir, name, engine=engines[0], tensorboard=tensorboard)
            finally:
                release_memory()

        yield run


# --------------------------------------------------------------------------------------------------------
# Scoring and writing


def run_figures(metrics: Sequence[dict], target: float) -> dict[str, Any]:
    """Final and best accuracy, simulated seconds and bytes to ``target`` (None if never reached) and
    simulated seconds in all, of one run (from the rows' ``accuracy``; see ``accuracy_view``)."""
    summary = results.summarise(metrics, scenario_name="", fusion_rule="", wall_time_s=0.0)
    return {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "sim_time_to_target_s": results.time_to_target(metrics, target) if metrics else None,
            "bytes_to_target": bytes_to_target(metrics, target),
            "sim_time_s": summary["sim_time_s"]}


def bytes_to_target(metrics: Sequence[dict], target: float) -> int | None:
    """Bytes sent and received until the accuracy first reached ``target`` (``results.bytes_to_target``);
    None if never reached, or if the rows count no bytes at all (a run recorded before they did)."""
    if not any(key in m for m in metrics for key in ("cumulative_bytes", "bytes_down", "bytes_up")):
        return None
    return results.bytes_to_target(metrics, target)


def accuracy_view(metrics: Sequence[dict], key: str) -> list[dict]:
    """The rows with ``accuracy`` replaced by ``key`` (e.g. ``server_val_accuracy``), so every figure of
    ``run_figures`` is measured on that split instead of the test set."""
    return [{**m, "accuracy": m.get(key)} for m in metrics]


def with_seed(scenario: Scenario, seed: int, source: str) -> Scenario:
    """The scenario with another top-level ``seed``, validated like a scenario file read from ``source``."""
    import yaml

    data = yaml.safe_load(dump_scenario(scenario))
    data["seed"] = int(seed)
    return parse_scenario(data, source)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (for a CSV cell or a progress line)."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def write_csv(path: Path, frame) -> Path:
    """A pandas DataFrame as CSV (no index; missing values empty, floats in full precision), atomically."""
    return results.write_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def save_figure(figure, path: Path) -> Path:
    """A matplotlib figure as PNG, atomically."""
    return results.write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
