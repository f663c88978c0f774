"""`make study`: the evidence on the flagship scenario, regenerated into docs/results.md and its figures.

Every model variant (the DEQ, the DEQ without contraction, the weight-tied unroll, the explicit stack) is run
with every fusion rule (quality, FedAvg, FedNova) on the same seeds, all through one study engine (one Ray
instance, one cached dataset). Each variant is one ``fed-deq compare`` study: DIR/<variant>/compare.csv and
compare_summary.csv, one run folder per rule and seed. The document then sets the figures side by side with
95% Student-t intervals, paired by seed: against FedAvg within a variant, and against the DEQ across variants.

A finished run whose folder holds the same scenario, made by the same code (a digest of the source, in
``study-code.txt``), is reused, so an interrupted study picks up where it stopped. Usage: ``python benchmarks/study.py [--seeds 5] [--target 0.6] [--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fed_deq import results  # noqa: E402
from fed_deq.scenario import Scenario, load_scenario  # noqa: E402
from benchmarks import reuse  # noqa: E402
import study_report as report  # noqa: E402
from tools import compare, runs  # noqa: E402

SCENARIO = ROOT / "scenarios" / "heterogeneous-fleet.yaml"
RULES = ("quality", "fedavg", "fednova")
VARIANTS: dict[str, tuple[str, ...]] = {
    "deq": (),
    "deq-no-contraction": ("model.contraction=none",),
    "weight_tied": ("model.kind=weight_tied",),
    "explicit": ("model.kind=explicit",),
}

# --------------------------------------------------------------------------------------------------------
# Running


def reusing(run: runs.RunFn, reused: list[Path], code: str | None = None) -> runs.RunFn:
    """A runner that skips runs already finished in their folder by the same code (recorded in ``reused``)
    and runs the rest, marking each with the digest of the code that made it."""
    code = code or reuse.code_digest()

    def run_or_reuse(scenario: Scenario, out_dir: Path, name: str) -> dict:
        summary = reuse.finished_summary(scenario, Path(out_dir), code)
        if summary is not None:
            reused.append(Path(out_dir))
            return summary
        summary = run(scenario, out_dir, name)
        reuse.mark_made_by(Path(out_dir), code)
        return summary

    return run_or_reuse


@contextlib.contextmanager
def study_runner(scenario: Scenario, run: runs.RunFn | None) -> Iterator[runs.RunFn]:
    """One engine for the whole study (or the given runner, for tests)."""
    if run is not None:
        yield run
        return
    with runs.study_engine(scenario, 1) as shared:
        yield shared


def run_study(scenario_path: Path, out_dir: Path, *, seeds: int, target: float, overrides: Sequence[str] = (),
              variants: Mapping[str, Sequence[str]] = VARIANTS, rules: Sequence[str] = RULES,
              run: runs.RunFn | None = None) -> dict:
    """Every variant x rule x seed; returns {variant: Comparison} plus the bookkeeping the document needs."""
    scenarios = {name: load_scenario(scenario_path, [*overrides, *extra]) for name, extra in variants.items()}
    reused: list[Path] = []
    comparisons = {}
    started = time.perf_counter()
    code = reuse.code_digest()
    with study_runner(scenarios[next(iter(scenarios))], run) as engine:
        for name, scenario in scenarios.items():
            comparisons[name] = compare.compare(scenario, rules, out_dir / name, target=target, seeds=seeds,
                                                baseline=report.BASELINE, name=name,
                                                run=reusing(engine, reused, code))
    return {"comparisons": comparisons, "scenarios": scenarios, "reused": len(reused),
            "wall_time_s": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------------------
# Per-run extras read back from the run folders


def run_dir(out_dir: Path, variant: str, rule: str, seed: int) -> Path:
    """Where compare put one run."""
    return out_dir / variant / rule / f"seed-{seed}"


def run_extras(folder: Path) -> dict:
    """Final accuracy by tier, total bytes and simulated time of one run, from its metrics and summary."""
    metrics = results.read_metrics(folder)
    summary = json.loads((folder / results.SUMMARY_FILE).read_text(encoding="utf-8"))
    last = metrics[-1] if metrics else {}
    return {"accuracy_by_tier": dict(last.get("accuracy_by_tier") or {}),
            "total_bytes": summary.get("total_bytes"), "sim_time_s": summary.get("sim_time_s"),
            "wall_time_s": summary.get("wall_time_s")}


def collect_rows(study: dict, out_dir: Path) -> list[dict]:
    """One row per (variant, rule, seed): compare's figures plus the extras of its run folder."""
    rows = []
    for variant, comparison in study["comparisons"].items():
        for row in comparison.rows:
            rows.append({"variant": variant, **row,
                         **run_extras(run_dir(out_dir, variant, row["rule"], row["seed"]))})
    return rows


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The study's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant and rule (>= 2 for intervals)")
    parser.add_argument("--target", type=float, default=0.5, help="accuracy for time and bytes to target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="scenario override for every run (e.g. training.rounds=2 for a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study", help="run folders")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md", help="the document to write")
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this document (as the Makefile runs it, plus any options given)."""
    parts = ["make study"] if not args.overrides and args.seeds == 5 and args.target == 0.5 else ["python benchmarks/study.py"]
    if parts[0] != "make study":
        parts += [f"--seeds {args.seeds}", f"--target {args.target:g}", *(f"--set {o}" for o in args.overrides)]
    return " ".join(parts)


def write_document(study: dict, rows: list[dict], args: argparse.Namespace) -> Path:
    """docs/results.md and its two figures (next to it, in img/), each written atomically."""
    img = args.doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    report.plot_accuracy(rows, img / report.FIGURE_ACCURACY)
    report.plot_tiers(rows, img / report.FIGURE_TIERS)
    first = next(iter(study["comparisons"].values()))
    scenario_path = args.scenario.resolve()
    shown = scenario_path.relative_to(ROOT) if scenario_path.is_relative_to(ROOT) else scenario_path
    text = report.render(rows, command=command_line(args), scenario_path=str(shown), seeds=first.seeds,
                         target=args.target, wall_time_s=study["wall_time_s"], reused=study["reused"],
                         machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                         generated=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    return results.write_atomic(args.doc, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the study, then write the document."""
    args = parse_args(argv)
    runs.check_target(args.target)
    study = run_study(args.scenario, args.out, seeds=args.seeds, target=args.target, overrides=args.overrides)
    rows = collect_rows(study, args.out)
    results.write_atomic(args.out / "study.json", json.dumps(rows, indent=1, default=str))
    print(f"wrote {write_document(study, rows, args)} from {len(rows)} runs in {study['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
