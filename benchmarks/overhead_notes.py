"""The notes on the framework's overhead under the fleet table of docs/benchmarks.md: one simulation
(`overhead_ratio`, `overhead_per_update_s`) and one more run inside a study (`study_extra_run_s`).

Sentences that report a profile made while building the benchmark (not re-measured by every run) say so;
every other number comes from results.json.
"""

from __future__ import annotations


def verdict(fig: dict) -> str:
    """A figure's goal and whether it is met, for the notes: "goal <= 1: met", or "no goal"."""
    if fig.get("met") is None:
        return "no goal"
    return f"goal {fig['goal']}: {'met' if fig['met'] else 'missed'}"


def overhead_note(fig: dict) -> str:
    """Why the Flower + Ray run costs what it costs next to the bare loop, and what was cut from its fixed cost."""
    d = fig["details"]
    per_round = d["simulate_round_wall_s"] / d["bare_round_wall_s"]
    same = ("the bare loop reproduced the Ray run exactly, round by round (same accuracy and solver iterations, "
            "so warm starts do survive in the ClientApp's `context.state` under Ray)"
            if d["max_abs_difference_accuracy_plus_iterations"] == 0 else
            f"the two runs differ by {d['max_abs_difference_accuracy_plus_iterations']:.3g} in accuracy + iterations")
    bare_outside = d["bare_loop_wall_s"] - d.get("bare_rounds_wall_s", d["bare_loop_wall_s"])
    pairs = d.get("pairs") or []
    spread = ""
    if len(pairs) > 1:
        ratios = ", ".join(f"{p['ratio']:.2f}× ({p['simulate_wall_s']:.1f} s / {p['bare_loop_wall_s']:.1f} s, "
                           f"{p['order']})" for p in pairs)
        spread = (f" The figure is the median of {len(pairs)} pairs run side by side in alternating order: "
                  f"{ratios}. The machine's noise moves a single pair by about as much as the distance to the "
                  "goal, so read the spread, not the second decimal.")
    return (
        f"**`overhead_ratio` = {fig['value']:.2f}× ({verdict(fig)}).** `fed-deq simulate` took "
        f"{d['simulate_wall_s']:.1f} s and the bare loop {d['bare_loop_wall_s']:.1f} s for the same {d['rounds']} "
        f"rounds; {same}.{spread} Per round Flower + Ray is {per_round:.2f}× the bare loop (median round wall "
        f"{d['simulate_round_wall_s']:.2f} s vs {d['bare_round_wall_s']:.2f} s): the two Ray actors train the "
        "round's clients in parallel, while the server's own work (central evaluation, the checks of every "
        "reply: the same work as in the bare loop, which drives the same RoundDriver) runs in one thread. "
        f"Outside the rounds `fed-deq simulate` spent {d['simulate_outside_rounds_s']:.1f} s"
        + (f" and the bare loop {bare_outside:.1f} s (imports, the scenario, the dataset)" if bare_outside else "")
        + ". What was cut from a single run's fixed cost, each change measured side by side while building this "
        "benchmark: (1) every process, the driver and each actor, reads the dataset and its partitions from "
        "the on-disk cache (`fed_deq/datacache.py`, `$FED_DEQ_CACHE_DIR`, default `~/.cache/fed-deq`) instead "
        "of generating MNIST-1D and partitioning it with flwr-datasets; (2) fed-deq starts Ray itself "
        "(`tools/engine.py`), without the job runtime environment Flower passes, which made Ray start each "
        "actor through its runtime-env agent (about 1.7 s per actor pool); (3) Flower's modules import in a "
        "thread while Ray starts, and torch imports there too: validating a scenario reads the shipped names of "
        "solvers, cells and rules from a list (`fed_deq/scenario/choices.py` `BUILT_IN`) instead of importing "
        "the registries, so `ray.init` begins 0.6 s after launch instead of about 1.8 s (four alternating pairs "
        "on `--set training.rounds=3`: 12.2, 13.0, 12.4, 12.4 s before, 12.2, 13.1, 11.0, 11.3 s after); each actor "
        "gets a warm-up call (imports, data) as soon as it exists, and the server evaluates the starting model "
        "before discovery waits for the actors; (4) Flower's dispatcher sweeps for messages every 0.02 s "
        "instead of 0.1 s and the server looks for replies as often (`tools/flower_patch.py`, "
        "`server/federation.py`), and the engine's queues wait at most 0.05 s between looks at the stop event, "
        "so a run no longer ends with up to a second of idle worker threads; (5) Ray is stopped with its "
        "processes ended promptly (`tools/engine.py` `shut_down_ray`: 0.5 s instead of 1.1–1.4 s, a second of "
        "which was Ray waiting for its autoscaler monitor to ignore SIGTERM); (6) the `fed-deq` command exits "
        "without Python's interpreter teardown once its files are written and closed (about 1 s of freeing "
        "torch, Ray and Flower). Side by side on `--set training.rounds=3`, three alternating pairs at load "
        "average 0.5–1.5: 17.2, 14.6, 17.2 s before (4) to (6) and the import reordering, 13.6, 14.3, 12.4 s "
        "after. What a single run still pays that the bare loop does not: `ray.init` (2.1–3.5 s alone on this "
        "machine: it starts nine processes, seven of them Python processes that import Ray — the GCS, the "
        "raylet, a dashboard head that Ray starts even with `include_dashboard=False`, the dashboard and "
        "runtime-env agents, the log and autoscaler monitors and two prestarted workers. Measured alone, side "
        "by side: starting Ray without the two monitors (through Ray's private start parameters; `ray.init` "
        "has no switch for them) left `ray.init` at 2.5 s in three pairs, and turning worker prestart off "
        "through `_system_config` moved start-up and actor creation by less than the noise, so neither is "
        "used) and the actors' imports of torch and the ClientApp (about 2 s, "
        "which discovery waits for), all on two cores. Since each round is faster than the bare loop's (the "
        "per-round ratio above), the ratio falls as a run gets longer. Inside a study all of it is paid once "
        "(`study_extra_run_s`)."
    )


