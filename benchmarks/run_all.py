"""`make bench`: measure the simulator at fleet scale; write benchmarks/results.json and the fleet section of
docs/benchmarks.md.

Every comparison is a ratio of two runs made back to back in this one invocation, on this machine, so the
noise of a shared machine hits both sides. Each run is a child process (timed, its whole process tree's
memory sampled from /proc), run with the exact command recorded next to its figure.

    .venv/bin/python benchmarks/run_all.py [--only overhead,study,fleet,solvers,fusion] [--out runs/bench]

``--only`` re-measures some steps and keeps the other figures of an existing results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fusion_study, report, scale, study_cost  # noqa: E402 - after the path fix: runs from anywhere
from benchmarks.proctree import Measured, run_measured  # noqa: E402
from benchmarks.schema import FIGURES, SCHEMA_VERSION, SchemaError, check_results, update_fleet_doc  # noqa: E402
from fed_deq.scenario import load_scenario  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results.json"
SOLVERS_JSON = ROOT / "benchmarks" / "solvers.json"
SOLVERS_SCRIPT = ROOT / "benchmarks" / "solvers.py"
DOC = ROOT / "docs" / "benchmarks.md"
PY = ".venv/bin/python"
FED_DEQ = ".venv/bin/fed-deq"
STEPS = ("overhead", "study", "fleet", "solvers", "fusion")
#: Rounds of the large-fleet runs: round 1 includes actor start-up, so rounds 2.. give the steady round wall.
FLEET_ROUNDS = 6
SMALL_FLEET = 100
FUSION_JSON = ROOT / "benchmarks" / "fusion.json"
FUSION_SEEDS = "1,2,3,4,5"
WARM_AFTER_ROUND = 3
#: simulate / bare-loop pairs behind overhead_ratio (the median pair's ratio is the figure).
OVERHEAD_PAIRS = 3
#: warm_over_cold_iters runs the default scenario where the tolerance, not the budget, stops the solve: every
#: device affords max_iterations (a deadline nobody reaches), far above the ~8 iterations tol 1e-3 needs.
TOLERANCE_LIMITED = ("training.max_iterations=100", "training.deadline_s=100000")
#: Tolerances besides the scenario's (1e-3) at which the warm/cold pair also runs, to show the trend.
OTHER_TOLERANCES = (1e-2, 1e-4)


def figure(name: str, value: float | None, command: str, details: dict, missing: str | None = None) -> dict:
    """One results.json figure entry, with its unit, goal and whether the goal is met."""
    unit, goal_max, _, what = FIGURES[name]
    entry = {"value": value, "unit": unit, "goal": None if goal_max is None else f"<= {goal_max:g}",
             "goal_max": goal_max, "met": None if goal_max is None or value is None else bool(value <= goal_max),
             "what": what, "command": command, "details": details}
    if missing is not None:
        entry["missing"] = missing
    return entry


def run(command: list[str], log: Path) -> Measured:
    """Run a benchmark command from the repository root; a failed command stops the benchmark."""
    print(f"  $ {shlex.join(command)}", flush=True)
    measured = run_measured(command, log, cwd=ROOT)
    print(f"    {measured.wall_s:.1f} s, peak RSS {measured.peak.rss_gib:.2f} GiB (tree of "
          f"{measured.peak.processes} processes)", flush=True)
    if measured.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"benchmark command failed ({measured.returncode}): {shlex.join(command)}\n" + "\n".join(tail))
    return measured


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def steady_round_wall(metrics: list[dict]) -> float:
    """Median wall seconds per round from round 2 on (round 1 pays for the actors' start-up)."""
    walls = [b["wall_time_s"] - a["wall_time_s"] for a, b in zip(metrics, metrics[1:])]
    return statistics.median(walls)


# --------------------------------------------------------------------------------------------------------
# Steps


def step_overhead(out: Path) -> dict:
    """overhead_ratio, overhead_per_update_s and warm_over_cold_iters: the default scenario on Flower + Ray vs
    bare loops. Both sides read the dataset from the on-disk cache, filled by whichever ran first.

    Simulate and the bare loop run ``OVERHEAD_PAIRS`` times side by side, in alternating order (a machine
    that slows down part-way through then burdens both sides alike); the figure is the median pair's ratio,
    and every pair is in the details."""
    def sim_cmd(i: int) -> list[str]:
        return [FED_DEQ, "simulate", "scenarios/default.yaml", "--out", str(out / f"default-sim-{i}"), "--no-progress"]

    def bare_cmd(i: int) -> list[str]:
        return [PY, "benchmarks/bare_loop.py", "scenarios/default.yaml", "--out", str(out / f"default-bare-{i}")]

    cold_cmd = [PY, "benchmarks/bare_loop.py", "scenarios/default.yaml", "--out", str(out / "default-bare-cold"),
                "--set", "training.warm_start=false"]
    # One round first fills the dataset cache, so that neither timed side pays for generating the data.
    run([PY, "benchmarks/bare_loop.py", "scenarios/default.yaml", "--out", str(out / "default-prime"),
         "--set", "training.rounds=1"], out / "logs" / "default-prime.log")
    pairs = []
    for i in range(1, OVERHEAD_PAIRS + 1):
        timed = {}
        for side in (("sim", "bare") if i % 2 else ("bare", "sim")):
            command = sim_cmd(i) if side == "sim" else bare_cmd(i)
            timed[side] = run(command, out / "logs" / f"default-{side}-{i}.log")
        pairs.append({"pair": i, "simulate_wall_s": timed["sim"].wall_s, "bare_loop_wall_s": timed["bare"].wall_s,
                      "ratio": timed["sim"].wall_s / timed["bare"].wall_s, "order": "simulate first" if i % 2
                      else "bare loop first", "simulate_peak_rss_gib": timed["sim"].peak.rss_gib})
    median = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    i = median["pair"]
    cold = run(cold_cmd, out / "logs" / "default-bare-cold.log")
    sim_metrics = read_jsonl(out / f"default-sim-{i}" / "metrics.jsonl")
    bare_metrics = read_jsonl(out / f"default-bare-{i}" / "metrics.jsonl")
    sim_summary = json.loads((out / f"default-sim-{i}" / "summary.json").read_text())
    bare_summary = json.loads((out / f"default-bare-{i}" / "summary.json").read_text())
    same_run = max(abs(a["accuracy"] - b["accuracy"]) + abs(a["mean_iterations"] - b["mean_iterations"])
                   for a, b in zip(sim_metrics, bare_metrics))
    command = f"{shlex.join(sim_cmd(i))}  vs  {shlex.join(bare_cmd(i))}"
    sim_wall, bare_wall = median["simulate_wall_s"], median["bare_loop_wall_s"]
    overhead = figure("overhead_ratio", median["ratio"], command, {
        "simulate_wall_s": sim_wall, "bare_loop_wall_s": bare_wall,
        "simulate_rounds_wall_s": sim_summary["wall_time_s"],
        "simulate_outside_rounds_s": sim_wall - sim_summary["wall_time_s"],
        "bare_rounds_wall_s": bare_summary["wall_time_s"],
        "simulate_round_wall_s": steady_round_wall(sim_metrics),
        "bare_round_wall_s": steady_round_wall(bare_metrics),
        "rounds": len(sim_metrics),
        "simulate_final_accuracy": sim_metrics[-1]["accuracy"], "bare_final_accuracy": bare_metrics[-1]["accuracy"],
        "max_abs_difference_accuracy_plus_iterations": same_run,
        "simulate_peak_rss_gib": median["simulate_peak_rss_gib"],
        "pairs": pairs, "median_pair": i,
    })
    updates = sum(m["clients_completed"] for m in sim_metrics)
    per_update = figure("overhead_per_update_s", (sim_wall - bare_wall) / updates, command,
                        {"client_updates": updates, "simulate_wall_s": sim_wall, "bare_loop_wall_s": bare_wall,
                         "simulate_outside_rounds_s": sim_wall - sim_summary["wall_time_s"],
                         "bare_outside_rounds_s": bare_wall - bare_summary["wall_time_s"]})
    budget_limited = warm_over_cold(read_jsonl(out / f"default-bare-{i}" / "clients.jsonl"),
                                    read_jsonl(out / "default-bare-cold" / "clients.jsonl"))
    tolerance_limited = tolerance_limited_warm_over_cold(out)
    warm_fig = figure("warm_over_cold_iters", tolerance_limited.pop("ratio"), tolerance_limited.pop("command"),
                      {**tolerance_limited, "ray_run_equals_bare_loop": same_run < 1e-9,
                       "budget_limited": {**budget_limited, "cold_bare_loop_wall_s": cold.wall_s,
                                          "command": f"{shlex.join(bare_cmd(i))}  vs  {shlex.join(cold_cmd)}"}})
    return {"overhead_ratio": overhead, "overhead_per_update_s": per_update, "warm_over_cold_iters": warm_fig}


def tolerance_limited_warm_over_cold(out: Path) -> dict:
    """warm_over_cold on the default scenario with TOLERANCE_LIMITED budgets: a warm-start run and a cold one
    (every solve from zero); with 3 local epochs, epochs 2.. reuse the previous epoch's fixed points. The
    headline is at the scenario's own tolerance; the same pair at ``OTHER_TOLERANCES`` shows how the ratio
    moves with it (``by_tolerance``)."""
    result = warm_cold_pair(out, "default-bare-tol", [])
    keep = ("ratio", "warm_forward_iterations", "cold_forward_iterations", "client_rounds_compared", "command")
    result["by_tolerance"] = {}
    for tol in OTHER_TOLERANCES:
        other = warm_cold_pair(out, f"default-bare-tol-{tol:g}", ["--set", f"model.tol={tol:g}"])
        result["by_tolerance"][f"{tol:g}"] = {key: other[key] for key in keep}
    # Anderson needs a few iterations to build its history wherever it starts; Picard's count follows the
    # starting residual alone, so the same pair with Picard shows what the warm start itself saves.
    picard = warm_cold_pair(out, "default-bare-tol-picard", ["--set", "model.solver=picard"])
    result["by_solver"] = {"picard": {key: picard[key] for key in keep}}
    return result


def warm_cold_pair(out: Path, stem: str, extra: list[str]) -> dict:
    """``warm_over_cold`` of one warm-start bare-loop run and one cold one, with TOLERANCE_LIMITED and ``extra``
    settings; adds both walls and the command pair."""
    commands, walls = {}, {}
    sets = [x for setting in TOLERANCE_LIMITED for x in ("--set", setting)] + extra
    for warm in ("true", "false"):
        name = f"{stem}-{'warm' if warm == 'true' else 'cold'}"
        commands[warm] = [PY, "benchmarks/bare_loop.py", "scenarios/default.yaml", "--out", str(out / name),
                          *sets, "--set", f"training.warm_start={warm}"]
        walls[warm] = run(commands[warm], out / "logs" / f"{name}.log").wall_s
    result = warm_over_cold(read_jsonl(out / f"{stem}-warm" / "clients.jsonl"),
                            read_jsonl(out / f"{stem}-cold" / "clients.jsonl"))
    return {**result, "overrides": list(TOLERANCE_LIMITED) + extra[1::2], "warm_wall_s": walls["true"],
            "cold_wall_s": walls["false"],
            "command": f"{shlex.join(commands['true'])}  vs  {shlex.join(commands['false'])}"}


def paired_replies(warm_log: list[dict], cold_log: list[dict], keep) -> list[tuple[dict, dict]]:
    """(warm, cold) replies of the same (round, client), for the warm replies ``keep`` accepts."""
    cold = {(r["round"], r["partition_id"]): r for r in cold_log}
    return [(r, cold[(r["round"], r["partition_id"])]) for r in warm_log
            if keep(r) and (r["round"], r["partition_id"]) in cold]


def mean_ratio(pairs: list[tuple[dict, dict]], key: str = "forward-iterations") -> float | None:
    """Mean of metric ``key`` warm / cold over ``pairs`` (None when there is no pair or no such metric)."""
    if not pairs or any(key not in w or key not in c for w, c in pairs):
        return None
    return statistics.fmean(w[key] for w, _ in pairs) / statistics.fmean(c[key] for _, c in pairs)


def warm_over_cold(warm_log: list[dict], cold_log: list[dict]) -> dict:
    """Mean forward iterations of warm-started replies after round 3 vs the same (round, client) run cold,
    with the per-client-round spread and the ratio over every reply and over replies without an old bank."""
    pairs = paired_replies(warm_log, cold_log, lambda r: r["round"] > WARM_AFTER_ROUND and r["had_warm_start"])
    if not pairs:
        raise SystemExit("warm_over_cold: no warm-started client after round 3 to compare")
    warm_iters = statistics.fmean(w["forward-iterations"] for w, _ in pairs)
    cold_iters = statistics.fmean(c["forward-iterations"] for _, c in pairs)
    per_pair = fusion_study.interval([w["forward-iterations"] / c["forward-iterations"] for w, c in pairs])
    spread = {"mean": per_pair["mean"], "min": min(per_pair["values"]), "max": max(per_pair["values"]),
              "ci95": per_pair["ci95"] if len(pairs) > 1 else None}
    capped = sum(1 for _, c in pairs if c["forward-iterations"] >= c["budget-total"] - c["backward-iterations"] - 1e-9)
    by_budget: dict[str, list[float]] = {}
    for w, c in pairs:
        forward_budget = int(round(c["budget-total"] - c["backward-iterations"]))
        by_budget.setdefault(str(forward_budget), []).append(w["forward-iterations"] / c["forward-iterations"])
    return {"ratio": warm_iters / cold_iters, "warm_forward_iterations": warm_iters,
            "cold_forward_iterations": cold_iters, "client_rounds_compared": len(pairs),
            "cold_clients_at_their_budget": capped,
            "ratio_by_forward_budget": {k: statistics.fmean(v) for k, v in sorted(by_budget.items(), key=lambda kv: int(kv[0]))},
            "warm_rel_residual": statistics.fmean(w["rel-residual"] for w, _ in pairs),
            "cold_rel_residual": statistics.fmean(c["rel-residual"] for _, c in pairs),
            "per_client_round_ratio": spread,
            # Whole-batch f calls: a batch solves until its slowest sample stops, so this is what compute follows.
            "solve_evals_ratio": mean_ratio(pairs, "work-solve-evals"),
            "ratio_all_client_rounds": mean_ratio(paired_replies(warm_log, cold_log, lambda r: True)),
            "ratio_without_earlier_bank": mean_ratio(
                paired_replies(warm_log, cold_log, lambda r: not r["had_warm_start"]))}


def small_fleet_overrides(clients: int = SMALL_FLEET) -> list[str]:
    """--set values giving large-fleet.yaml ``clients`` clients with the same training and validation samples
    per client and the same test, probe and server validation sets (``scale.same_data_overrides``), so only
    the fleet size differs."""
    big = load_scenario(ROOT / "scenarios" / "large-fleet.yaml")
    return scale.same_data_overrides([f"fleet.num_clients={big.fleet.num_clients}"], clients)


def step_fleet(out: Path) -> dict:
    """large_fleet_peak_rss_gib and fleet_size_round_ratio: 1,000 vs 100 clients, 50 sampled per round."""
    rounds = ["--set", f"training.rounds={FLEET_ROUNDS}"]
    big_cmd = [FED_DEQ, "simulate", "scenarios/large-fleet.yaml", "--out", str(out / "fleet-1000"), "--no-progress",
               *rounds]
    small_cmd = [FED_DEQ, "simulate", "scenarios/large-fleet.yaml", "--out", str(out / "fleet-100"), "--no-progress",
                 *rounds, *small_fleet_overrides()]
    big = run(big_cmd, out / "logs" / "fleet-1000.log")
    small = run(small_cmd, out / "logs" / "fleet-100.log")
    big_round = steady_round_wall(read_jsonl(out / "fleet-1000" / "metrics.jsonl"))
    small_round = steady_round_wall(read_jsonl(out / "fleet-100" / "metrics.jsonl"))
    rss = figure("large_fleet_peak_rss_gib", big.peak.rss_gib, shlex.join(big_cmd), {
        "peak_pss_gib": big.peak.pss_gib, "processes_at_peak": big.peak.processes, "samples": big.peak.samples,
        "wall_s": big.wall_s, "rounds": FLEET_ROUNDS, "fleet_100_peak_rss_gib": small.peak.rss_gib})
    ratio = figure("fleet_size_round_ratio", big_round / small_round,
                   f"{shlex.join(big_cmd)}  vs  {shlex.join(small_cmd)}", {
                       "round_wall_1000_s": big_round, "round_wall_100_s": small_round,
                       "wall_1000_s": big.wall_s, "wall_100_s": small.wall_s,
                       "rounds_used": f"median of rounds 2..{FLEET_ROUNDS}"})
    return {"large_fleet_peak_rss_gib": rss, "fleet_size_round_ratio": ratio}


def find_key(data, key: str):
    """The first value stored under ``key`` anywhere in nested dicts (solvers.json's layout is its own)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = find_key(value, key)
            if found is not None:
                return found
    return None


def solver_value(found) -> float | None:
    """A number, or a figure-like dict's ``value``."""
    if isinstance(found, dict):
        found = found.get("value")
    return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None


def step_solvers(out: Path) -> dict:
    """anderson_over_picard_iters and solver_time_ratio_vs_torchdeq, read from benchmarks/solvers.json."""
    note = "read from benchmarks/solvers.json (written by benchmarks/solvers.py)"
    if not SOLVERS_JSON.exists() and SOLVERS_SCRIPT.exists():
        run([PY, "benchmarks/solvers.py"], out / "logs" / "solvers.log")
        note = "benchmarks/solvers.json was missing: ran benchmarks/solvers.py"
    data = json.loads(SOLVERS_JSON.read_text(encoding="utf-8")) if SOLVERS_JSON.exists() else None
    command = f"{PY} benchmarks/solvers.py"
    if isinstance(data, dict) and isinstance(data.get("command"), str):
        command = f"{data['command']} ({command})"
    figures = {}
    for name in ("anderson_over_picard_iters", "solver_time_ratio_vs_torchdeq"):
        value = solver_value(find_key(data, name)) if data is not None else None
        details = {"source": "benchmarks/solvers.json", "note": note}
        if isinstance(data, dict):
            details.update({k: data[k] for k in ("date", "headline_batch") if isinstance(data.get(k), (str, int))})
        missing = None if value is not None else (
            f"no {name} in benchmarks/solvers.json" if data is not None else "benchmarks/solvers.json and "
            "benchmarks/solvers.py are both missing")
        figures[name] = figure(name, value, command, details, missing=missing)
    return figures


def step_fusion(out: Path) -> dict:
    """The multi-seed fusion study (benchmarks/fusion_study.py) and, from it, quality_over_fedavg_time_to_target:
    the shipped quality score against FedAvg on the heterogeneous fleet, per seed (paired), mean and interval."""
    command = [PY, "benchmarks/fusion_study.py", "--seeds", FUSION_SEEDS, "--out", str(out / "fusion")]
    measured = run(command, out / "logs" / "fusion.log")
    study = json.loads(FUSION_JSON.read_text())
    rows = study["scenarios"]["heterogeneous-fleet"]
    quality, fedavg = rows[study["liars_against"]], rows["fedavg"]
    ratios = [q / f for q, f in zip(quality["time_to_target_s"]["values"], fedavg["time_to_target_s"]["values"])]
    spread = fusion_study.interval(ratios)
    details = {"target_accuracy": study["targets"]["heterogeneous-fleet"], "seeds": study["seeds"],
               "quality_config": study["liars_against"], "per_seed_ratio": ratios, "ratio_ci95": spread["ci95"],
               "quality_time_to_target_s": quality["time_to_target_s"], "fedavg_time_to_target_s":
               fedavg["time_to_target_s"], "quality_reached": quality["reached_target"],
               "fedavg_reached": fedavg["reached_target"], "quality_final_accuracy": quality["final_accuracy"],
               "fedavg_final_accuracy": fedavg["final_accuracy"], "wall_s": measured.wall_s}
    return {"quality_over_fedavg_time_to_target": figure("quality_over_fedavg_time_to_target", spread["mean"],
                                                         shlex.join(command), details)}


def step_study(out: Path) -> dict:
    """study_extra_run_s: what one more run inside a study costs beyond its work (benchmarks/study_cost.py)."""
    return study_cost.step_study(out, run, figure)


STEP_FUNCTIONS = {"overhead": step_overhead, "study": step_study, "fleet": step_fleet, "solvers": step_solvers,
                  "fusion": step_fusion}


# --------------------------------------------------------------------------------------------------------


def machine() -> dict:
    """Where the figures were measured."""
    import flwr
    import ray
    import torch

    return {"cpus": os.cpu_count() or 1, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "flwr": flwr.__version__, "ray": ray.__version__,
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    """Run the selected steps, merge with kept figures, check the schema, write results.json and the docs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps from {', '.join(STEPS)}")
    parser.add_argument("--out", default="runs/bench", help="where the benchmark runs write (default runs/bench)")
    parser.add_argument("--docs-only", action="store_true",
                        help="measure nothing: rewrite the fleet section of docs/benchmarks.md from results.json")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}")
    os.chdir(ROOT)  # commands and paths in results.json are relative to the repository root
    out = Path(os.path.relpath((ROOT / args.out).resolve(), ROOT))
    if args.docs_only:
        update_fleet_doc(DOC, report.fleet_section(json.loads(RESULTS.read_text())))
        return 0
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() and len(steps) < len(STEPS) else {}
    figures = dict(previous.get("figures", {}))
    started = time.perf_counter()
    info = machine()
    for step in steps:
        print(f"[{step}]", flush=True)
        step_started = time.perf_counter()
        figures.update(STEP_FUNCTIONS[step](out))
        print(f"  step {step}: {time.perf_counter() - step_started:.0f} s", flush=True)
    if len(steps) == len(STEPS):  # a whole `make bench` also measures the 10,000-client fleet (docs/scale.md)
        scale.main(["--out", str(out / "scale")])
    total = time.perf_counter() - started
    data = {"schema": SCHEMA_VERSION, "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "total_wall_s": total if len(steps) == len(STEPS) else previous.get("total_wall_s", total),
            "steps_last_run": steps, "machine": info, "figures": {name: figures.get(name) for name in FIGURES}}
    try:
        check_results(data)
    except SchemaError:
        partial = out / "results.partial.json"  # e.g. --only on a first run: keep what was measured
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"results incomplete, not written to benchmarks/results.json; measured figures in {partial}")
        raise
    RESULTS.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    update_fleet_doc(DOC, report.fleet_section(data))
    print(report.summary_lines(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
