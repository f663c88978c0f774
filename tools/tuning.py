"""`fed-deq tune` and `fed-deq compare`: search the fusion rule's parameters with Optuna, compare rules.

Each tuning trial is one whole simulation of the scenario with the trial's fusion values applied. The Optuna
study lives in ``DIR/optuna.db`` (sqlite) under a fixed name, so running the same command again resumes it:
only the trials still missing to reach ``--trials`` run, and a trial a crash left RUNNING is marked failed and
re-run with the same parameters. See docs/tuning.md.

No Flower here: simulations go through a *runner* callable, by default ``tools.simulate.simulate`` (in this
process) or a ``fed-deq simulate`` child process per trial when trials run in parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_deq import fleet, results
from fed_deq.errors import InputError, RunFailed
from fed_deq.scenario import FUSION_RULES, QUALITY_SCORES, Scenario, dump_scenario, parse_scenario

OBJECTIVES = ("final_accuracy", "best_accuracy", "time_to_target")
STUDY_NAME = "fed-deq-tune"
STORAGE_FILE = "optuna.db"
TRIALS_DIR = "trials"
DEFAULT_TARGET = 0.8
#: Random (seeded) trials before TPE starts modelling; a constant, so a resumed study samples like a fresh one.
STARTUP_TRIALS = 5
#: Search ranges: (low, high, log scale). Inside the schema's bounds (docs/design.md, fusion section).
FLOAT_RANGES = {
    "size_exponent": (0.0, 2.0, False),
    "quality_exponent": (0.0, 4.0, False),
    "beta": (0.1, 20.0, True),
    "floor": (0.0, 0.5, False),
    "proximal_mu": (1e-4, 1.0, True),
    "trim_beta": (0.05, 0.45, False),
}
#: Quality scores shaped by ``beta`` (exp(-beta * residual) or exp(-beta * probe loss)).
RESIDUAL_SCORES = ("residual", "product", "probe")
TRIAL_COLUMNS = ("final_accuracy", "best_accuracy", "time_to_target_s", "sim_time_s", "wall_time_s", "error")
COMPARE_COLUMNS = ("rule", "final_accuracy", "best_accuracy", "sim_time_to_target_s", "wall_time_s")

#: ``run(scenario, out_dir, name) -> summary``: one whole simulation writing metrics.jsonl into ``out_dir``.
RunFn = Callable[[Scenario, Path, str], dict]


@dataclass(frozen=True)
class TuneSettings:
    """What ``fed-deq tune`` was asked to do."""

    trials: int
    objective: str = "final_accuracy"
    target: float = DEFAULT_TARGET
    search_rule: bool = False
    jobs: int = 1

    def check(self) -> None:
        """Raise InputError on impossible settings (before anything is written)."""
        if self.trials < 1:
            raise InputError(f"--trials: must be an integer >= 1, got {self.trials}")
        if self.jobs < 1:
            raise InputError(f"--jobs: must be an integer >= 1, got {self.jobs}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective: unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check_target(self.target)

    @property
    def direction(self) -> str:
        """Optuna direction: time is minimised, accuracy maximised."""
        return "minimize" if self.objective == "time_to_target" else "maximize"


def check_target(target: float) -> None:
    """A target accuracy must lie in (0, 1]."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise InputError(f"--target: must be an accuracy in (0, 1], got {target}")


# --------------------------------------------------------------------------------------------------------
# Runners


def run_in_process(scenario: Scenario, out_dir: Path, name: str) -> dict:
    """One simulation through Flower + Ray in this process (Ray starts and stops inside)."""
    from tools.simulate import simulate

    return simulate(scenario, out_dir, name=name, progress=False)


