"""The Optuna study `fed-deq tune` keeps in its folder: what it tunes, its storage, resuming, and its outputs.

The study lives in ``DIR/optuna.db`` (sqlite) under a fixed name, so running the same command again resumes
it. Running trials record a heartbeat; Optuna fails a trial whose heartbeat stopped (its tune was killed) and
its retry callback queues the same parameters again. Outputs beside it: trials.csv (Optuna's trials
dataframe; every figure in it measured on the server's validation split), best.yaml (a runnable scenario),
tuning.png and importances.png (Optuna's matplotlib plots). The test-set report is tools/holdout.py's.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_deq import results
from fed_deq.seeding import rng
from fed_deq.errors import InputError
from fed_deq.scenario import Scenario, dump_scenario
from tools import multiseed, runs

OBJECTIVES = ("final_accuracy", "best_accuracy", "time_to_target")
STUDY_NAME = "fed-deq-tune"
STORAGE_FILE = "optuna.db"
#: Random (seeded) trials before TPE starts modelling; a constant, so a resumed study samples like a fresh one.
STARTUP_TRIALS = 5
#: A running trial records a heartbeat this often (s); one silent for GRACE_S is failed and queued again.
HEARTBEAT_S = 10
GRACE_S = 60
#: A trial that keeps stopping the tune is queued again at most this many times.
MAX_RETRIES = 3
#: What trials are scored on: the server's validation split, never the test set.
SCORED_ON = "server_val_accuracy"
#: trials.csv columns after the parameters (trial user attributes): means over the tuning seeds, measured on
#: the server's validation split; ``val_reached`` counts the seeds that reached the target.
FIGURES = ("val_final_accuracy", "val_best_accuracy", "val_sim_time_to_target_s", "val_reached", "sim_time_s")
TRIAL_COLUMNS = (*FIGURES, "wall_time_s", "error", "retry_of")
#: Optuna parameter names ``tier_weights.<tier>`` stand for the entries of ``fusion.tier_weights``.
TIER_WEIGHT_PARAM = "tier_weights."


@dataclass(frozen=True)
class TuneSettings:
    """What ``fed-deq tune`` was asked to do."""

    trials: int
    objective: str = "final_accuracy"
    target: float = runs.DEFAULT_TARGET
    search_rule: bool = False
    jobs: int = 1
    seeds: int = 1
    test_seeds: int | None = None
    """fresh seeds the best trial is re-run on for the test-set report (None: as many as ``seeds``)"""
    search_tier_weights: bool = False

    def check(self) -> None:
        """Raise InputError on impossible settings (before anything is written)."""
        if self.trials < 1:
            raise InputError(f"--trials: must be an integer >= 1, got {self.trials}")
        if self.jobs < 1:
            raise InputError(f"--jobs: must be an integer >= 1, got {self.jobs}")
        multiseed.check_seeds(self.seeds)
        if self.test_seeds is not None:
            multiseed.check_seeds(self.test_seeds, "--test-seeds", minimum=0)
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective: unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        runs.check_target(self.target)

    @property
    def direction(self) -> str:
        """Optuna direction: time is minimised, accuracy maximised."""
        return "minimize" if self.objective == "time_to_target" else "maximize"

    def seed_lists(self, seed: int) -> tuple[list[int], list[int]]:
        """(tuning seeds, fresh test seeds): one derived list cut in two, so the two never share a seed."""
        fresh = self.seeds if self.test_seeds is None else self.test_seeds
        seeds = multiseed.study_seeds(seed, self.seeds + fresh)
        return seeds[:self.seeds], seeds[self.seeds:]


def check_tune_scenario(scenario: Scenario, settings: TuneSettings) -> None:
    """What a tune needs of the scenario: a server validation split to score on; tiers to weigh, if asked."""
    if scenario.dataset.server_validation_samples < 1:
        raise InputError("dataset.server_validation_samples: must be >= 1 for fed-deq tune (trials are scored on "
                         "the server's validation split, never on the test set)")
    if settings.search_tier_weights and len(scenario.fleet.tiers) < 2:
        raise InputError("--search-tier-weights: the fleet has one tier; tier weights only matter relative to "
                         "each other")


def fusion_values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna parameters as fusion keys: ``tier_weights.<tier>`` parameters become one mapping."""
    values = {k: v for k, v in params.items() if not k.startswith(TIER_WEIGHT_PARAM)}
    weights = {k.removeprefix(TIER_WEIGHT_PARAM): v for k, v in params.items() if k.startswith(TIER_WEIGHT_PARAM)}
    if weights:
        values["tier_weights"] = weights
    return values


