"""The tuned result on the test set: `fed-deq tune`'s best trial re-run on fresh seeds, reported apart.

Trials are scored on the server's validation split; picking the best of many trials makes its validation
score an optimistic estimate. So the best trial is simulated again on seeds no trial ran on, and only those
runs' test-set figures are reported, in their own files: ``best_test.csv`` (one row per fresh seed) and
``best_test_summary.csv`` (means with 95% Student-t intervals). A resumed tune whose best trial did not change
re-runs only the fresh seeds still missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_deq import results
from fed_deq.scenario import Scenario
from tools import multiseed, runs
from tools.study import TuneSettings, best_trial, fusion_values

ROWS_FILE = "best_test.csv"
SUMMARY_FILE = "best_test_summary.csv"
RUNS_DIR = "best_test"
ROW_COLUMNS = ("trial", "seed", "final_accuracy", "best_accuracy", "sim_time_to_target_s", "bytes_to_target",
               "sim_time_s", "wall_time_s")


def report_best_on_test(study, scenario: Scenario, settings: TuneSettings, out_dir: Path, run: runs.RunFn, *,
                        name: str, console) -> dict[str, Any] | None:
    """Re-run the best trial on the fresh seeds still missing; write best_test.csv and best_test_summary.csv.

    Returns the summary row (None when no trial completed or no fresh seed was asked for).
    """
    best = best_trial(study)
    fresh = settings.seed_lists(scenario.seed)[1]
    if best is None or not fresh:
        return None
    variant = runs.with_values(scenario, "fusion", fusion_values(best.params), f"trial {best.number}")
    rows = [row for row in read_rows(out_dir / ROWS_FILE) if row["trial"] == best.number and row["seed"] in fresh]
    done = {row["seed"] for row in rows}
    for seed in (s for s in fresh if s not in done):
        console.print(f"[bold]test set[/]: best trial #{best.number} on fresh seed {seed}")
        run_dir = out_dir / RUNS_DIR / f"{best.number:04d}" / f"seed-{seed}"
        started = time.perf_counter()
        run(runs.with_seed(variant, seed, f"best trial {best.number} seed {seed}"), run_dir, name)
        figures = runs.run_figures(results.read_metrics(run_dir), settings.target)  # the test set's accuracy
        rows.append({"trial": best.number, "seed": seed, **figures, "wall_time_s": time.perf_counter() - started})
        write_rows(rows, out_dir)
    write_rows(rows, out_dir)  # also when nothing ran: the file holds the current best trial only
    return multiseed.summarise_rules(rows, group="trial")[0]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an existing best_test.csv (empty cells as None), or [] when there is none."""
    if not path.exists():
        return []
    import pandas

    frame = pandas.read_csv(path)
    return [{key: _cell(value) for key, value in row.items()} for row in frame.to_dict("records")]


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def write_rows(rows: list[dict], out_dir: Path) -> None:
    """best_test.csv and best_test_summary.csv, atomically."""
    import pandas

    runs.write_csv(out_dir / ROWS_FILE, pandas.DataFrame(rows, columns=list(ROW_COLUMNS)))
    summary = multiseed.summarise_rules(rows, group="trial") if rows else []
    runs.write_csv(out_dir / SUMMARY_FILE,
                   pandas.DataFrame(summary, columns=multiseed.summary_columns(with_baseline=False, group="trial")))


def report_line(summary: Mapping[str, Any]) -> str:
    """The test-set report of the best trial, one line for the terminal."""
    return (f"test set, best trial #{summary['trial']} re-run on {summary['seeds']} fresh seed(s): "
            f"final accuracy {multiseed.format_interval(summary, 'final_accuracy')}, "
            f"best accuracy {multiseed.format_interval(summary, 'best_accuracy')} (mean [95% CI]); "
            f"see {ROWS_FILE}")
