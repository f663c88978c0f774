"""The shape of benchmarks/results.json, its checker, and the fleet section of docs/benchmarks.md.

results.json::

    {"schema": 1, "generated": "<ISO time>", "total_wall_s": 812.3,
     "machine": {"cpus": 2, "python": "3.11.9", "torch": "...", "flwr": "...", "ray": "...", ...},
     "figures": {"<name>": {"value": 0.93, "unit": "x", "goal": "<= 1.0", "goal_max": 1.0, "met": true,
                            "what": "...", "command": "...", "details": {...}}, ...}}

Every figure in FIGURES is present. A figure is either measured (``value`` a finite number, ``met`` a bool
when it has a goal) or missing (``value`` null and a ``missing`` reason) — only figures read from another
benchmark's output may be missing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: name → (unit, goal_max or None, may be missing, one-line meaning)
FIGURES: dict[str, tuple[str, float | None, bool, str]] = {
    "overhead_ratio": ("x", 1.0, False,
                       "wall of `fed-deq simulate` on the default scenario / a bare sequential loop doing the "
                       "same client work and central evaluation"),
    "overhead_per_update_s": ("s", None, False,
                              "framework overhead per client update: (wall of `fed-deq simulate` - wall of the "
                              "bare loop) / client updates, default scenario"),
    "study_extra_run_s": ("s", 2.0, False,
                          "fixed cost of one more run inside a study: wall added per extra run of `fed-deq "
                          "compare` (3 seeds vs 1) minus the bare loop's work for the same runs"),
    "large_fleet_peak_rss_gib": ("GiB", 4.0, False,
                                 "peak resident memory (sum over the whole process tree, Ray included) on "
                                 "scenarios/large-fleet.yaml"),
    "fleet_size_round_ratio": ("x", 1.2, False,
                               "median round wall at 1,000 vs 100 total clients, 50 sampled, same per-client data"),
    # The two solver figures and their goals come from benchmarks/solvers.py (see its section of the docs).
    "anderson_over_picard_iters": ("x", 0.6, True,
                                   "Anderson / Picard mean iterations to tolerance on the slow-mixing `none` cell, "
                                   "capped samples counted at the cap (from benchmarks/solvers.json)"),
    "solver_time_ratio_vs_torchdeq": ("x", 1.1, True,
                                      "fed-deq / torchdeq time per Anderson iteration (from benchmarks/solvers.json)"),
    "warm_over_cold_iters": ("x", 0.7, False,
                             "mean forward iterations of warm-started / cold clients after round 3, default scenario "
                             "with budgets large enough that the tolerance stops the solve"),
    "quality_over_fedavg_time_to_target": ("x", None, False,
                                           "simulated time to the target accuracy, quality rule / FedAvg, "
                                           "heterogeneous-fleet scenario"),
}
FLEET_START = "<!-- fleet:start -->"
FLEET_END = "<!-- fleet:end -->"


class SchemaError(ValueError):
    """results.json does not have the documented shape."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def figure_problems(name: str, figure: Any) -> list[str]:
    """What is wrong with one figure entry (empty when it is fine)."""
    if not isinstance(figure, dict):
        return [f"figures.{name}: must be an object, got {type(figure).__name__}"]
    unit, goal_max, may_miss, _ = FIGURES[name]
    problems = []
    for key, kind in (("unit", str), ("command", str), ("what", str), ("details", dict)):
        if not isinstance(figure.get(key), kind):
            problems.append(f"figures.{name}.{key}: must be a {kind.__name__}")
    if figure.get("unit") != unit:
        problems.append(f"figures.{name}.unit: must be {unit!r}, got {figure.get('unit')!r}")
    value = figure.get("value")
    if value is None:
        if not may_miss:
            problems.append(f"figures.{name}.value: must be measured (a finite number)")
        elif not isinstance(figure.get("missing"), str) or not figure["missing"]:
            problems.append(f"figures.{name}.missing: a missing value needs a reason")
        return problems
    if not _finite(value):
        problems.append(f"figures.{name}.value: must be a finite number, got {value!r}")
    if figure.get("goal_max") != goal_max:
        problems.append(f"figures.{name}.goal_max: must be {goal_max!r}, got {figure.get('goal_max')!r}")
    met = figure.get("met")
    if goal_max is None:
        if met is not None:
            problems.append(f"figures.{name}.met: must be null for a figure without a goal")
    elif not isinstance(met, bool):
        problems.append(f"figures.{name}.met: must be true or false")
    elif _finite(value) and met != (value <= goal_max):
        problems.append(f"figures.{name}.met: says {met} but {value} vs goal <= {goal_max}")
    problems += _nonfinite_details(f"figures.{name}.details", figure.get("details"))
    return problems


def _nonfinite_details(path: str, value: Any) -> list[str]:
    """Details may nest; every number in them must be finite (strict JSON has no NaN/inf anyway)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nonfinite_details(f"{path}.{k}", v)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nonfinite_details(f"{path}[{i}]", v)]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path}: must be finite, got {value}"]
    return []


def check_results(data: Any) -> None:
    """Raise SchemaError listing every problem of a results.json document."""
    if not isinstance(data, dict):
        raise SchemaError("results.json: top level must be an object")
    problems = []
    if data.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema: must be {SCHEMA_VERSION}, got {data.get('schema')!r}")
    if not isinstance(data.get("generated"), str) or not re.match(r"^\d{4}-\d\d-\d\dT", data.get("generated", "")):
        problems.append("generated: must be an ISO 8601 time")
    if not _finite(data.get("total_wall_s")) or data.get("total_wall_s", -1) < 0:
        problems.append("total_wall_s: must be a finite number >= 0")
    machine = data.get("machine")
    if not isinstance(machine, dict) or not isinstance(machine.get("cpus"), int):
        problems.append("machine: must be an object with an integer cpus")
    figures = data.get("figures")
    if not isinstance(figures, dict):
        problems.append("figures: must be an object")
        figures = {}
    for name in FIGURES:
        if name not in figures:
            problems.append(f"figures.{name}: missing")
        else:
            problems += figure_problems(name, figures[name])
    for name in figures:
        if name not in FIGURES:
            problems.append(f"figures.{name}: unknown figure")
    if problems:
        raise SchemaError("; ".join(problems))


def replace_fleet_section(document: str, section: str) -> str:
    """``document`` with the text between the fleet markers replaced (markers appended if absent).

    Only the fleet section is touched: the solvers and containers sections belong to other benchmarks.
    """
    block = f"{FLEET_START}\n{section.strip()}\n{FLEET_END}"
    start, end = document.find(FLEET_START), document.find(FLEET_END)
    if start == -1 and end == -1:
        return (document.rstrip() + "\n\n" if document.strip() else "# Benchmarks\n\n") + block + "\n"
    if start == -1 or end == -1 or end < start or document.count(FLEET_START) != 1 or document.count(FLEET_END) != 1:
        raise SchemaError(f"docs/benchmarks.md: needs exactly one {FLEET_START} before one {FLEET_END}")
    return document[:start] + block + document[end + len(FLEET_END):]


def update_fleet_doc(path: Path, section: str) -> None:
    """Rewrite only the fleet section of ``path`` (created if it does not exist)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_fleet_section(old, section), encoding="utf-8")
