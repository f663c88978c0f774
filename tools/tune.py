"""`fed-deq tune`: search the fusion rule's parameters with Optuna, resumably. See docs/tuning.md.

Each trial simulates the scenario with the trial's fusion values once per tuning seed and is scored on the
server's validation split (``server_val_accuracy``), averaged over the seeds: the test set is never read while
tuning. The best trial is then re-run on fresh seeds and reported on the test set, apart (tools/holdout.py).
The study lives in
``DIR/optuna.db`` (sqlite) under a fixed name, so running the same command again resumes it: only the trials
still missing to reach ``--trials`` run. Optuna's heartbeat marks a trial a killed tune left RUNNING as failed
and its retry callback queues the same parameters again; a Ctrl-C'd trial is queued again the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_deq import results
from fed_deq.errors import InputError, RunFailed
from fed_deq.scenario import Scenario
from tools import holdout, multiseed, runs
from tools.study import (OBJECTIVES, SCORED_ON, TIER_WEIGHT_PARAM, TuneSettings, best_status, check_existing_study,
                         check_tune_scenario, complete_count, open_study, requeue_orphans, reseed, retry_trial,
                         tune_summary, write_outputs)

TRIALS_DIR = "trials"
OUTPUTS = ("trials.csv", "best.yaml", "tuning.png", "importances.png", holdout.ROWS_FILE, holdout.SUMMARY_FILE,
           "optuna.db", TRIALS_DIR, holdout.RUNS_DIR)
#: Search ranges: (low, high, log scale). Inside the schema's bounds (docs/design.md, fusion section).
FLOAT_RANGES = {
    "size_exponent": (0.0, 2.0, False),
    "quality_exponent": (0.0, 4.0, False),
    "beta": (0.1, 20.0, True),
    "floor": (0.0, 0.5, False),
    "proximal_mu": (1e-4, 1.0, True),
    "trim_beta": (0.05, 0.45, False),
    "tier_weight": (0.0, 2.0, False),
}
#: Quality scores shaped by ``beta`` (exp(-beta * residual) or exp(-beta * probe loss)).
RESIDUAL_SCORES = ("residual", "product", "probe")


# --------------------------------------------------------------------------------------------------------
# Search space and scoring


def suggest_fusion(trial, search_rule: bool, tiers: Sequence[str] = ()) -> dict[str, Any]:
    """The fusion values of one trial; quality parameters only where the rule reads them.

    With ``tiers`` (``--search-tier-weights``) the quality rule also gets a weight per tier, parameter
    ``tier_weights.<tier>``.
    """
    rule = trial.suggest_categorical("rule", list(runs.fusion_rules())) if search_rule else "quality"
    values: dict[str, Any] = {"rule": rule} if search_rule else {}
    if rule == "quality":
        score = trial.suggest_categorical("score", list(runs.quality_scores()))
        values["score"] = score
        for key in ("size_exponent", "quality_exponent", "floor"):
            values[key] = _suggest_float(trial, key)
        if score in RESIDUAL_SCORES:  # beta only shapes the residual and probe scores
            values["beta"] = _suggest_float(trial, "beta")
        if tiers:
            low, high, _ = FLOAT_RANGES["tier_weight"]
            values["tier_weights"] = {tier: trial.suggest_float(f"{TIER_WEIGHT_PARAM}{tier}", low, high)
                                      for tier in tiers}
    elif rule == "fedprox":
        values["proximal_mu"] = _suggest_float(trial, "proximal_mu")
    elif rule == "fedtrimmedavg":
        values["trim_beta"] = _suggest_float(trial, "trim_beta")
    return values


def _suggest_float(trial, key: str) -> float:
    low, high, log = FLOAT_RANGES[key]
    return trial.suggest_float(key, low, high, log=log)


def apply_fusion(scenario: Scenario, values: dict[str, Any], source: str = "tuning") -> Scenario:
    """The scenario with its fusion section updated by ``values`` (validated like a scenario file)."""
    return runs.with_values(scenario, "fusion", values, source)


def unreached_time(scenario: Scenario, target: float, best_accuracy: float | None) -> float:
    """Penalised time of a run that never reached ``target``: the longest possible run, stretched by the shortfall.

    A round lasts at most the deadline, so ``rounds x deadline`` bounds every run's simulated time: any run that
    reaches the target scores less than any run that does not, and among those the closer one scores less.
    """
    horizon = scenario.training.rounds * scenario.training.deadline_s
    shortfall = target - (best_accuracy if best_accuracy is not None else 0.0)
    return horizon * (1.0 + max(shortfall, 0.0) / target)


def score_run(scenario: Scenario, metrics: Sequence[dict], objective: str, target: float) -> tuple[float, dict]:
    """The objective value of one finished run, measured on the server's validation split (the rows'
    ``server_val_accuracy``; their test ``accuracy`` is never read), and the validation figures behind it."""
    figures = runs.run_figures(runs.accuracy_view(metrics, SCORED_ON), target)
    if objective == "time_to_target":
        reached = figures["sim_time_to_target_s"]
        value = reached if reached is not None else unreached_time(scenario, target, figures["best_accuracy"])
    else:
        value = figures[objective]
    if value is None or not math.isfinite(float(value)):
        raise RunFailed(f"run has no {objective} on the server's validation split (no round evaluated on it)")
    return float(value), figures


def trial_figures(seed_figures: Sequence[dict]) -> dict[str, Any]:
    """A trial's user attributes: its validation figures averaged over its seeds (time to target over the
    seeds that reached it, ``val_reached`` of them)."""
    def mean(key: str) -> float | None:
        return multiseed.mean_interval(f[key] for f in seed_figures).mean

    return {"val_final_accuracy": mean("final_accuracy"), "val_best_accuracy": mean("best_accuracy"),
            "val_sim_time_to_target_s": mean("sim_time_to_target_s"),
            "val_reached": sum(f["sim_time_to_target_s"] is not None for f in seed_figures),
            "sim_time_s": mean("sim_time_s")}


def trial_dir(out_dir: Path, number: int, seed: int) -> Path:
    """Where trial ``number``'s simulation on ``seed`` writes its files."""
    return out_dir / TRIALS_DIR / f"{number:04d}" / f"seed-{seed}"