def run_in_subprocess(scenario: Scenario, out_dir: Path, name: str) -> dict:
    """One simulation in a ``fed-deq simulate`` child process: Ray is per process, so parallel trials need one each."""

    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "input" / f"{name}.yaml"  # the file stem names the run
    source.parent.mkdir(exist_ok=True)
    dump_scenario(scenario, source)
    command = [sys.executable, "-m", "tools.cli", "simulate", str(source), "--out", str(out_dir), "--no-progress"]
    with open(out_dir / "simulate.log", "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code in (130, -2):  # the child got the terminal's Ctrl-C too: the tune is being interrupted
        raise KeyboardInterrupt
    if code != 0:
        lines = (out_dir / "simulate.log").read_text(encoding="utf-8").strip().splitlines()
        raise RunFailed(f"fed-deq simulate exited {code}: {lines[-1] if lines else 'no output'}")
    return json.loads((out_dir / results.SUMMARY_FILE).read_text(encoding="utf-8"))


def default_runner(jobs: int) -> RunFn:
    """In-process runs for one job at a time; a child process per run when several run at once."""
    return run_in_process if jobs == 1 else run_in_subprocess


# --------------------------------------------------------------------------------------------------------
# Search space and objective


def suggest_fusion(trial, search_rule: bool) -> dict[str, Any]:
    """The fusion values of one trial; quality parameters only where the rule reads them."""
    rule = trial.suggest_categorical("rule", list(FUSION_RULES)) if search_rule else "quality"
    values: dict[str, Any] = {"rule": rule} if search_rule else {}
    if rule == "quality":
        score = trial.suggest_categorical("score", list(QUALITY_SCORES))
        values["score"] = score
        for key in ("size_exponent", "quality_exponent", "floor"):
            values[key] = _suggest_float(trial, key)
        if score in RESIDUAL_SCORES:  # beta only shapes the residual score
            values["beta"] = _suggest_float(trial, "beta")
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
    return apply_section(scenario, "fusion", values, source)


def apply_section(scenario: Scenario, section: str, values: dict[str, Any], source: str) -> Scenario:
    """The scenario with keys of one section replaced, validated like a scenario file."""
    data = scenario.to_dict()
    data[section].update(values)
    return parse_scenario(data, source)


def unreached_time(scenario: Scenario, target: float, best_accuracy: float | None) -> float:
    """Penalised time of a run that never reached ``target``: the longest possible run, stretched by the shortfall.

    A round lasts at most the deadline, so ``rounds x deadline`` bounds every run's simulated time: any run that
    reaches the target scores less than any run that does not, and among those the closer one scores less.
    """
    horizon = scenario.training.rounds * scenario.training.deadline_s
    shortfall = target - (best_accuracy if best_accuracy is not None else 0.0)
    return horizon * (1.0 + max(shortfall, 0.0) / target)


def score_run(scenario: Scenario, metrics: Sequence[dict], objective: str, target: float) -> tuple[float, dict]:
    """The objective value of a finished run and the figures kept beside it (trial user attributes)."""
    summary = results.summarise(metrics, scenario_name="", fusion_rule=scenario.fusion.rule, wall_time_s=0.0)
    reached = results.time_to_target(metrics, target) if metrics else None
    figures = {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
               "time_to_target_s": reached, "sim_time_s": summary["sim_time_s"]}
    if objective == "time_to_target":
        value = reached if reached is not None else unreached_time(scenario, target, summary["best_accuracy"])
    else:
        value = summary[objective]
    if value is None or not math.isfinite(float(value)):

        raise RunFailed(f"run has no {objective} (no round evaluated)")
    return float(value), figures


# --------------------------------------------------------------------------------------------------------
# The study: storage, resume, one trial


def scenario_digest(scenario: Scenario) -> str:
    """A short fingerprint of the resolved scenario, to refuse resuming a study of another scenario."""
    return hashlib.sha256(dump_scenario(scenario).encode("utf-8")).hexdigest()[:16]


def study_attrs(scenario: Scenario, settings: TuneSettings) -> dict[str, Any]:
    """What must match for a study in DIR to be resumed."""
    attrs = {"scenario": scenario_digest(scenario), "objective": settings.objective,
             "search_rule": settings.search_rule}
    if settings.objective == "time_to_target":
        attrs["target"] = settings.target
    return attrs


def storage_url(out_dir: Path) -> str:
    """sqlite URL of the study kept in DIR."""
    return f"sqlite:///{(out_dir / STORAGE_FILE).resolve()}"


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


def open_study(out_dir: Path, scenario: Scenario, settings: TuneSettings):
    """Create or load the study in DIR/optuna.db (fixed name), recording what it tunes; (study, storage)."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url(out_dir))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=settings.direction,
                                load_if_exists=True)
    for key, value in study_attrs(scenario, settings).items():
        study.set_user_attr(key, value)
    return study, storage


def recover_interrupted(study) -> list[int]:
    """Mark trials a crash left RUNNING as failed and queue their parameters again; return their numbers."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return [t.number for t in stale]


def complete_count(study) -> int:
    """Trials that finished with a value (the ones that count towards --trials)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def seeded_study(study, storage, seed: int):
    """The same study with a TPE sampler seeded from (scenario seed, trials so far).

    A fresh seed per trial, not one sampler for the whole tune: then trial k samples the same parameters
    whether or not the tune was interrupted and resumed before it.
    """
    import optuna

    draw = int(fleet.rng(seed, "tune", len(study.get_trials(deepcopy=False))).integers(2**31))
    sampler = optuna.samplers.TPESampler(seed=draw, n_startup_trials=STARTUP_TRIALS)
    return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)


@dataclass
class TuneJob:
    """Everything one trial needs; shared by the worker threads."""

    study: Any
    storage: Any
    scenario: Scenario
    settings: TuneSettings
    out_dir: Path
    name: str
    run: RunFn
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


def trial_dir(out_dir: Path, number: int) -> Path:
    """Where trial ``number``'s simulation writes its files."""
    return out_dir / TRIALS_DIR / f"{number:04d}"


def run_trial(job: TuneJob) -> tuple[int, str]:
    """Ask for one trial, simulate it, tell the result; return (trial number, state name)."""
    from optuna.trial import TrialState

    with job.lock:  # ask under the lock: two workers must not sample from the same history
        trial = seeded_study(job.study, job.storage, job.scenario.seed).ask()
        values = suggest_fusion(trial, job.settings.search_rule)
    scenario = apply_fusion(job.scenario, values, source=f"trial {trial.number}")
    if job.settings.jobs > 1 and not scenario.simulation.ray_address:
        # Each parallel trial starts its own Ray; give each its share of the cores instead of all of them.
        cpus = max(1, (os.cpu_count() or 1) // job.settings.jobs)
        scenario = apply_section(scenario, "simulation", {"num_cpus": cpus}, f"trial {trial.number}")
    out = trial_dir(job.out_dir, trial.number)
    started = time.perf_counter()
    try:
        job.run(scenario, out, job.name)
        value, figures = score_run(scenario, results.read_metrics(out), job.settings.objective, job.settings.target)
    except KeyboardInterrupt:
        with job.lock:
            trial.set_user_attr("error", "interrupted")
            job.study.tell(trial, state=TrialState.FAIL)
            job.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded; the study goes on
        with job.lock:
            trial.set_user_attr("error", " ".join(str(exc).split())[:300])
            trial.set_user_attr("wall_time_s", time.perf_counter() - started)
            job.study.tell(trial, state=TrialState.FAIL)
        return trial.number, "FAIL"
    with job.lock:
        for key, figure in {**figures, "wall_time_s": time.perf_counter() - started}.items():
            trial.set_user_attr(key, figure)
        job.study.tell(trial, value)
    return trial.number, "COMPLETE"


# --------------------------------------------------------------------------------------------------------
# Outputs


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    _write_bytes_atomic(path, text.encode("utf-8"))


def _save_figure(figure, path: Path) -> Path:
    """A matplotlib figure as PNG, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_bytes_atomic(path, buffer.getvalue())
    return path


def _csv_text(header: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in header})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """CSV cell: empty for missing values, full precision for floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def param_names(trials) -> list[str]:
    """Every parameter any trial used, in search-space order."""
    order = ["rule", "score", *FLOAT_RANGES]
    used = {name for t in trials for name in t.params}
    return [name for name in order if name in used]


def write_trials_csv(study, path: Path) -> Path:
    """DIR/trials.csv: one row per trial (number, state, objective, parameters, figures, wall time)."""
    trials = study.get_trials(deepcopy=False)
    params = param_names(trials)
    header = ["number", "state", "objective", *params, *TRIAL_COLUMNS]
    rows = [{"number": t.number, "state": t.state.name, "objective": t.value, **t.params,
             **{key: t.user_attrs.get(key) for key in TRIAL_COLUMNS}} for t in trials]
    _write_text_atomic(path, _csv_text(header, rows))
    return path


def best_trial(study):
    """The best COMPLETE trial, or None when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_best_yaml(study, scenario: Scenario, settings: TuneSettings, path: Path) -> Path | None:
    """DIR/best.yaml: the scenario with the best trial's fusion values, runnable with `fed-deq simulate`."""
    best = best_trial(study)
    if best is None:
        return None
    values = dict(best.params)
    best_scenario = apply_fusion(scenario, values, source=str(path))
    header = (f"# fed-deq tune: best of {complete_count(study)} trials (trial {best.number}), "
              f"{settings.objective} = {best.value:.6g}"
              + (f" (target {settings.target:g})" if settings.objective == "time_to_target" else "") + "\n")
    _write_text_atomic(path, header + dump_scenario(best_scenario))
    return path


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
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ValueError, RuntimeError):
        # Optuna refuses when no parameter is shared by all trials or the space is degenerate.
        return {}


def plot_tuning(study, settings: TuneSettings, seed: int, path: Path) -> Path:
    """DIR/tuning.png: objective per trial with the best-so-far line, and parameter importances."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    numbers, values = [t.number for t in complete], [t.value for t in complete]
    better = min if settings.direction == "minimize" else max
    best_so_far = [better(values[: i + 1]) for i in range(len(values))]
    left.plot(numbers, values, "o", alpha=0.7, label="trial")
    left.step(numbers, best_so_far, where="post", color="C3", label="best so far")
    left.set_xlabel("trial")
    left.set_ylabel(settings.objective + (" (s, simulated)" if settings.objective == "time_to_target" else ""))
    left.grid(alpha=0.3)
    left.legend(fontsize="small")
    scores = importances(study, seed)
    if scores:
        names = list(scores)[::-1]
        right.barh(names, [scores[n] for n in names], color="C2")
        right.set_xlabel("importance (fANOVA)")
    else:
        right.text(0.5, 0.5, "parameter importance needs >= 3 completed trials\nwith different objective values",
                   ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    figure.tight_layout()
    return _save_figure(figure, path)


# --------------------------------------------------------------------------------------------------------
# tune


@contextlib.contextmanager
def exclusive_dir(out_dir: Path) -> Iterator[None]:
    """Hold DIR/.tune.lock: two tunes on one DIR would fail each other's running trials on resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".tune.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_dir}: another fed-deq tune is running on this folder") from None
        yield


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; fed-deq draws its own progress."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def tune(scenario: Scenario, out_dir: str | Path, settings: TuneSettings, *, name: str = "scenario",
         run: RunFn | None = None, console=None) -> dict:
    """Run the trials still missing to reach ``settings.trials``; write trials.csv, best.yaml, tuning.png."""
    from rich.console import Console

    settings.check()
    out_dir = Path(out_dir)
    check_existing_study(out_dir, scenario, settings)
    console = console or Console(stderr=True)
    run = run or default_runner(settings.jobs)
    quiet_optuna()
    with exclusive_dir(out_dir):
        study, storage = open_study(out_dir, scenario, settings)
        retried = recover_interrupted(study)
        if retried:
            console.print(f"trials {', '.join(map(str, retried))} were left running by an interrupted tune: "
                          "marked failed, queued again")
        missing = max(0, settings.trials - complete_count(study))
        job = TuneJob(study, storage, scenario, settings, out_dir, name, run)
        try:
            run_trials(job, missing, console)
        finally:
            write_trials_csv(study, out_dir / "trials.csv")
            write_best_yaml(study, scenario, settings, out_dir / "best.yaml")
            if complete_count(study):
                plot_tuning(study, settings, scenario.seed, out_dir / "tuning.png")
    return tune_summary(study, settings, missing)


