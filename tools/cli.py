"""The `fed-deq` command line: simulate, validate, schema, compare, robustness, attack-eval, tune, compose and
deploy-local."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from fed_deq.errors import InputError, RunFailed
from tools import attack_eval, compare, deploy, robustness, tune
from tools.args import add_scenario_args, checked_out_dir, default_scenario, load_from_args, scenario_name

DESCRIPTION = """\
fed-deq simulates federated learning with deep-equilibrium (DEQ) models on a fleet of devices of different
speeds: each device trains within the solver iterations its speed allows before the round's deadline, and the
server fuses what comes back. Simulate a scenario, compare or tune the ways of fusing the models, or run the
same scenario's clients as separate processes or containers."""
EPILOG = "Each command has its own help: fed-deq COMMAND --help."
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a scenario and write metrics.jsonl, summary.json, scenario.yaml, accuracy.png; 130 after Ctrl-C."""
    from rich.console import Console

    from tools.simulate import SimulationInterrupted, simulate

    scenario = load_from_args(args)
    name = scenario_name(args)
    out_dir = checked_out_dir(args.out or Path("runs") / name)
    console = Console(stderr=True)
    console.print(f"[bold]fed-deq[/] simulating [cyan]{args.scenario or default_scenario()}[/] → {out_dir}")
    try:
        summary = simulate(scenario, out_dir, name=name, progress=not args.no_progress,
                           tensorboard=args.tensorboard)
    except SimulationInterrupted as stopped:
        if stopped.summary is None:
            raise
        from fed_deq.recorder import summary_table
        from fed_deq.results import read_metrics

        done = stopped.summary["rounds"]
        console.print(summary_table(stopped.summary, read_metrics(out_dir / "metrics.jsonl")))
        console.print(f"interrupted after {done} of {scenario.training.rounds} rounds; the finished rounds are in "
                      f"{out_dir}/" if done else "interrupted before the first round finished")
        return INTERRUPTED
    # Imported only now: the recorder imports torch, which the run imports in a thread while Ray starts.
    from fed_deq.recorder import summary_table
    from fed_deq.results import read_metrics

    console.print(summary_table(summary, read_metrics(out_dir / "metrics.jsonl")))
    console.print(f"outputs in {out_dir}/ (metrics.jsonl, summary.json, scenario.yaml, accuracy.png)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check scenario files without running them; print one line per file."""
    from fed_deq.scenario import load_scenario

    for path in args.files:
        scenario = load_scenario(path, overrides=args.overrides)
        print(f"{path}: ok ({scenario.training.rounds} rounds, fusion {scenario.fusion.rule})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of scenario files (or write it to ``--out``) for editors to check YAML against."""
    import json

    from fed_deq.scenario import scenario_json_schema

    text = json.dumps(scenario_json_schema(), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.out).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    return 0


def version_line() -> str:
    """``fed-deq <version>`` and the versions of the frameworks it runs on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"fed-deq {of('fed-deq')} (flwr {of('flwr')}, torch {of('torch')}, ray {of('ray')})"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: every sub-command with its options."""
    parser = argparse.ArgumentParser(prog="fed-deq", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="run a scenario on this machine; writes metrics, summary and a plot",
                       description="Run every round of a scenario on this machine and write metrics.jsonl (one "
                                   "line per round), summary.json, scenario.yaml and accuracy.png to the output "
                                   "folder. Ctrl-C stops the run and keeps the finished rounds.")
    add_scenario_args(p)
    p.add_argument("--out", metavar="FOLDER", help="output folder (default runs/<scenario name>)")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars (accuracy, loss, per-tier accuracy, bytes, iterations) "
                        "to FOLDER/tb")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("validate", help="check scenario files without running them",
                       description="Check scenario files and print one line per file; nothing is run or written.")
    p.add_argument("files", nargs="+", help="scenario YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one scenario value in every file, e.g. --set training.rounds=3 (repeatable)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of scenario files, for editors",
                       description="Print the JSON Schema of scenario files (named choices list the names the "
                                   "installed code accepts). Point an editor at it, e.g. fed-deq schema > "
                                   "scenario.schema.json and a '# yaml-language-server: $schema=./scenario.schema.json' "
                                   "line at the top of a scenario.")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    p.set_defaults(func=cmd_schema)
    for module in (compare, robustness, attack_eval, tune, deploy):
        module.register(sub)
    return parser


def exit_now_if_threads_hang() -> None:
    """Exit at once (code 130) if threads other than the main one are still running after an interrupt.

    Interrupted, Flower's simulation engine can leave worker threads waiting for results from a Ray that is
    already shut down; Python would wait for them at exit forever. The run's files are written by then.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on bad input, 1 on a failed run, 130 after Ctrl-C; one-line reasons."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except InputError as exc:
        print(f"fed-deq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fed-deq: interrupted", file=sys.stderr)
        code = INTERRUPTED
    except RunFailed as exc:
        print(f"fed-deq: run failed: {exc}", file=sys.stderr)
        return 1
    if code == INTERRUPTED:
        exit_now_if_threads_hang()
    return code

def run() -> None:
    """The ``fed-deq`` command: ``main``, then exit without Python's interpreter teardown.

    By the time ``main`` returns every output file is written and closed and Ray is stopped; what is left is
    the interpreter freeing the modules of torch, Ray and Flower one by one, about 1 s per command here that
    the user waits for and nothing needs. Output streams and logging handlers are flushed first. ``main`` keeps
    the normal exit for callers that import it (tests, scripts).
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
