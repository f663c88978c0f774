"""`fed-deq compare`: run one scenario once per fusion rule, same seed, and compare them. See docs/tuning.md.

Each rule's run goes into ``DIR/<rule>/``; ``DIR/compare.csv`` gains a row as each run finishes, and
``DIR/compare.png`` shows every rule's test accuracy against simulated time.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

from fed_deq import results
from fed_deq.errors import InputError
from fed_deq.scenario import Scenario
from tools import runs

COMPARE_COLUMNS = ("rule", "final_accuracy", "best_accuracy", "sim_time_to_target_s", "wall_time_s")


def parse_rules(text: str) -> list[str]:
    """Comma-separated fusion rules; unknown or repeated names are an InputError listing the valid ones."""
    valid = runs.fusion_rules()
    rules = [part.strip() for part in str(text).split(",") if part.strip()]
    if not rules:
        raise InputError(f"--rules: give at least one fusion rule; valid rules: {', '.join(valid)}")
    for rule in rules:
        if rule not in valid:
            raise InputError(f"--rules: unknown fusion rule {rule!r}; valid rules: {', '.join(valid)}")
    repeated = sorted({r for r in rules if rules.count(r) > 1})
    if repeated:
        raise InputError(f"--rules: {', '.join(repeated)} given more than once")
    return rules


def compare(scenario: Scenario, rules: Sequence[str], out_dir: str | Path, *, target: float = runs.DEFAULT_TARGET,
            name: str = "scenario", run: runs.RunFn | None = None, console=None) -> list[dict]:
    """Run the scenario once per rule (same seed); write compare.csv and compare.png; return the rows."""
    from rich.console import Console

    runs.check_target(target)
    rules = parse_rules(",".join(rules))
    # Every variant is built (and validated) before the first run starts.
    variants = {rule: runs.with_values(scenario, "fusion", {"rule": rule}, f"--rules {rule}") for rule in rules}
    out_dir = Path(out_dir)
    run = run or runs.run_in_process
    console = console or Console(stderr=True)
    rows, curves = [], {}
    for index, (rule, variant) in enumerate(variants.items(), start=1):
        console.print(f"[bold]compare[/] {index}/{len(rules)}: fusion rule [cyan]{rule}[/]")
        started = time.perf_counter()
        run(variant, out_dir / rule, name)
        wall = time.perf_counter() - started
        metrics = results.read_metrics(out_dir / rule)
        rows.append(compare_row(rule, metrics, target, wall))
        curves[rule] = metrics
        write_compare_csv(rows, out_dir / "compare.csv")  # after every run: an interrupted compare keeps its rows
    plot_compare(curves, target, out_dir / "compare.png")
    return rows


def compare_row(rule: str, metrics: Sequence[dict], target: float, wall_time_s: float) -> dict:
    """One compare.csv row from a run's round records."""
    figures = runs.run_figures(metrics, rule, target)
    return {"rule": rule, "final_accuracy": figures["final_accuracy"], "best_accuracy": figures["best_accuracy"],
            "sim_time_to_target_s": figures["time_to_target_s"], "wall_time_s": wall_time_s}


def write_compare_csv(rows: Sequence[dict], path: Path) -> Path:
    """DIR/compare.csv: one row per rule run so far, written atomically."""
    import pandas

    return runs.write_csv(path, pandas.DataFrame(list(rows), columns=list(COMPARE_COLUMNS)))


def plot_compare(curves: dict[str, Sequence[dict]], target: float, path: Path) -> Path:
    """DIR/compare.png: test accuracy vs simulated time, one curve per rule, the target as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for rule, metrics in curves.items():
        times = [float(m["sim_time_s"]) for m in metrics]
        # NaN breaks the line where a round was not evaluated.
        accuracy = [math.nan if m.get("accuracy") is None else float(m["accuracy"]) for m in metrics]
        ax.plot(times, accuracy, marker="o", markersize=3, label=rule)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return runs.save_figure(figure, path)


def compare_table(rows: Sequence[dict], target: float):
    """A rich table of compare rows."""
    from rich.table import Table

    table = Table(title=f"fed-deq compare · target accuracy {target:g}")
    for column in ("rule", "final acc", "best acc", "sim time to target (s)", "wall (s)"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for row in rows:
        ttt = row["sim_time_to_target_s"]
        table.add_row(row["rule"], _fmt(row["final_accuracy"]), _fmt(row["best_accuracy"]),
                      "not reached" if ttt is None else f"{ttt:,.1f}", f"{row['wall_time_s']:.1f}")
    return table


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    """Add the `compare` sub-command to the fed-deq parser."""
    from tools.args import add_scenario_args

    p = subparsers.add_parser(
        "compare", help="run a scenario once per fusion rule and compare them",
        description="Run a scenario once per fusion rule, with the same seed, and write compare.csv (final and "
                    "best accuracy, simulated time to the target accuracy, wall time), compare.png (accuracy "
                    "curves) and one run folder per rule.")
    add_scenario_args(p, optional=False)
    p.add_argument("--rules", required=True, help=f"comma-separated, from: {', '.join(runs.fusion_rules())}")
    p.add_argument("--target", type=float, default=runs.DEFAULT_TARGET,
                   help="accuracy for time to target (default 0.8)")
    p.add_argument("--out", required=True, help="output folder: compare.csv, compare.png, one run folder per rule")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """`fed-deq compare`: validate the rules, run one simulation per rule, print the table."""
    from rich.console import Console

    from tools.args import checked_out_dir, load_from_args, scenario_name

    out_dir = checked_out_dir(args.out)
    rules = parse_rules(args.rules)
    runs.check_target(args.target)
    scenario = load_from_args(args)
    rows = compare(scenario, rules, out_dir, target=args.target, name=scenario_name(args),
                   console=Console(stderr=True))
    Console().print(compare_table(rows, args.target))
    print(f"outputs in {out_dir}/ (compare.csv, compare.png, one folder per rule)")
    return 0
