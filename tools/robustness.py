"""`fed-deq robustness`: a robustness matrix, fusion rules x attacks x adversary fractions x seeds.

Per rule, a clean reference run (no adversaries) and, per attack and fraction, the scenario with that share of
every tier's devices mounting the attack (rounded half up per tier, as ``adversaries: {share: ...}`` says). Every
cell runs on the same seeds, so each attacked run is paired with its rule's clean run on the same fleet, data
and sampling. All runs share one study engine (one Ray instance, one loaded dataset). The output folder DIR:

- ``DIR/<rule>/none-0/seed-<seed>/`` and ``DIR/<rule>/<attack>-<fraction>/seed-<seed>/``: one run folder each
  (metrics.jsonl, summary.json, scenario.yaml — the variant, adversaries included — accuracy.png);
- ``DIR/robustness.csv``: one row per run (planted adversaries, final and best test accuracy, rejections of
  planted and of honest partitions, dropped and failed clients, wall time);
- ``DIR/robustness_summary.csv``: one row per (rule, attack, fraction) cell: means with 95% Student-t
  intervals, and the paired difference of the final accuracy against the rule's clean run;
- ``DIR/robustness_worst.csv``: per rule and fraction, the attack with the lowest mean final accuracy;
- ``DIR/robustness.png``: one heatmap per rule (attacks x fractions, mean final accuracy).

The CSVs are rewritten after every run and the plot drawn even after an interrupt, so an interrupted matrix
keeps what it finished. Runs go seed by seed (every cell on a seed before the next seed), so the finished part
of an interrupted matrix is paired too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_deq import adversary, results
from fed_deq.errors import InputError
from fed_deq.scenario import Scenario, dump_scenario, names, parse_scenario, tier_names
from fed_deq.scenario.messages import did_you_mean
from tools import compare, multiseed, runs

CLEAN = "none"  # the attack label of a rule's reference run (no adversaries, fraction 0)
ROW_COLUMNS = ("rule", "attack", "fraction", "seed", "adversaries", "final_accuracy", "best_accuracy",
               "rejected_adversaries", "rejected_honest", "dropped", "failed", "wall_time_s")
SUMMARY_COLUMNS = ("rule", "attack", "fraction", "adversaries", "runs", "final_accuracy_mean",
                   "final_accuracy_ci_low", "final_accuracy_ci_high", "best_accuracy_mean",
                   "rejected_adversaries_mean", "rejected_honest_mean", "final_accuracy_diff_n",
                   "final_accuracy_diff_mean", "final_accuracy_diff_ci_low", "final_accuracy_diff_ci_high")
WORST_COLUMNS = ("rule", "fraction", "attack", "final_accuracy_mean", "final_accuracy_ci_low",
                 "final_accuracy_ci_high", "clean_final_accuracy_mean", "final_accuracy_diff_mean",
                 "final_accuracy_diff_ci_low", "final_accuracy_diff_ci_high")

#: A cell of the matrix, (rule, attack, fraction); a variant is a cell on one seed.
Cell = tuple[str, str, float]


@dataclass(frozen=True)
class Robustness:
    """What a robustness matrix produced: per-run rows, per-cell summary rows and per-rule worst cases."""

    rows: list[dict]
    summary: list[dict]
    worst: list[dict]
    seeds: list[int]


# --------------------------------------------------------------------------------------------------------
# Validation


def _items(value: str | Sequence) -> list:
    """A comma-separated option, or a sequence already split."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def check_rules(rules: str | Sequence[str]) -> list[str]:
    """Fusion rules, comma-separated or listed: known and not repeated (as compare checks them)."""
    return compare.parse_rules(",".join(str(rule) for rule in _items(rules)))


def check_attacks(attacks: str | Sequence[str]) -> list[str]:
    """Attacks, comma-separated or listed: registered today (whatever they are) and not repeated."""
    valid = names("attack")
    given = [str(attack) for attack in _items(attacks)]
    if not given:
        raise InputError(f"--attacks: give at least one attack; valid attacks: {', '.join(valid)}")
    for attack in given:
        if attack not in valid:
            raise InputError(f"--attacks: unknown attack {attack!r}{did_you_mean(attack, list(valid))}; "
                             f"valid attacks: {', '.join(valid)}")
    repeated = sorted({a for a in given if given.count(a) > 1})
    if repeated:
        raise InputError(f"--attacks: {', '.join(repeated)} given more than once")
    return given


