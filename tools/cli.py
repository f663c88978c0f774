"""The `fed-deq` command: simulate, validate, and the sub-commands other modules register."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from fed_deq.errors import InputError
from tools.args import add_scenario_args, default_scenario, load_from_args, scenario_name

#: Modules that add sub-commands through ``register(subparsers)``; each is imported only when present.
COMMAND_MODULES = ("tools.deploy", "tools.tuning")


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a scenario on Flower + Ray and write metrics.jsonl, summary.json, scenario.yaml, accuracy.png."""
    from rich.console import Console

    from fed_deq.recorder import summary_table
    from fed_deq.results import read_metrics
    from tools.simulate import simulate

    scenario = load_from_args(args)
    name = scenario_name(args)
    out_dir = Path(args.out) if args.out else Path("runs") / name
    console = Console(stderr=True)
    console.print(f"[bold]fed-deq[/] simulating [cyan]{args.scenario or default_scenario()}[/] → {out_dir}")
    summary = simulate(scenario, out_dir, name=name, progress=not args.no_progress)
    console.print(summary_table(summary, read_metrics(out_dir / "metrics.jsonl")))
    console.print(f"outputs in {out_dir}/ (metrics.jsonl, summary.json, scenario.yaml, accuracy.png)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check scenario files; print one line per file."""
    from fed_deq.scenario import load_scenario

    for path in args.files:
        scenario = load_scenario(path, overrides=args.overrides)
        print(f"{path}: ok ({scenario.training.rounds} rounds, fusion {scenario.fusion.rule})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, including registered sub-commands."""
    parser = argparse.ArgumentParser(prog="fed-deq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="run a scenario on Flower's simulation engine (Ray backend)")
    add_scenario_args(p)
    p.add_argument("--out", help="output folder (default runs/<scenario>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("validate", help="check scenario files without running them")
    p.add_argument("files", nargs="+", help="scenario YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.set_defaults(func=cmd_validate)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on bad input, 1 on a failed run; one-line reasons, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"fed-deq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fed-deq: interrupted; finished rounds are kept in metrics.jsonl", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - an expected failure of a run, reported in one line
        from fed_deq.errors import RunFailed

        if isinstance(exc, RunFailed):
            print(f"fed-deq: run failed: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
