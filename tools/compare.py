"""`fed-deq compare`: run one scenario once per fusion rule and seed, and compare the rules with intervals.

Every rule runs on the same seeds (so on the same fleets, data, sampling and stragglers), seed by seed, into
``DIR/<rule>/seed-<seed>/``. ``DIR/compare.csv`` gains a row as each run finishes and
``DIR/compare_summary.csv`` (per rule: means with 95% Student-t intervals, and paired differences against the
baseline rule) is rewritten with it, so an interrupted compare keeps what it finished. ``DIR/compare.png``
shows each rule's mean accuracy with its interval band. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fed_deq import results
from fed_deq.errors import InputError
from fed_deq.scenario import Scenario
from tools import multiseed, runs

DEFAULT_BASELINE = "fedavg"
COMPARE_COLUMNS = ("rule", "seed", "final_accuracy", "best_accuracy", "sim_time_to_target_s", "bytes_to_target",
                   "sim_time_s", "wall_time_s")


@dataclass(frozen=True)
class Comparison:
    """What a compare produced: one row per (rule, seed) run, and one summary row per rule."""

    rows: list[dict]
    summary: list[dict]
    baseline: str
    seeds: list[int]


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


def study_rules(rules: Sequence[str], baseline: str) -> list[str]:
    """The rules a compare runs: ``rules`` checked, with the baseline put first when it is not among them."""
    rules = parse_rules(",".join(rules))
    if baseline not in runs.fusion_rules():
        raise InputError(f"--baseline: unknown fusion rule {baseline!r}; valid rules: "
                         f"{', '.join(runs.fusion_rules())}")
    return rules if baseline in rules else [baseline, *rules]


def compare(scenario: Scenario, rules: Sequence[str], out_dir: str | Path, *, target: float = runs.DEFAULT_TARGET,
            seeds: int = 1, baseline: str = DEFAULT_BASELINE, name: str = "scenario", run: runs.RunFn | None = None,
            console=None, tensorboard: bool = False) -> Comparison:
    """Run the scenario once per rule and seed; write compare.csv, compare_summary.csv and compare.png.

    All simulations run in one study engine (one Ray instance, one loaded dataset) unless ``run`` is given.
    ``tensorboard``: each run also writes TensorBoard scalars to its folder's ``tb`` (the study engine's runs).
    """
    from rich.console import Console

    runs.check_target(target)
    rules = study_rules(rules, baseline)
    seed_list = multiseed.study_seeds(scenario.seed, multiseed.check_seeds(seeds))
    # Every variant is built (and validated) before the first run starts.
    variants = {(rule, seed): runs.with_seed(runs.with_values(scenario, "fusion", {"rule": rule}, f"--rules {rule}"),
                                             seed, f"--rules {rule} seed {seed}")
                for seed in seed_list for rule in rules}
    out_dir = Path(out_dir)
    console = console or Console(stderr=True)
    rows: list[dict] = []
    curves: dict[tuple[str, int], list[dict]] = {}
    engine = contextlib.nullcontext(run) if run is not None else runs.study_engine(scenario, 1, tensorboard)
    try:
        with engine as run_one:
            for index, ((rule, seed), variant) in enumerate(variants.items(), start=1):
                console.print(f"[bold]compare[/] {index}/{len(variants)}: fusion rule [cyan]{rule}[/], seed {seed}")
                started = time.perf_counter()
                run_dir = out_dir / rule / f"seed-{seed}"
                run_one(variant, run_dir, name)
                metrics = results.read_metrics(run_dir)
                rows.append(compare_row(rule, seed, metrics, target, time.perf_counter() - started))
                curves[(rule, seed)] = metrics
                write_outputs(rows, baseline, out_dir)  # after every run: an interrupted compare keeps its rows
    finally:
        if curves:
            plot_compare(curves, target, out_dir / "compare.png")
    return Comparison(rows, multiseed.summarise_rules(rows, baseline), baseline, seed_list)


def compare_row(rule: str, seed: int, metrics: Sequence[dict], target: float, wall_time_s: float) -> dict:
    """One compare.csv row from a run's round records (test-set accuracy)."""
    return {"rule": rule, "seed": seed, **runs.run_figures(metrics, target), "wall_time_s": wall_time_s}


def write_outputs(rows: Sequence[dict], baseline: str, out_dir: Path) -> None:
    """DIR/compare.csv (one row per run so far) and DIR/compare_summary.csv (one per rule), atomically."""
    import pandas

    runs.write_csv(out_dir / "compare.csv", pandas.DataFrame(list(rows), columns=list(COMPARE_COLUMNS)))
    summary = multiseed.summarise_rules(rows, baseline)
    runs.write_csv(out_dir / "compare_summary.csv",
                   pandas.DataFrame(summary, columns=multiseed.summary_columns(with_baseline=True)))


# --------------------------------------------------------------------------------------------------------
# Plot