def per_update_note(fig: dict) -> str:
    """The framework's overhead spread over the client updates of the run."""
    d = fig["details"]
    return (
        f"**`overhead_per_update_s` = {fig['value']:.3f} s ({verdict(fig)}).** (simulate wall − bare loop wall) / "
        f"client updates: ({d['simulate_wall_s']:.1f} s − {d['bare_loop_wall_s']:.1f} s) / {d['client_updates']} "
        "updates (the clients that trained and replied, all rounds), the same runs as `overhead_ratio`. Most of "
        "the difference is fixed cost (outside the rounds: "
        f"{d['simulate_outside_rounds_s']:.1f} s for simulate, {d['bare_outside_rounds_s']:.1f} s for the bare "
        "loop), so the figure falls as a run gets longer; negative would mean the parallel actors win back more "
        "per round than Ray costs to start."
    )


def study_note(fig: dict) -> str:
    """What one more run inside a study costs, and why it is small: one engine for all runs."""
    d = fig["details"]
    few, many = d["runs"].items()
    outside = d["extra_run_outside_rounds_s"]
    return (
        f"**`study_extra_run_s` = {fig['value']:.2f} s ({verdict(fig)}).** `fed-deq compare` of "
        f"scenarios/digits-iid.yaml with 2 rounds per run made {many[1]} runs in {d['compare_wall_s'][many[0]]:.1f} s "
        f"and {few[1]} runs in {d['compare_wall_s'][few[0]]:.1f} s: each of the {many[1] - few[1]} extra runs added "
        f"{d['wall_per_extra_run_s']:.2f} s of wall, of which the same run in the bare loop takes "
        f"{d['bare_work_per_run_s']:.2f} s (the same rules and seeds, one after the other in one warm process). "
        "All runs of a study share one engine (`tools/runs.py` `study_engine`, `tools/engine.py`): one Ray "
        "instance and one pool of client actors, started by the first run and stopped when the study ends "
        "(or, with `simulation.ray_address`, a cluster joined once and never stopped); each run borrows the "
        "pool, whose actors keep their imports and loaded data, and datasets come from the on-disk cache. The "
        f"first run paid {d['first_run_wall_s']:.1f} s. Per extra run, the time outside its rounds (the run's wall "
        f"in compare.csv minus its own in summary.json) was {min(outside):.2f}–{max(outside):.2f} s: Flower's "
        "per-run set-up, node discovery, the server's round driver and the recorder's files (Flower's teardown, "
        "up to a second when its worker threads polled their queues once a second, is now under 0.1 s). Before the shared engine every run started and "
        "stopped its own Ray and actors: `fed-deq compare scenarios/digits-iid.yaml --set training.rounds=2` "
        "with `--rules fedavg` and with `--rules fedavg,quality,fednova` took 22.6 s and 53.3 s, 15.3 s per "
        "extra run (measured side by side while building this benchmark, load average 0.2–2; the same pair "
        "with the engine: 16.2 s and 16.5 s)."
    )
