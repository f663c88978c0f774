"""`make robustness`: docs/robustness.md — how robust the federation and the fused model are, with intervals.

Two studies on scenarios/default.yaml (MNIST-1D, three phone tiers), all runs through one study engine:

1. The robustness matrix (``fed-deq robustness``): fusion rules x poisoning attacks x adversary fractions x
   seeds, each attacked run paired by seed with its rule's clean run. DIR/matrix/.
2. Robust accuracy of the final global model by cell (spectral, monotone, LyaDEQ) with and without
   adversarial training, under PGD through the solver and Yang et al.'s intermediate-state attack, at the
   evaluation budget and at each tier's budget (``evaluation.adversarial``). DIR/cells/<cell>-<training>/seed-S/.

A finished run whose folder holds the same scenario, made by the same code (``study-code.txt``), is reused,
so an interrupted study resumes. Usage: ``python benchmarks/robustness_study.py [--seeds 3] [--set K=V ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fed_deq import results  # noqa: E402
from fed_deq.scenario import Scenario, load_scenario  # noqa: E402
from benchmarks import reuse  # noqa: E402
import robustness_report as report  # noqa: E402
from study import reusing, study_runner  # noqa: E402
from tools import multiseed, robustness, runs  # noqa: E402

SCENARIO = ROOT / "scenarios" / "default.yaml"
RULES = ("quality", "fedavg", "fedmedian", "fedtrimmedavg", "krum")
ATTACKS = ("sign_flip", "scale", "alie", "ipm", "label_flip")
FRACTIONS = (0.1, 0.3)
CELLS: dict[str, tuple[str, ...]] = {
    "spectral": ("model.contraction=spectral",),
    "monotone": ("model.contraction=monotone",),
    "lyapunov": ("model.contraction=lyapunov",),
}
TRAINING: dict[str, tuple[str, ...]] = {
    "standard": (),
    "adversarial": ("training.adversarial={eps: 0.1, steps: 3, intermediate_states: true}",),
}
#: The attack every cell run's final model gets (radii in MNIST-1D's input units: its features have std ~1).
EVALUATION = "evaluation.adversarial={eps: [0, 0.05, 0.1, 0.2], steps: 10, samples: 512}"


def cell_variants(scenario_path: Path, overrides: Sequence[str], seeds: Sequence[int]) -> dict[tuple, Scenario]:
    """(cell, training, seed) → its scenario, every one built (and validated) before the first run."""
    return {(cell, training, seed): load_scenario(scenario_path, [*overrides, *cell_sets, *training_sets, EVALUATION,
                                                                  f"seed={seed}"])
            for seed in seeds for cell, cell_sets in CELLS.items() for training, training_sets in TRAINING.items()}


def run_study(scenario_path: Path, out_dir: Path, *, seeds: int, overrides: Sequence[str] = (),
              run: runs.RunFn | None = None) -> dict:
    """The matrix and the cell runs; returns what the document needs."""
    scenario = load_scenario(scenario_path, list(overrides))
    seed_list = multiseed.study_seeds(scenario.seed, multiseed.check_seeds(seeds))
    variants = cell_variants(scenario_path, overrides, seed_list)
    reused: list[Path] = []
    code = reuse.code_digest()
    started = time.perf_counter()
    with study_runner(scenario, run) as engine:
        runner = reusing(engine, reused, code)
        matrix = robustness.robustness(scenario, RULES, ATTACKS, FRACTIONS, out_dir / "matrix", seeds=seeds,
                                       name="default", run=runner)
        matrix_s = time.perf_counter() - started
        cells = []
        for (cell, training, seed), variant in variants.items():
            folder = out_dir / "cells" / f"{cell}-{training}" / f"seed-{seed}"
            print(f"robustness study: cell {cell}, {training} training, seed {seed}", flush=True)
            summary = runner(variant, folder, "default")
            cells.append({"cell": cell, "training": training, "seed": seed, "final_accuracy":
                          summary.get("final_accuracy"), "adversarial": summary.get("adversarial"),
                          "accuracy_by_tier": (results.read_metrics(folder)[-1].get("accuracy_by_tier") or {})})
    return {"matrix": matrix, "cells": cells, "seeds": seed_list, "reused": len(reused),
            "matrix_wall_s": matrix_s, "wall_time_s": time.perf_counter() - started}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The study's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell of each study (>= 2 for intervals)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="scenario override for every run (e.g. training.rounds=2 for a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "robustness-study", help="run folders")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "robustness.md", help="the document to write")
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the document (as the Makefile runs it, plus any options given)."""
    if not args.overrides and args.seeds == 3 and args.scenario == SCENARIO:
        return "make robustness"
    return " ".join(["python benchmarks/robustness_study.py", f"--seeds {args.seeds}",
                     *(f"--set {o}" for o in args.overrides)])


def write_document(study: Mapping, args: argparse.Namespace) -> Path:
    """docs/robustness.md and its figures (next to it, in img/), each written atomically."""
    img = args.doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    robustness.plot_robustness(study["matrix"].summary, img / report.FIGURE_MATRIX)
    report.plot_cells(study["cells"], img / report.FIGURE_CELLS)
    text = report.render(study, command=command_line(args), rules=RULES, attacks=ATTACKS, fractions=FRACTIONS,
                         machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                         generated=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    return results.write_atomic(args.doc, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) both studies, then write the document."""
    args = parse_args(argv)
    study = run_study(args.scenario, args.out, seeds=args.seeds, overrides=args.overrides)
    results.write_atomic(args.out / "cells.json", json.dumps(study["cells"], indent=1, default=str))
    print(f"wrote {write_document(study, args)} in {study['wall_time_s']:.0f} s ({study['reused']} runs reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