# --------------------------------------------------------------------------------------------------------
# Storage and resume


def scenario_digest(scenario: Scenario) -> str:
    """A short fingerprint of the resolved scenario, to refuse resuming a study of another scenario."""
    return hashlib.sha256(dump_scenario(scenario).encode("utf-8")).hexdigest()[:16]


def study_attrs(scenario: Scenario, settings: TuneSettings) -> dict[str, Any]:
    """What must match for a study in DIR to be resumed."""
    attrs = {"scenario": scenario_digest(scenario), "objective": settings.objective,
             "search_rule": settings.search_rule, "seeds": settings.seeds,
             "search_tier_weights": settings.search_tier_weights, "scored_on": SCORED_ON}
    if settings.objective == "time_to_target":
        attrs["target"] = settings.target
    return attrs


def storage_url(out_dir: str | Path) -> str:
    """sqlite URL of the study kept in DIR."""
    return f"sqlite:///{(Path(out_dir) / STORAGE_FILE).resolve()}"


def check_existing_study(out_dir: Path, scenario: Scenario, settings: TuneSettings) -> None:
    """Refuse (InputError) to resume a study in DIR that tuned another scenario or objective."""
    if not (out_dir / STORAGE_FILE).exists():
        return
    import optuna

    summaries = optuna.get_all_study_summaries(storage_url(out_dir))
    study = next((s for s in summaries if s.study_name == STUDY_NAME), None)
    if study is None:
        return
    stored, wanted = study.user_attrs, study_attrs(scenario, settings)
    for key, value in wanted.items():
        if stored.get(key) != value:
            raise InputError(f"{out_dir}: holds a tuning study with {key}={stored.get(key)!r}, not {value!r}; "
                             f"use another --out to start a new study")


def retry_trial():
    """Optuna's callback that queues a failed trial's parameters again (at most MAX_RETRIES times)."""
    import optuna

    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def heartbeat_storage(out_dir: Path, *, grace_s: int = GRACE_S):
    """DIR/optuna.db with heartbeats on: a trial silent for ``grace_s`` seconds is failed, then retried."""
    import optuna

    return optuna.storages.RDBStorage(storage_url(out_dir), heartbeat_interval=min(HEARTBEAT_S, grace_s),
                                      grace_period=grace_s, heartbeat_stale_trial_callback=retry_trial())


def open_study(out_dir: Path, scenario: Scenario, settings: TuneSettings):
    """Create or load the study in DIR/optuna.db (fixed name), recording what it tunes."""
    import optuna

    study = optuna.create_study(study_name=STUDY_NAME, storage=heartbeat_storage(out_dir),
                                direction=settings.direction, load_if_exists=True)
    for key, value in study_attrs(scenario, settings).items():
        study.set_user_attr(key, value)
    return study


def requeue_orphans(out_dir: Path) -> list[int]:
    """Fail the trials a killed tune left RUNNING and queue their parameters again; return their numbers.

    Only called while holding DIR's lock, so no live tune owns a RUNNING trial: a heartbeat older than a
    second is an orphan's, and there is no need to wait out the grace period live trials get.
    """
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=STUDY_NAME, storage=heartbeat_storage(out_dir, grace_s=1))
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    return [n for n in running if trials[n].state == TrialState.FAIL]


def reseed(study, seed: int) -> None:
    """Give the study a TPE sampler seeded from (scenario seed, trials so far).

    A fresh seed per trial, not one sampler for the whole tune: then trial k samples the same parameters
    whether or not the tune was interrupted and resumed before it.
    """
    import optuna

    draw = int(rng(seed, "tune", len(study.get_trials(deepcopy=False))).integers(2**31))
    study.sampler = optuna.samplers.TPESampler(seed=draw, n_startup_trials=STARTUP_TRIALS)