def run_trials(job: TuneJob, count: int, console) -> None:
    """Run ``count`` trials, ``job.settings.jobs`` at a time, with a rich progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if count == 0:
        console.print(f"all {job.settings.trials} trials already complete in {job.out_dir}")
        return
    remaining = iter(range(count))
    claim = threading.Lock()

    def worker() -> None:
        while not job.stop.is_set():
            with claim:
                if next(remaining, None) is None:
                    return
            number, state = run_trial(job)
            progress.update(task, advance=1, status=best_status(job.study, number, state))

    with Progress(TextColumn("[bold]trial"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("trials", total=count, status=f"{job.settings.objective}, {job.settings.jobs} job(s)")
        try:
            if job.settings.jobs == 1:
                worker()
            else:
                with ThreadPoolExecutor(job.settings.jobs) as pool:
                    for future in [pool.submit(worker) for _ in range(job.settings.jobs)]:
                        future.result()
        except BaseException:
            job.stop.set()  # the other workers finish their trial and start no new one
            raise


def best_status(study, number: int, state: str) -> str:
    """Progress text after a trial: its state and the best value so far."""
    best = best_trial(study)
    text = f"#{number} {state.lower()}"
    return text + (f" · best {best.value:.4g} (#{best.number})" if best is not None else "")


def tune_summary(study, settings: TuneSettings, ran: int) -> dict:
    """What the CLI prints at the end of a tune."""
    from optuna.trial import TrialState

    best = best_trial(study)
    return {"trials_run": ran, "complete": complete_count(study),
            "failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
            "objective": settings.objective,
            "best_number": best.number if best else None, "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else {}}


# --------------------------------------------------------------------------------------------------------
# compare


def parse_rules(text: str) -> list[str]:
    """Comma-separated fusion rules; unknown or repeated names are an InputError listing the valid ones."""
    rules = [part.strip() for part in str(text).split(",") if part.strip()]
    if not rules:
        raise InputError(f"--rules: give at least one fusion rule; valid rules: {', '.join(FUSION_RULES)}")
    for rule in rules:
        if rule not in FUSION_RULES:
            raise InputError(f"--rules: unknown fusion rule {rule!r}; valid rules: {', '.join(FUSION_RULES)}")
    repeated = sorted({r for r in rules if rules.count(r) > 1})
    if repeated:
        raise InputError(f"--rules: {', '.join(repeated)} given more than once")
    return rules


def compare(scenario: Scenario, rules: Sequence[str], out_dir: str | Path, *, target: float = DEFAULT_TARGET,
            name: str = "scenario", run: RunFn | None = None, console=None) -> list[dict]:
    """Run the scenario once per rule (same seed); write compare.csv and compare.png; return the rows."""
    from rich.console import Console

    check_target(target)
    rules = parse_rules(",".join(rules))
    variants = {rule: apply_fusion(scenario, {"rule": rule}, source=f"--rules {rule}") for rule in rules}
    out_dir = Path(out_dir)
    run = run or run_in_process
    console = console or Console(stderr=True)
    rows, curves = [], {}
    for index, (rule, variant) in enumerate(variants.items(), start=1):
        console.print(f"[bold]compare[/] {index}/{len(rules)}: fusion rule [cyan]{rule}[/]")
        started = time.perf_counter()
        run(variant, out_dir / rule, name)
        wall = time.perf_counter() - started
        metrics = results.read_metrics(out_dir / rule)
        rows.append(compare_row(rule, metrics, target, wall))
        curves[rule] = metrics
        _write_text_atomic(out_dir / "compare.csv", _csv_text(COMPARE_COLUMNS, rows))
    plot_compare(curves, target, out_dir / "compare.png")
    return rows


def compare_row(rule: str, metrics: Sequence[dict], target: float, wall_time_s: float) -> dict:
    """One compare.csv row from a run's round records."""
    summary = results.summarise(metrics, scenario_name="", fusion_rule=rule, wall_time_s=wall_time_s)
    return {"rule": rule, "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "sim_time_to_target_s": results.time_to_target(metrics, target) if metrics else None,
            "wall_time_s": wall_time_s}


