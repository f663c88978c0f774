"""Turns finished rounds into records: central evaluation, metrics.jsonl, progress, summary and plot."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fed_deq import adversary, results
from fed_deq.tensorboard import TB_DIR, ScalarWriter
from fed_deq.rounds import RoundReport
from fed_deq.scenario import Scenario, dump_scenario
from fed_deq.workload import (Arrays, build_scenario_model, evaluate_adversarial, evaluate_global, scenario_data,
                              tier_eval_budgets)

#: The run's status marker beside metrics.jsonl, rewritten atomically at each step (see RunRecorder):
#: {"rounds": R, "rounds_done": n, "running_round": r or null, "finished": bool}. `deploy-local` watches it
#: to learn that round 1 started and that the run finished, instead of reading Flower's log.
PROGRESS_FILE = "progress.json"


def read_progress(out_dir: str | Path) -> dict | None:
    """The progress marker of the run writing to ``out_dir``, or None while there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunRecorder:
    """Writes one ``metrics.jsonl`` line per round as it finishes, so an interrupted run keeps its rounds."""

    def __init__(self, scenario: Scenario, out_dir: str | Path, *, name: str = "scenario", progress: bool = False,
                 console: Console | None = None, tensorboard: bool = False) -> None:
        self.scenario = scenario
        self.scenario_name = name
        # One thread: the simulated clients own the other cores, and oversubscribing them made evaluation
        # several times slower next to Ray's workers (and float sums depend on the thread count).
        torch.set_num_threads(1)
        self.out_dir = Path(out_dir)
        self.model = build_scenario_model(scenario, scenario_data(scenario))
        self.tier_budgets = tier_eval_budgets(scenario, self.model)
        self.metrics: list[dict] = []
        self.initial: dict | None = None
        self._last_model: Arrays | None = None  # saved as model.npz by finish (fed-deq attack-eval reads it)
        self.sim_time_s = 0.0
        self.total_bytes = 0
        self._tensorboard = tensorboard     # also write TensorBoard scalars to out_dir/tb (fed_deq/tensorboard.py)
        self._tb: ScalarWriter | None = None
        self._console = console or Console(stderr=True)
        self._show_progress = progress
        self._progress: Progress | None = None
        self._task = None
        self._writer: results.MetricsWriter | None = None
        self._started = time.perf_counter()

    def __enter__(self) -> RunRecorder:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results.write_scenario(self.out_dir, dump_scenario(self.scenario))
        self._writer = results.MetricsWriter(self.out_dir).__enter__()
        self._mark_progress(running_round=None)
        if self._tensorboard:
            self._tb = ScalarWriter(self.out_dir / TB_DIR)
        if self._show_progress:
            self._progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      console=self._console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.scenario.training.rounds, status="")
        return self

    def __exit__(self, *exc) -> None:
        self._close_tensorboard()
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.__exit__(*exc)

    def evaluate_initial(self, arrays: Arrays) -> dict:
        """Evaluate the starting model (round 0): its test accuracy at the evaluation budget, kept for the
        summary's ``initial_accuracy`` (not a metrics line; no per-tier or validation figures, which nothing
        reads for round 0 and which cost a 20,000-sample test set seconds). A runner may call it early, e.g.
        while its clients start; ``initial_model`` then does not evaluate again."""
        self.initial = evaluate_global(self.scenario, self.model, arrays, {}, server_validation=False)
        return self.initial

    def initial_model(self, arrays: Arrays) -> dict:
        """The starting model's evaluation (``evaluate_initial``, unless already made); marks round 1 running."""
        if self.initial is None:
            self.evaluate_initial(arrays)
        # The run loop (fed_deq.rounds.run_rounds) opens round 1 right after the starting model's evaluation.
        self._mark_progress(running_round=1)
        return self.initial

    def record_round(self, server_round: int, arrays: Arrays, report: RoundReport | None) -> dict:
        """Evaluate the round's global model, write its metrics line and advance the progress bar."""
        evaluation = evaluate_global(self.scenario, self.model, arrays, self.tier_budgets)
        report = report or RoundReport(server_round=server_round)
        self.sim_time_s += report.round_sim_time_s
        self.total_bytes += report.bytes_down + report.bytes_up
        record = {"round": server_round, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
                  "sim_time_s": self.sim_time_s, **report.to_record(), "cumulative_bytes": self.total_bytes,
                  "accuracy_by_tier": evaluation["accuracy_by_tier"],
                  "eval_iterations": evaluation["eval_iterations"],
                  "eval_rel_residual": evaluation["eval_rel_residual"],
                  "server_val_accuracy": evaluation["server_val_accuracy"]}
        if self._attacks_round(server_round):
            record["adversarial"] = evaluate_adversarial(self.scenario, self.model, arrays, self.tier_budgets)
        record["wall_time_s"] = time.perf_counter() - self._started
        self._last_model = {key: value.copy() for key, value in arrays.items()}
        self._writer.write_round(record)
        self.metrics.append(record)
        if self._tb is not None:
            self._tb.write_round(record)
        self._mark_progress(running_round=server_round + 1 if server_round < self.scenario.training.rounds else None)
        if self._progress is not None:
            status = (f"acc {record['accuracy']:.3f}  sim {self.sim_time_s:,.0f}s  "
                      f"{record['clients_completed']}/{record['clients_sampled']} clients")
            self._progress.update(self._task, advance=1, status=status)
        return record

    def _attacks_round(self, server_round: int) -> bool:
        """Whether this round's model is attacked: the final round, or every round if the scenario says so."""
        settings = self.scenario.evaluation.adversarial
        return settings is not None and (settings.every_round or server_round == self.scenario.training.rounds)

    def finish(self, extra: dict | None = None, *, interrupted: bool = False) -> dict:
        """Write summary.json (with ``extra`` keys from the runner) and accuracy.png; return the summary.

        ``interrupted`` marks a run stopped before its last round (its finished rounds are in the summary).
        """
        summary = results.summarise(self.metrics, scenario_name=self.scenario_name,
                                    fusion_rule=self.scenario.fusion.rule,
                                    wall_time_s=time.perf_counter() - self._started)
        if self.initial is not None:
            summary["initial_accuracy"] = self.initial["accuracy"]
        summary["faults"] = {key: sum(m[key] for m in self.metrics)
                             for key in ("clients_dropped", "clients_rejected", "clients_failed")}
        summary["faults"]["rounds_not_fused"] = sum(1 for m in self.metrics if m.get("fusion_error"))
        summary["adversaries"] = {str(pid): attack for pid, attack in adversary.assign(self.scenario).items()}
        summary["interrupted"] = interrupted
        attacked = [m["adversarial"] for m in self.metrics if m.get("adversarial")]
        if attacked:
            summary["adversarial"] = attacked[-1]
        summary.update(extra or {})
        if self._last_model is not None:
            results.write_model(self.out_dir, self._last_model)
        results.write_summary(self.out_dir, summary)
        if self.metrics:
            results.plot_accuracy(self.metrics, self.out_dir / "accuracy.png")
        self._close_tensorboard()
        self._mark_progress(running_round=None, finished=True)  # last: every output above is in place
        return summary

    def _close_tensorboard(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _mark_progress(self, *, running_round: int | None, finished: bool = False) -> None:
        """Rewrite the progress marker (PROGRESS_FILE) atomically, so a watcher never reads half of it."""
        text = json.dumps({"rounds": self.scenario.training.rounds, "rounds_done": len(self.metrics),
                           "running_round": running_round, "finished": finished}) + "\n"
        results.write_atomic(self.out_dir / PROGRESS_FILE, text)


def summary_table(summary: dict, metrics: list[dict]) -> Table:
    """A short closing table for the terminal."""
    table = Table(title=f"fed-deq · {summary.get('scenario')} · fusion {summary.get('fusion_rule')}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(value) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else f"{value:.4g}"
        return "—" if value is None else str(value)

    for key in ("rounds", "final_accuracy", "best_accuracy", "initial_accuracy", "sim_time_s", "wall_time_s",
                "total_bytes", "bytes_to_target"):
        table.add_row(key, fmt(summary.get(key)))
    if metrics and metrics[-1].get("accuracy_by_tier"):
        for tier, acc in metrics[-1]["accuracy_by_tier"].items():
            table.add_row(f"final accuracy @ {tier} budget", fmt(acc))
    for key, value in summary.get("faults", {}).items():
        table.add_row(key.replace("clients_", "clients ") + " (all rounds)", fmt(value))
    return table