def complete_count(study) -> int:
    """Trials that finished with a value (the ones that count towards --trials)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def best_trial(study):
    """The best COMPLETE trial, or None when no trial completed."""
    return study.best_trial if complete_count(study) else None


# --------------------------------------------------------------------------------------------------------
# Outputs


def write_outputs(study, scenario: Scenario, settings: TuneSettings, out_dir: Path) -> dict[str, float]:
    """trials.csv always; best.yaml and tuning.png once a trial completed, importances.png once they can be told.

    Returns the parameter importances ({} when there are too few trials to tell).
    """
    write_trials_csv(study, out_dir / "trials.csv")
    if best_trial(study) is None:
        return {}
    write_best_yaml(study, scenario, settings, out_dir / "best.yaml")
    plot_history(study, settings, out_dir / "tuning.png")
    scores = importances(study, scenario.seed)
    if scores:
        plot_importances(study, settings, scenario.seed, out_dir / "importances.png")
    return scores


def trials_table(study):
    """One row per trial from Optuna's trials dataframe: number, state, objective, parameters, figures, error."""
    import pandas

    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs",
                                          "system_attrs"))
    frame = frame.rename(columns=lambda c: c.removeprefix("params_").removeprefix("user_attrs_"))
    frame = frame.rename(columns={"value": "objective", "system_attrs_failed_trial": "retry_of"})
    params = list(dict.fromkeys(name for t in study.get_trials(deepcopy=False) for name in t.params))
    frame = frame.reindex(columns=["number", "state", "objective", *params, *TRIAL_COLUMNS, "duration"])
    if len(frame):
        frame["wall_time_s"] = pandas.to_timedelta(frame["duration"]).dt.total_seconds()
        # A FAIL without an error message is a trial its tune stopped (Ctrl-C or kill), not a failed run.
        stopped = (frame["state"] == "FAIL") & frame["error"].isna()
        frame["error"] = frame["error"].astype(object).where(~stopped, "interrupted")
        frame["retry_of"] = frame["retry_of"].astype("Int64")
    return frame.drop(columns="duration")


def write_trials_csv(study, path: Path) -> Path:
    """DIR/trials.csv: the trials table, written atomically."""
    return runs.write_csv(path, trials_table(study))


def write_best_yaml(study, scenario: Scenario, settings: TuneSettings, path: Path) -> Path:
    """DIR/best.yaml: the scenario with the best trial's fusion values, runnable with `fed-deq simulate`."""
    best = best_trial(study)
    best_scenario = runs.with_values(scenario, "fusion", fusion_values(best.params), source=str(path))
    header = (f"# fed-deq tune: best of {complete_count(study)} trials (trial {best.number}), "
              f"{settings.objective} = {best.value:.6g}"
              + (f" (target {settings.target:g})" if settings.objective == "time_to_target" else "")
              + f" on the server's validation split, mean of {settings.seeds} seed(s).\n"
              "# Not a test-set figure: the best trial's test-set results on fresh seeds are in best_test.csv.\n")
    return results.write_atomic(path, header + dump_scenario(best_scenario))


def importances(study, seed: int) -> dict[str, float]:
    """Parameter importances (fANOVA, seeded), or {} when too few trials or nothing varies to tell them apart."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or len({t.value for t in complete}) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
            return {name: float(score) for name, score in scores.items()}
    except (ValueError, RuntimeError):
        # Optuna refuses when no parameter is shared by all trials or the space is degenerate.
        return {}


def objective_label(settings: TuneSettings) -> str:
    """The objective's name for plot axes."""
    unit = " (simulated s)" if settings.objective == "time_to_target" else ""
    return f"{settings.objective}{unit}, server validation split"


def plot_history(study, settings: TuneSettings, path: Path) -> Path:
    """DIR/tuning.png: Optuna's optimization history (every trial's objective and the best so far)."""
    from optuna.visualization.matplotlib import plot_optimization_history

    return _save_optuna_plot(lambda: plot_optimization_history(study, target_name=objective_label(settings)), path)


def plot_importances(study, settings: TuneSettings, seed: int, path: Path) -> Path:
    """DIR/importances.png: Optuna's parameter importances (fANOVA, seeded)."""
    import optuna
    from optuna.visualization.matplotlib import plot_param_importances

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return _save_optuna_plot(
        lambda: plot_param_importances(study, evaluator=evaluator, target_name=objective_label(settings)), path)


def _save_optuna_plot(draw, path: Path) -> Path:
    """Save the axes ``draw()`` returns as PNG, then close its figure.

    Optuna draws through pyplot and switches the style sheet to ggplot; rc_context puts the caller's style back.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figure = draw().figure
        try:
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            return runs.save_figure(figure, path)
        finally:
            plt.close(figure)


def best_status(study, trial) -> str:
    """Progress text after a trial: its state and the best value so far."""
    best = best_trial(study)
    text = f"#{trial.number} {trial.state.name.lower()}"
    return text + (f" · best {best.value:.4g} (#{best.number})" if best is not None else "")


def tune_summary(study, settings: TuneSettings, ran: int, scores: dict[str, float]) -> dict:
    """What the CLI prints at the end of a tune."""
    from optuna.trial import TrialState

    best = best_trial(study)
    return {"trials_run": ran, "complete": complete_count(study),
            "failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
            "objective": settings.objective,
            "best_number": best.number if best else None, "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else {}, "importances": scores}