def mean_curve(runs_of_rule: Sequence[Sequence[Mapping]], x_key: str) -> tuple[list[float], list[multiseed.Interval]]:
    """Per round, the mean over seeds of ``x_key`` and the interval of the accuracy (rounds any seed has)."""
    rounds = sorted({int(m["round"]) for metrics in runs_of_rule for m in metrics})
    xs, bands = [], []
    for number in rounds:
        at = [m for metrics in runs_of_rule for m in metrics if int(m["round"]) == number]
        xs.append(math.fsum(float(m[x_key]) for m in at) / len(at))
        bands.append(multiseed.mean_interval(m.get("accuracy") for m in at))
    return xs, bands


def plot_compare(curves: Mapping[tuple[str, int], Sequence[Mapping]], target: float, path: Path) -> Path:
    """DIR/compare.png: mean test accuracy with its 95% interval band per rule, against the round and against
    the mean simulated time at that round (the seeds' clocks differ, so that axis is their average)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    by_round, by_time = figure.subplots(1, 2, sharey=True)
    rules = list(dict.fromkeys(rule for rule, _ in curves))
    for rule in rules:
        per_seed = [metrics for (name, _), metrics in curves.items() if name == rule]
        for ax, x_key in ((by_round, "round"), (by_time, "sim_time_s")):
            xs, bands = mean_curve(per_seed, x_key)
            line, = ax.plot(xs, [_nan(b.mean) for b in bands], marker="o", markersize=3,
                            label=f"{rule} (n={len(per_seed)})")
            ax.fill_between(xs, [_nan(b.low) for b in bands], [_nan(b.high) for b in bands],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    for ax, label in ((by_round, "round"), (by_time, "mean simulated time at the round (s)")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.set_ylabel("test accuracy (mean, 95% CI band)")
    by_round.legend(fontsize="small")
    figure.tight_layout()
    return runs.save_figure(figure, path)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------------------------
# Table and command line


def compare_table(comparison: Comparison, target: float):
    """A rich table of the per-rule summary: means with [95% CI], targets reached, differences to baseline."""
    from rich.table import Table

    n = len(comparison.seeds)
    table = Table(title=f"fed-deq compare · {n} seed(s) · target accuracy {target:g} · mean [95% CI]")
    for column in ("rule", "final acc", "best acc", "reached", "sim time to target (s)", "MB to target",
                   f"Δ final acc vs {comparison.baseline}"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for row in comparison.summary:
        table.add_row(row["rule"], multiseed.format_interval(row, "final_accuracy"),
                      multiseed.format_interval(row, "best_accuracy"),
                      f"{row['sim_time_to_target_s_n']}/{row['seeds']}",
                      multiseed.format_interval(row, "sim_time_to_target_s", digits=1),
                      multiseed.format_interval(row, "bytes_to_target", digits=2, scale=1e6),
                      "baseline" if row["rule"] == comparison.baseline
                      else multiseed.format_interval(row, "final_accuracy_diff"))
    return table


def register(subparsers) -> None:
    """Add the `compare` sub-command to the fed-deq parser."""
    from tools.args import add_scenario_args

    p = subparsers.add_parser(
        "compare", help="run a scenario per fusion rule and seed, and compare the rules with intervals",
        description="Run a scenario once per fusion rule and seed (the same seeds for every rule) and write "
                    "compare.csv (one row per run: final and best test accuracy, simulated time and bytes to "
                    "the target accuracy), compare_summary.csv (per rule: means with 95% Student-t intervals, "
                    "and paired differences against the baseline rule), compare.png and one run folder per "
                    "rule and seed.")
    add_scenario_args(p, optional=False)
    p.add_argument("--rules", required=True, help=f"comma-separated, from: {', '.join(runs.fusion_rules())}")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per rule; the first seed is the scenario's, the others derived from it (default 1)")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="rule the paired differences are taken against; run even when not in --rules "
                        "(default fedavg)")
    p.add_argument("--target", type=float, default=runs.DEFAULT_TARGET,
                   help="accuracy for time and bytes to target (default 0.8)")
    p.add_argument("--out", required=True,
                   help="output folder: compare.csv, compare_summary.csv, compare.png, DIR/<rule>/seed-<seed>/")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each run's TensorBoard scalars to DIR/<rule>/seed-<seed>/tb "
                        "(tensorboard --logdir DIR shows them side by side)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """`fed-deq compare`: validate everything, run one simulation per rule and seed, print the summary."""
    from rich.console import Console

    from tools.args import checked_out_dir, load_from_args, scenario_name

    out_dir = checked_out_dir(args.out)
    rules = study_rules(parse_rules(args.rules), args.baseline)
    multiseed.check_seeds(args.seeds)
    runs.check_target(args.target)
    scenario = load_from_args(args)
    comparison = compare(scenario, rules, out_dir, target=args.target, seeds=args.seeds, baseline=args.baseline,
                         name=scenario_name(args), console=Console(stderr=True), tensorboard=args.tensorboard)
    Console().print(compare_table(comparison, args.target))
    print(f"outputs in {out_dir}/ (compare.csv, compare_summary.csv, compare.png, one folder per rule and seed)")
    return 0
