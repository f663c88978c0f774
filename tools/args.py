"""Command-line arguments every command that runs a scenario shares: SCENARIO, --set, and --out."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fed_deq.errors import InputError

DEFAULT_SCENARIO = "scenarios/default.yaml"


def default_scenario() -> str:
    """scenarios/default.yaml from the working directory, else the one shipped beside the package."""
    local = Path(DEFAULT_SCENARIO)
    if local.exists():
        return str(local)
    return str(Path(__file__).resolve().parent.parent / DEFAULT_SCENARIO)


def add_scenario_args(parser: argparse.ArgumentParser, *, optional: bool = True) -> None:
    """SCENARIO and repeated --set key.path=value."""
    if optional:
        parser.add_argument("scenario", nargs="?", default=None, help=f"scenario YAML (default {DEFAULT_SCENARIO})")
    else:
        parser.add_argument("scenario", help="scenario YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one scenario value, e.g. --set training.rounds=3 (repeatable)")


def load_from_args(args: argparse.Namespace):
    """The scenario named on the command line, with its overrides, validated."""
    from fed_deq.scenario import load_scenario

    return load_scenario(args.scenario or default_scenario(), overrides=args.overrides)


def scenario_name(args: argparse.Namespace) -> str:
    """The scenario's file stem, used to name runs and outputs."""
    return Path(args.scenario or default_scenario()).stem


def checked_out_dir(value: str | Path, *, flag: str = "--out") -> Path:
    """An output folder that exists or can be made, checked before anything starts (InputError if not).

    Nothing is created here: the first missing ancestor must be a writable folder.
    """
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag}: {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag}: cannot create {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: cannot create {path}: {probe} is not writable")
    return path