def check_fractions(fractions: str | Sequence[float | str]) -> list[float]:
    """Adversary fractions, comma-separated or listed: numbers in (0, 1], none given twice."""
    given = _items(fractions)
    if not given:
        raise InputError("--fractions: give at least one fraction in (0, 1]")
    values = [_fraction(item) for item in given]
    labels = [fraction_label(value) for value in values]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise InputError(f"--fractions: {', '.join(repeated)} given more than once")
    return values


def _fraction(item: Any) -> float:
    try:
        value = float(item)
    except (TypeError, ValueError):
        raise InputError(f"--fractions: {item!r} is not a number") from None
    # 0 is the clean run, which the matrix adds itself; above 1 a tier cannot hold that many adversaries.
    if isinstance(item, bool) or not (math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"--fractions: must be in (0, 1], got {item}")
    return value


def fraction_label(fraction: float) -> str:
    """How a fraction is written in folder names and tables: ``0.1``, ``1``; ``0`` for the clean run."""
    short = f"{fraction:g}"
    return short if float(short) == fraction else repr(float(fraction))  # never two fractions one label


def check_clean(scenario: Scenario) -> None:
    """The matrix places the adversaries itself, so the scenario must not plant any."""
    if scenario.adversaries:
        raise InputError("robustness: the scenario already plants adversaries (adversaries); remove them, "
                         "the matrix places its own")


# --------------------------------------------------------------------------------------------------------
# Variants


def variant_scenario(scenario: Scenario, cell: Cell, seed: int) -> Scenario:
    """The scenario with ``fusion.rule``, one adversaries entry per tier (``share`` = the fraction) and the
    seed of a cell, validated like a scenario file (scenarios are immutable: through the dumped dict)."""
    import yaml

    rule, attack, fraction = cell
    data = yaml.safe_load(dump_scenario(scenario))
    data["fusion"]["rule"] = rule
    data["adversaries"] = [] if attack == CLEAN else [
        {"tier": tier, "attack": attack, "share": float(fraction)} for tier in tier_names(scenario)]
    data["seed"] = int(seed)
    return parse_scenario(data, f"robustness: rule {rule}, attack {attack}, fraction {fraction_label(fraction)}, "
                                f"seed {seed}")


def matrix_cells(rules: Sequence[str], attacks: Sequence[str], fractions: Sequence[float]) -> list[Cell]:
    """Every cell in run order: per rule, its clean run first, then each attack at each fraction."""
    return [cell for rule in rules for cell in
            [(rule, CLEAN, 0.0), *((rule, attack, fraction) for attack in attacks for fraction in fractions)]]


def build_variants(scenario: Scenario, cells: Sequence[Cell], seeds: Sequence[int]) -> dict[tuple[Cell, int], Scenario]:
    """Every (cell, seed) variant, seed by seed, built and validated before the first run starts."""
    return {(cell, seed): variant_scenario(scenario, cell, seed) for seed in seeds for cell in cells}


def run_dir(out_dir: Path, cell: Cell, seed: int) -> Path:
    """``DIR/<rule>/<attack>-<fraction>/seed-<seed>/``."""
    rule, attack, fraction = cell
    return out_dir / rule / f"{attack}-{fraction_label(fraction)}" / f"seed-{seed}"


# --------------------------------------------------------------------------------------------------------
# The matrix


def robustness(scenario: Scenario, rules: Sequence[str], attacks: Sequence[str], fractions: Sequence[float],
               out_dir: str | Path, *, seeds: int = 1, name: str = "scenario", run: runs.RunFn | None = None,
               console=None, tensorboard: bool = False) -> Robustness:
    """Run every rule clean and under every attack and fraction, on each seed; write the CSVs and the plot.

    Everything is validated and every variant built before the first run. All simulations run in one study
    engine unless ``run`` is given; ``tensorboard``: each run also writes its scalars to its folder's ``tb``.
    """
    from rich.console import Console

    check_clean(scenario)
    cells = matrix_cells(check_rules(rules), check_attacks(attacks), check_fractions(fractions))
    seed_list = multiseed.study_seeds(scenario.seed, multiseed.check_seeds(seeds))
    variants = build_variants(scenario, cells, seed_list)
    out_dir, console = Path(out_dir), console or Console(stderr=True)
    rows: list[dict] = []
    engine = contextlib.nullcontext(run) if run is not None else runs.study_engine(scenario, 1, tensorboard)
    try:
        with engine as run_one:
            for row in _run_all(variants, run_one, out_dir, name, console):
                rows.append(row)
                write_outputs(rows, out_dir)  # after every run: an interrupted matrix keeps its rows
    finally:
        if rows:
            plot_robustness(summarise(rows), out_dir / "robustness.png")
    summary = summarise(rows)
    return Robustness(rows, summary, worst_cases(summary), seed_list)