# --------------------------------------------------------------------------------------------------------
# One trial


@dataclass
class Objective:
    """Optuna's objective: simulate one trial's scenario on every tuning seed and score it on the server's
    validation split; remembers the trials a Ctrl-C stopped."""

    scenario: Scenario
    settings: TuneSettings
    out_dir: Path
    name: str
    run: runs.RunFn
    interrupted: list[int] = field(default_factory=list)

    def __call__(self, trial) -> float:
        """The trial's objective, the mean over its seeds; a failed run raises (Optuna records a FAIL)."""
        tiers = [t.name for t in self.scenario.fleet.tiers] if self.settings.search_tier_weights else ()
        scenario = self.trial_scenario(suggest_fusion(trial, self.settings.search_rule, tiers), trial.number)
        values, figures = [], []
        try:
            for seed in self.settings.seed_lists(self.scenario.seed)[0]:
                value, seed_figures = self.run_seed(scenario, trial.number, seed)
                values.append(value)
                figures.append(seed_figures)
        except KeyboardInterrupt:
            self.interrupted.append(trial.number)
            raise
        except Exception as exc:
            trial.set_user_attr("error", runs.one_line(exc))
            raise
        for key, figure in trial_figures(figures).items():
            trial.set_user_attr(key, figure)
        return math.fsum(values) / len(values)

    def run_seed(self, scenario: Scenario, number: int, seed: int) -> tuple[float, dict]:
        """One simulation of the trial on one seed, scored."""
        out = trial_dir(self.out_dir, number, seed)
        seeded = runs.with_seed(scenario, seed, f"trial {number} seed {seed}")
        self.run(seeded, out, self.name)
        return score_run(seeded, results.read_metrics(out), self.settings.objective, self.settings.target)

    def trial_scenario(self, values: dict[str, Any], number: int) -> Scenario:
        """The scenario with the trial's fusion values; with parallel trials, each its share of the cores."""
        scenario = apply_fusion(self.scenario, values, source=f"trial {number}")
        if self.settings.jobs > 1 and not scenario.simulation.ray_address:
            cpus = max(1, (os.cpu_count() or 1) // self.settings.jobs)
            scenario = runs.with_values(scenario, "simulation", {"num_cpus": cpus}, f"trial {number}")
        return scenario


# --------------------------------------------------------------------------------------------------------
# tune


@contextlib.contextmanager
def exclusive_dir(out_dir: Path) -> Iterator[None]:
    """Hold DIR/.tune.lock: two tunes on one DIR would fail each other's running trials."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".tune.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_dir}: another fed-deq tune is running on this folder") from None
        yield


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Inside the block, Optuna's per-trial log lines and its notices about experimental features (the
    heartbeat retry) stay off the terminal: fed-deq shows its own progress. Both are restored on exit."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def tune(scenario: Scenario, out_dir: str | Path, settings: TuneSettings, *, name: str = "scenario",
         run: runs.RunFn | None = None, console=None, tensorboard: bool = False) -> dict:
    """Run the trials still missing to reach ``settings.trials``; write trials.csv, best.yaml and the plots.
    ``tensorboard``: every simulation also writes TensorBoard scalars to its run folder's ``tb``."""
    from rich.console import Console

    settings.check()
    check_tune_scenario(scenario, settings)
    out_dir = Path(out_dir)
    check_existing_study(out_dir, scenario, settings)
    console = console or Console(stderr=True)
    # One engine for every simulation of the tune, the test-set re-runs included.
    engine = contextlib.nullcontext(run) if run is not None else runs.study_engine(scenario, settings.jobs,
                                                                                   tensorboard)
    with quiet_optuna(), exclusive_dir(out_dir), engine as run_one:
        objective = Objective(scenario, settings, out_dir, name, run_one)
        study = open_study(out_dir, scenario, settings)
        retried = requeue_orphans(out_dir)
        if retried:
            console.print(f"trials {', '.join(map(str, retried))} were left running by a stopped tune: "
                          "marked failed, queued again")
        missing = max(0, settings.trials - complete_count(study))
        try:
            run_trials(study, objective, missing, console)
        except KeyboardInterrupt:
            requeue_interrupted(study, objective.interrupted)
            raise
        finally:
            scores = write_outputs(study, scenario, settings, out_dir)
        test = holdout.report_best_on_test(study, scenario, settings, out_dir, run_one, name=name, console=console)
    return {**tune_summary(study, settings, missing, scores), "test": test}


def requeue_interrupted(study, numbers: Sequence[int]) -> None:
    """Queue the parameters of trials a Ctrl-C stopped again, as the heartbeat does for a killed tune's trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for number in numbers:
        if trials[number].state == TrialState.FAIL:  # one Optuna did not get to fail is the heartbeat's to find
            retry_trial()(study, trials[number])


def run_trials(study, objective: Objective, count: int, console) -> None:
    """Run ``count`` trials, ``settings.jobs`` at a time, with a rich progress bar."""
    from optuna.trial import TrialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    settings = objective.settings
    if count == 0:
        console.print(f"all {settings.trials} trials already complete in {objective.out_dir}")
        return

    def advance(study, trial) -> None:
        if trial.state == TrialState.FAIL:
            progress.console.print(f"trial #{trial.number} failed: {trial.user_attrs.get('error', '?')}")
        progress.update(task, advance=1, status=best_status(study, trial))

    def next_seed(study, trial) -> None:
        reseed(study, objective.scenario.seed)

    # Parallel trials finish in any order, and Optuna reseeds a shared sampler per thread: only one job at a
    # time gets a per-trial seed (docs/tuning.md, "Parallel trials").
    callbacks = [advance, next_seed] if settings.jobs == 1 else [advance]
    reseed(study, objective.scenario.seed)
    with Progress(TextColumn("[bold]trial"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("trials", total=count, status=f"{settings.objective}, {settings.jobs} job(s)")
        study.optimize(objective, n_trials=count, n_jobs=settings.jobs, catch=(Exception,), callbacks=callbacks)


# --------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    """Add the `tune` sub-command to the fed-deq parser."""
    from tools.args import add_scenario_args

    p = subparsers.add_parser(
        "tune", help="search the fusion rule's parameters for the best accuracy or time to target (resumable)",
        description="Search the fusion rule's parameters (and with --search-rule the rule itself) for the best "
                    "final or best accuracy, or the shortest simulated time to a target accuracy, measured on the "
                    "server's validation split and averaged over --seeds seeds (the test set is never read while "
                    "tuning). The best trial is then re-run on --test-seeds fresh seeds and reported on the test "
                    "set in best_test.csv. Running again with the same --out resumes the search.")
    add_scenario_args(p, optional=False)
    p.add_argument("--trials", type=int, required=True, help="total completed trials wanted (resume counts them)")
    p.add_argument("--objective", choices=OBJECTIVES, default="final_accuracy",
                   help="final_accuracy / best_accuracy (maximised) or time_to_target (simulated s, minimised)")
    p.add_argument("--target", type=float, default=runs.DEFAULT_TARGET,
                   help="accuracy for time_to_target (default 0.8)")
    p.add_argument("--search-rule", action="store_true", help="also search the fusion rule itself")
    p.add_argument("--search-tier-weights", action="store_true",
                   help="also search fusion.tier_weights, one multiplier in [0, 2] per tier (quality rule)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds each trial runs on, its score their mean (default 1: the scenario's own seed)")
    p.add_argument("--test-seeds", type=int, default=None,
                   help="fresh seeds the best trial is re-run on for the test-set report (default: --seeds; "
                        "0 skips it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trials at once (default 1: one simulation already uses every core)")
    p.add_argument("--out", required=True,
                   help="study folder: optuna.db, trials/, trials.csv, best.yaml, best_test.csv, tuning.png, ...")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each simulation's TensorBoard scalars to its run folder's tb "
                        "(tensorboard --logdir DIR shows every trial)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    """`fed-deq tune`: validate everything, then run the missing trials and print the best."""
    from rich.console import Console

    from tools.args import checked_out_dir, load_from_args, scenario_name

    out_dir = checked_out_dir(args.out)
    settings = TuneSettings(trials=args.trials, objective=args.objective, target=args.target,
                            search_rule=args.search_rule, jobs=args.jobs, seeds=args.seeds,
                            test_seeds=args.test_seeds, search_tier_weights=args.search_tier_weights)
    settings.check()
    scenario = load_from_args(args)
    check_tune_scenario(scenario, settings)
    console = Console(stderr=True)
    console.print(f"[bold]fed-deq tune[/] {args.scenario}: {settings.trials} trials × {settings.seeds} seed(s), "
                  f"{settings.objective} on the server's validation split → {out_dir}")
    summary = tune(scenario, out_dir, settings, name=scenario_name(args), console=console,
                   tensorboard=args.tensorboard)
    if summary["best_number"] is None:
        raise RunFailed(f"no trial completed ({summary['failed']} failed); see {out_dir}/trials.csv")
    console.print(f"best trial #{summary['best_number']}: {settings.objective} = {summary['best_value']:.4g} "
                  f"(server validation split, mean of {settings.seeds} seed(s))  {summary['best_params']}")
    if summary["test"] is not None:
        console.print(holdout.report_line(summary["test"]))
    if summary["importances"]:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items())
        console.print(f"parameter importance: {ranked}")
    written = [name for name in OUTPUTS if (out_dir / name).exists()]
    console.print(f"outputs in {out_dir}/ ({', '.join(written)})")
    return 0