def plot_compare(curves: dict[str, Sequence[dict]], target: float, path: Path) -> Path:
    """DIR/compare.png: test accuracy vs simulated time, one curve per rule, the target as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for rule, metrics in curves.items():
        times = [0.0] + [float(m["sim_time_s"]) for m in metrics]
        accuracy = [math.nan] + [math.nan if m.get("accuracy") is None else float(m["accuracy"]) for m in metrics]
        ax.plot(times[1:], accuracy[1:], marker="o", markersize=3, label=rule)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return _save_figure(figure, path)


def compare_table(rows: Sequence[dict], target: float):
    """A rich table of compare rows."""
    from rich.table import Table

    table = Table(title=f"fed-deq compare · target accuracy {target:g}")
    for column in ("rule", "final acc", "best acc", "sim time to target (s)", "wall (s)"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for row in rows:
        ttt = row["sim_time_to_target_s"]
        table.add_row(row["rule"], _fmt(row["final_accuracy"]), _fmt(row["best_accuracy"]),
                      "not reached" if ttt is None else f"{ttt:,.1f}", f"{row['wall_time_s']:.1f}")
    return table


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    """Add the `tune` and `compare` sub-commands to the fed-deq parser."""
    from tools.args import add_scenario_args

    p = subparsers.add_parser("tune", help="search the fusion rule's parameters with Optuna (resumable)")
    add_scenario_args(p, optional=False)
    p.add_argument("--trials", type=int, required=True, help="total completed trials wanted (resume counts them)")
    p.add_argument("--objective", choices=OBJECTIVES, default="final_accuracy",
                   help="final_accuracy / best_accuracy (maximised) or time_to_target (simulated s, minimised)")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, help="accuracy for time_to_target (default 0.8)")
    p.add_argument("--search-rule", action="store_true", help="also search the fusion rule itself")
    p.add_argument("--jobs", type=int, default=1,
                   help="trials at once (default 1: one simulation already uses every core)")
    p.add_argument("--out", required=True, help="study folder: optuna.db, trials/, trials.csv, best.yaml, tuning.png")
    p.set_defaults(func=cmd_tune)
    p = subparsers.add_parser("compare", help="run a scenario once per fusion rule and compare them")
    add_scenario_args(p, optional=False)
    p.add_argument("--rules", required=True, help=f"comma-separated, from: {', '.join(FUSION_RULES)}")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, help="accuracy for time to target (default 0.8)")
    p.add_argument("--out", required=True, help="output folder: compare.csv, compare.png, one run folder per rule")
    p.set_defaults(func=cmd_compare)


def cmd_tune(args: argparse.Namespace) -> int:
    """`fed-deq tune`: validate everything, then run the missing trials and print the best."""
    from rich.console import Console

    from tools.args import load_from_args, scenario_name

    settings = TuneSettings(trials=args.trials, objective=args.objective, target=args.target,
                            search_rule=args.search_rule, jobs=args.jobs)
    settings.check()
    scenario = load_from_args(args)
    console = Console(stderr=True)
    console.print(f"[bold]fed-deq tune[/] {args.scenario}: {settings.trials} trials, {settings.objective} → {args.out}")
    summary = tune(scenario, args.out, settings, name=scenario_name(args), console=console)
    if summary["best_number"] is None:

        raise RunFailed(f"no trial completed ({summary['failed']} failed); see {args.out}/trials.csv")
    console.print(f"best trial #{summary['best_number']}: {settings.objective} = {summary['best_value']:.4g}  "
                  f"{summary['best_params']}")
    console.print(f"outputs in {args.out}/ (trials.csv, best.yaml, tuning.png, optuna.db, trials/)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`fed-deq compare`: validate the rules, run one simulation per rule, print the table."""
    from rich.console import Console

    from tools.args import load_from_args, scenario_name

    rules = parse_rules(args.rules)
    check_target(args.target)
    scenario = load_from_args(args)
    rows = compare(scenario, rules, args.out, target=args.target, name=scenario_name(args),
                   console=Console(stderr=True))
    Console().print(compare_table(rows, args.target))
    print(f"outputs in {args.out}/ (compare.csv, compare.png, one folder per rule)")
    return 0