def _run_all(variants: Mapping[tuple[Cell, int], Scenario], run_one: runs.RunFn, out_dir: Path, name: str,
             console) -> Iterator[dict]:
    """Run each variant in turn, yielding its robustness.csv row as soon as it finishes."""
    for index, ((cell, seed), variant) in enumerate(variants.items(), start=1):
        rule, attack, fraction = cell
        console.print(f"[bold]robustness[/] {index}/{len(variants)}: rule [cyan]{rule}[/], attack "
                      f"[magenta]{attack}[/], fraction {fraction_label(fraction)}, seed {seed}")
        folder = run_dir(out_dir, cell, seed)
        started = time.perf_counter()
        run_one(variant, folder, name)
        yield run_row(cell, seed, variant, results.read_metrics(folder), time.perf_counter() - started)


def run_row(cell: Cell, seed: int, variant: Scenario, metrics: Sequence[Mapping], wall_time_s: float) -> dict:
    """One robustness.csv row from a run's round records and the partitions its variant planted."""
    rule, attack, fraction = cell
    planted = {str(pid) for pid in adversary.assign(variant)}  # metrics.jsonl keys partitions as strings
    rejected = [pid for record in metrics for pid in (record.get("rejected") or {})]
    figures = runs.run_figures(metrics, runs.DEFAULT_TARGET)
    return {"rule": rule, "attack": attack, "fraction": fraction, "seed": seed, "adversaries": len(planted),
            "final_accuracy": figures["final_accuracy"], "best_accuracy": figures["best_accuracy"],
            "rejected_adversaries": sum(pid in planted for pid in rejected),
            "rejected_honest": sum(pid not in planted for pid in rejected),
            "dropped": sum(int(record.get("clients_dropped") or 0) for record in metrics),
            "failed": sum(int(record.get("clients_failed") or 0) for record in metrics),
            "wall_time_s": wall_time_s}


# --------------------------------------------------------------------------------------------------------
# Summaries


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """One summary row per cell, in run order: means (95% Student-t intervals for the final accuracy) and the
    paired differences of the final accuracy against the rule's clean run (empty on the clean row itself)."""
    cells = list(dict.fromkeys(_cell(row) for row in rows))
    return [summarise_cell(cell, rows) for cell in cells]


def _cell(row: Mapping) -> Cell:
    return row["rule"], row["attack"], float(row["fraction"])


def summarise_cell(cell: Cell, rows: Sequence[Mapping]) -> dict:
    """The summary row of one cell from all rows (the rule's clean rows give the paired differences)."""
    mine = [row for row in rows if _cell(row) == cell]
    final = multiseed.mean_interval(row["final_accuracy"] for row in mine)
    diffs = [] if cell[1] == CLEAN else clean_differences(cell, rows)
    diff = multiseed.mean_interval(diffs)
    return {"rule": cell[0], "attack": cell[1], "fraction": cell[2], "adversaries": mine[0]["adversaries"],
            "runs": len(mine), "final_accuracy_mean": final.mean, "final_accuracy_ci_low": final.low,
            "final_accuracy_ci_high": final.high,
            "best_accuracy_mean": multiseed.mean_interval(row["best_accuracy"] for row in mine).mean,
            "rejected_adversaries_mean": _mean(row["rejected_adversaries"] for row in mine),
            "rejected_honest_mean": _mean(row["rejected_honest"] for row in mine),
            "final_accuracy_diff_n": diff.n, "final_accuracy_diff_mean": diff.mean,
            "final_accuracy_diff_ci_low": diff.low, "final_accuracy_diff_ci_high": diff.high}


