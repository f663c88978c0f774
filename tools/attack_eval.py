"""`fed-deq attack-eval RUN_DIR`: robust accuracy of a finished run's global model under input attacks.

Reads the run's scenario.yaml and model.npz (the last recorded global model), attacks it as its scenario's
``evaluation.adversarial`` section says (or with that section's defaults when the run had none; ``--set``
changes either, e.g. ``--set evaluation.adversarial.eps=[0,0.1,0.3]``), at the evaluation budget and at each
tier's budget, and writes RUN_DIR/adversarial.json and RUN_DIR/adversarial.png (robust accuracy against ε,
one panel per attack, one line per budget). See fed_deq/adversarial.py for the attacks and the gradient.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fed_deq import results
from fed_deq.errors import InputError

REPORT_FILE = "adversarial.json"
PLOT_FILE = "adversarial.png"


def load_run(run_dir: Path, overrides: list[str]):
    """The run's scenario (with ``overrides``; an adversarial section with defaults if it had none) and model."""
    from fed_deq.scenario import load_scenario

    path = run_dir / results.SCENARIO_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run folder (no {results.SCENARIO_FILE})")
    scenario = load_scenario(path, overrides=overrides)
    if scenario.evaluation.adversarial is None:
        scenario = load_scenario(path, overrides=["evaluation.adversarial={}", *overrides])
    return scenario, results.read_model(run_dir)


def attack_run(run_dir: Path, overrides: list[str], console=None) -> dict:
    """Attack the run's model; write adversarial.json and adversarial.png into ``run_dir``; return the report."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fed_deq.adversarial import attack_steps
    from fed_deq.deq import is_fixed_depth
    from fed_deq.workload import build_scenario_model, evaluate_adversarial, load_arrays, scenario_data, tier_eval_budgets

    scenario, arrays = load_run(run_dir, overrides)
    torch.set_num_threads(1)  # as the run's recorder evaluated: the same float sums, the same figures
    model = build_scenario_model(scenario, scenario_data(scenario))
    try:
        load_arrays(model, arrays)
    except (RuntimeError, KeyError, ValueError) as exc:  # the saved arrays do not fit the scenario's model
        raise InputError(f"{run_dir / results.MODEL_FILE}: does not fit the run's model: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    budgets = tier_eval_budgets(scenario, model)
    settings = scenario.evaluation.adversarial
    total = attack_steps(settings, {"eval": scenario.model.eval_iterations, **budgets},
                         not is_fixed_depth(scenario.model.kind))
    with Progress(TextColumn("[bold]attack-eval"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("attacks", total=total)
        report = evaluate_adversarial(scenario, model, arrays, budgets, on_step=lambda: progress.advance(task))
    results.write_atomic(run_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    plot_report(report, run_dir / PLOT_FILE)
    return report


def plot_report(report: dict, path: Path) -> Path:
    """Robust accuracy against ε: one panel per attack (and the worst case), one line per budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [*report["attacks"], "worst"] if len(report["attacks"]) > 1 else list(report["attacks"])
    figure = Figure(figsize=(4.2 * len(panels), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    order = sorted(range(len(report["eps"])), key=lambda i: report["eps"][i])
    eps = [report["eps"][i] for i in order]
    for ax, attack in zip(axes, panels):
        for name, by_attack in report["accuracy"].items():
            ax.plot(eps, [by_attack[attack][i] for i in order], marker="o",
                    label=f"{name} (budget {report['budgets'][name]})")
        ax.set_title(attack)
        ax.set_xlabel(f"ε ({report['norm']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust test accuracy")
    axes[0].legend(fontsize="small")
    return results.write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


def report_table(report: dict):
    """A rich table: one row per budget and attack, one column per ε."""
    from rich.table import Table

    order = sorted(range(len(report["eps"])), key=lambda i: report["eps"][i])
    table = Table(title=f"robust test accuracy · {report['norm']} · {report['samples']} samples · "
                        f"{report['steps']} steps · gradient: {report['gradient']}")
    table.add_column("budget")
    table.add_column("attack")
    for i in order:
        table.add_column(f"ε={report['eps'][i]:g}", justify="right")
    for name, by_attack in report["accuracy"].items():
        for attack, values in by_attack.items():
            table.add_row(f"{name} ({report['budgets'][name]})", attack,
                          *("—" if math.isnan(values[i]) else f"{values[i]:.3f}" for i in order))
    return table


def register(subparsers) -> None:
    """Add the `attack-eval` sub-command to the fed-deq parser."""
    p = subparsers.add_parser(
        "attack-eval", help="robust accuracy of a finished run's model under PGD through the solver",
        description="Attack the global model a finished run saved (RUN_DIR/model.npz) with PGD through the "
                    "fixed-point solve and, for a DEQ, Yang et al.'s attack on intermediate solver states, at "
                    "the evaluation budget and at each tier's budget, as the run's scenario says in "
                    "evaluation.adversarial (its defaults if it has none). Writes RUN_DIR/adversarial.json and "
                    "RUN_DIR/adversarial.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (scenario.yaml, model.npz)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one value of the run's scenario, e.g. --set evaluation.adversarial.eps=[0,0.1] "
                        "(repeatable)")
    p.set_defaults(func=cmd_attack_eval)


def cmd_attack_eval(args: argparse.Namespace) -> int:
    """`fed-deq attack-eval`: attack the run's model, print the table, name the files written."""
    from rich.console import Console

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    console = Console(stderr=True)
    report = attack_run(run_dir, args.overrides, console=console)
    Console().print(report_table(report))
    print(f"outputs in {run_dir}/ ({REPORT_FILE}, {PLOT_FILE})")
    return 0
