"""`make bench` step `study`: the fixed cost of one more run inside a study (`fed-deq compare`, `fed-deq tune`).

A study runs all its simulations on one engine: one Ray instance and one pool of client actors, started once
(tools/engine.py), and datasets read from the on-disk cache (fed_deq/datacache.py). The step times the same
compare with 1 seed (2 runs) and with 3 seeds (6 runs), each a child process, back to back; the wall the 4 extra
runs add, per run, minus the bare loop's work for those same runs (the same rules and seeds, one after the
other in one warm process) is what each extra run costs beyond its work.

    .venv/bin/python benchmarks/run_all.py --only study
"""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

FED_DEQ = ".venv/bin/fed-deq"
PY = ".venv/bin/python"
SCENARIO = "scenarios/digits-iid.yaml"
RULES = "fedavg,quality"
ROUNDS = ["--set", "training.rounds=2"]
FEW, MANY = 1, 3


def compare_command(seeds: int, out: Path) -> list[str]:
    """The compare the step times (the command of the issue's done-when, with ``seeds`` seeds)."""
    return [FED_DEQ, "compare", SCENARIO, "--rules", RULES, "--seeds", str(seeds), *ROUNDS, "--out", str(out)]


def read_runs(out: Path) -> list[dict]:
    """compare.csv rows in run order, each with its run's own wall (summary.json: its rounds and evaluation)."""
    with open(out / "compare.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        summary = json.loads((out / row["rule"] / f"seed-{row['seed']}" / "summary.json").read_text())
        row["run_wall_s"], row["rounds_wall_s"] = float(row["wall_time_s"]), float(summary["wall_time_s"])
    return rows


def step_study(out: Path, run: Callable, figure: Callable) -> dict:
    """study_extra_run_s: (wall of the 3-seed compare - wall of the 1-seed one) / extra runs - bare work per run."""
    dirs = {seeds: out / f"study-{seeds}-seed" for seeds in (FEW, MANY)}
    for folder in dirs.values():
        shutil.rmtree(folder, ignore_errors=True)  # a compare adds to its folder: start from nothing
    walls = {seeds: run(compare_command(seeds, folder), out / "logs" / f"{folder.name}.log").wall_s
             for seeds, folder in dirs.items()}
    runs, few = read_runs(dirs[MANY]), len(read_runs(dirs[FEW]))
    extra = runs[few:]
    variants = ",".join(f"{r['rule']}@{r['seed']}" for r in runs)
    bare_out = out / "study-bare"
    bare_cmd = [PY, "benchmarks/bare_loop.py", SCENARIO, "--out", str(bare_out), *ROUNDS, "--variants", variants]
    log = out / "logs" / "study-bare.log"
    run(bare_cmd, log)
    bare = json.loads(log.read_text(encoding="utf-8").strip().splitlines()[-1])["runs"][few:]
    marginal = (walls[MANY] - walls[FEW]) / len(extra)
    bare_work = statistics.fmean(b["wall_s"] for b in bare)
    command = (f"{shlex.join(compare_command(MANY, dirs[MANY]))}  vs  {shlex.join(compare_command(FEW, dirs[FEW]))}"
               f"  vs  {shlex.join(bare_cmd)}")
    return {"study_extra_run_s": figure("study_extra_run_s", marginal - bare_work, command, {
        "compare_wall_s": {str(FEW): walls[FEW], str(MANY): walls[MANY]},
        "runs": {str(FEW): few, str(MANY): len(runs)},
        "wall_per_extra_run_s": marginal, "bare_work_per_run_s": bare_work,
        "first_run_wall_s": runs[0]["run_wall_s"],
        "extra_run_walls_s": [r["run_wall_s"] for r in extra],
        "extra_run_outside_rounds_s": [r["run_wall_s"] - r["rounds_wall_s"] for r in extra],
        "bare_walls_s": [b["wall_s"] for b in bare],
    })}