def clean_differences(cell: Cell, rows: Sequence[Mapping]) -> list[float]:
    """Final accuracy of the cell minus its rule's clean run, seed by seed, where both have one."""
    clean = {row["seed"]: row["final_accuracy"] for row in rows if _cell(row) == (cell[0], CLEAN, 0.0)}
    return [float(row["final_accuracy"]) - float(clean[row["seed"]]) for row in rows
            if _cell(row) == cell and row["final_accuracy"] is not None and clean.get(row["seed"]) is not None]


def _mean(values) -> float:
    values = [float(v) for v in values]
    return math.fsum(values) / len(values)


def worst_cases(summary: Sequence[Mapping]) -> list[dict]:
    """Per rule and fraction, the attack with the lowest mean final accuracy (the first listed on a tie)."""
    worst = []
    for rule in dict.fromkeys(entry["rule"] for entry in summary):
        attacked = [e for e in summary if e["rule"] == rule and e["attack"] != CLEAN
                    and e["final_accuracy_mean"] is not None]
        clean = next((e for e in summary if e["rule"] == rule and e["attack"] == CLEAN), {})
        for fraction in dict.fromkeys(e["fraction"] for e in attacked):
            entry = min((e for e in attacked if e["fraction"] == fraction), key=lambda e: e["final_accuracy_mean"])
            worst.append({**{key: entry[key] for key in WORST_COLUMNS if key in entry},
                          "clean_final_accuracy_mean": clean.get("final_accuracy_mean")})
    return worst


def write_outputs(rows: Sequence[Mapping], out_dir: Path) -> None:
    """DIR/robustness.csv, robustness_summary.csv and robustness_worst.csv from the rows so far, atomically."""
    import pandas

    summary = summarise(rows)
    for file, table, columns in (("robustness.csv", rows, ROW_COLUMNS),
                                 ("robustness_summary.csv", summary, SUMMARY_COLUMNS),
                                 ("robustness_worst.csv", worst_cases(summary), WORST_COLUMNS)):
        runs.write_csv(out_dir / file, pandas.DataFrame(list(table), columns=list(columns)))


# --------------------------------------------------------------------------------------------------------
# Plot


def heatmap_grid(summary: Sequence[Mapping], rule: str) -> tuple[list[str], list[float], list[list[float]]]:
    """One rule's heatmap: row labels (clean first, then attacks), fractions, and mean final accuracies (NaN
    where a cell has none). The clean row repeats the clean mean in every column, to read each cell against."""
    mine = [e for e in summary if e["rule"] == rule]
    attacks = list(dict.fromkeys(e["attack"] for e in mine if e["attack"] != CLEAN))
    fractions = sorted({e["fraction"] for e in summary if e["attack"] != CLEAN})
    means = {(e["attack"], e["fraction"]): e["final_accuracy_mean"] for e in mine}
    clean = means.get((CLEAN, 0.0))
    grid = [[_nan(clean)] * len(fractions)]
    grid += [[_nan(means.get((attack, fraction))) for fraction in fractions] for attack in attacks]
    return ["clean (none)", *attacks], fractions, grid


def plot_robustness(summary: Sequence[Mapping], path: Path) -> Path:
    """DIR/robustness.png: per rule a heatmap of mean final test accuracy, rows attacks, columns fractions,
    every cell annotated; one colour scale for all rules, so the panels compare."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rules = list(dict.fromkeys(e["rule"] for e in summary))
    grids = {rule: heatmap_grid(summary, rule) for rule in rules}
    finite = [v for _, _, grid in grids.values() for line in grid for v in line if math.isfinite(v)] or [0.0, 1.0]
    low, high = min(finite), max(finite)
    high = high if high > low else low + 1e-6  # one value alone still needs a range
    n_rows = max(len(labels) for labels, _, _ in grids.values())
    n_cols = max(len(fractions) for _, fractions, _ in grids.values()) or 1
    figure = Figure(figsize=(max(4.0, (1.1 * n_cols + 2.2) * len(rules)), 0.5 * n_rows + 2.0), dpi=100,
                    layout="constrained")  # leaves room for the shared colour bar
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(rules), squeeze=False)[0]
    for ax, rule in zip(axes, rules):
        image = _heatmap(ax, rule, *grids[rule], low, high)
    figure.colorbar(image, ax=list(axes), label="mean final test accuracy")
    return runs.save_figure(figure, path)


def _heatmap(ax, rule: str, labels: list[str], fractions: list[float], grid: list[list[float]], low: float,
             high: float):
    import numpy as np

    values = np.ma.masked_invalid(np.array(grid, dtype=float).reshape(len(labels), len(fractions)))
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
    for (i, j), value in np.ndenumerate(values.filled(np.nan)):
        if math.isfinite(value):  # dark text on the light end of viridis, light text on the dark end
            light = (value - low) / (high - low) > 0.6
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize="small",
                    color="black" if light else "white")
    ax.set_xticks(range(len(fractions)), [fraction_label(f) for f in fractions])
    ax.set_yticks(range(len(labels)), labels)
    ax.axhline(0.5, color="white", linewidth=2)  # sets the clean reference row apart
    ax.set_xlabel("adversary fraction (per tier)")
    ax.set_title(rule)
    return image


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------------------------
# Table and command line


def worst_table(result: Robustness):
    """A rich table of each rule's worst attack per fraction: mean [95% CI], clean mean, and the difference."""
    from rich.table import Table

    table = Table(title=f"fed-deq robustness · worst attack per rule and fraction · {len(result.seeds)} seed(s) "
                        f"· final test accuracy, mean [95% CI]")
    for column in ("rule", "fraction", "worst attack", "final acc", "clean final acc", "Δ vs clean"):
        table.add_column(column, justify="left" if column in ("rule", "worst attack") else "right")
    for row in result.worst:
        table.add_row(row["rule"], fraction_label(row["fraction"]), row["attack"],
                      multiseed.format_interval(row, "final_accuracy"),
                      multiseed.format_interval({"clean_mean": row["clean_final_accuracy_mean"]}, "clean"),
                      multiseed.format_interval(row, "final_accuracy_diff"))
    return table


def register(subparsers) -> None:
    """Add the `robustness` sub-command to the fed-deq parser."""
    from tools.args import add_scenario_args

    p = subparsers.add_parser(
        "robustness", help="run a scenario per fusion rule, attack, adversary fraction and seed: a robustness matrix",
        description="Run a scenario once per fusion rule, attack, adversary fraction and seed (the same seeds for "
                    "every cell), plus a clean run per rule and seed, with that fraction of every tier's devices "
                    "mounting the attack. Writes robustness.csv (one row per run: planted adversaries, final and "
                    "best test accuracy, rejections of planted and honest clients, drops, failures), "
                    "robustness_summary.csv (per cell: means with 95% Student-t intervals, and paired "
                    "differences against the rule's clean run), robustness_worst.csv (each rule's worst attack "
                    "per fraction), robustness.png and one run folder per cell and seed.")
    add_scenario_args(p, optional=False)
    p.add_argument("--rules", required=True, help=f"comma-separated, from: {', '.join(runs.fusion_rules())}")
    p.add_argument("--attacks", required=True,
                   help=f"comma-separated, from: {', '.join(names('attack'))} (each with its defaults)")
    p.add_argument("--fractions", required=True,
                   help="comma-separated shares of every tier's devices that mount the attack, in (0, 1], rounded "
                        "half up per tier (e.g. 0.1,0.2,0.3)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per cell; the first seed is the scenario's, the others derived from it (default 1)")
    p.add_argument("--out", required=True,
                   help="output folder: robustness.csv, robustness_summary.csv, robustness_worst.csv, "
                        "robustness.png, DIR/<rule>/<attack>-<fraction>/seed-<seed>/ (clean: none-0)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each run's TensorBoard scalars to its run folder's tb "
                        "(tensorboard --logdir DIR shows them side by side)")
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    """`fed-deq robustness`: validate everything, run the matrix, print each rule's worst cases."""
    from rich.console import Console

    from tools.args import checked_out_dir, load_from_args, scenario_name

    out_dir = checked_out_dir(args.out)
    rules, attacks = check_rules(args.rules), check_attacks(args.attacks)
    fractions = check_fractions(args.fractions)
    multiseed.check_seeds(args.seeds)
    scenario = load_from_args(args)
    check_clean(scenario)
    result = robustness(scenario, rules, attacks, fractions, out_dir, seeds=args.seeds, name=scenario_name(args),
                        console=Console(stderr=True), tensorboard=args.tensorboard)
    Console().print(worst_table(result))
    print(f"outputs in {out_dir}/ (robustness.csv, robustness_summary.csv, robustness_worst.csv, robustness.png, "
          f"one folder per rule, attack, fraction and seed)")
    return 0
