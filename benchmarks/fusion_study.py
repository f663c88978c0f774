"""Multi-seed study of the fusion rules, and of the fleet under lying adversaries (part of `make bench`).

For each shipped scenario in SCENARIOS, each fusion configuration in CONFIGS and each seed, one run of the
bare loop (``benchmarks/bare_loop.py``: the same RoundDriver, client code and recorder as `fed-deq simulate`,
without the Flower/Ray machinery, so many runs fit on two cores). Every figure is reported as a mean with a
95 % Student-t interval over the seeds, beside the per-seed values and the command that made each run; the
differences to FedAvg are paired by seed (same data, same fleet, same draws).

    .venv/bin/python benchmarks/fusion_study.py [--seeds 1,2,3,4,5] [--jobs 2] [--out runs/bench/fusion]

Writes benchmarks/fusion.json, docs/img/fusion_study.png and the fusion section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fed_deq.results import read_metrics, time_to_target  # noqa: E402
from fed_deq.scenario import Scenario, load_scenario  # noqa: E402
from benchmarks import reuse  # noqa: E402

RESULTS = ROOT / "benchmarks" / "fusion.json"
PLOT = ROOT / "docs" / "img" / "fusion_study.png"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- fusion:start -->", "<!-- fusion:end -->"
PY = ".venv/bin/python"
SCENARIOS = {"default": 0.6, "heterogeneous-fleet": 0.5}     # scenario → target accuracy for time-to-target
#: label → --set overrides. Every quality score, FedAvg and FedNova.
CONFIGS = {
    "quality/residual": ["fusion.rule=quality", "fusion.score=residual"],
    "quality/probe": ["fusion.rule=quality", "fusion.score=probe"],
    "quality/accuracy": ["fusion.rule=quality", "fusion.score=accuracy"],
    "quality/budget": ["fusion.rule=quality", "fusion.score=budget"],
    "quality/product": ["fusion.rule=quality", "fusion.score=product"],
    "fedavg": ["fusion.rule=fedavg"],
    "fednova": ["fusion.rule=fednova"],
}
BASELINE = "fedavg"
#: Accuracy swings by a few points from round to round: the decision figure is the mean of the last rounds.
LATE_ROUNDS = 3
#: Lying clients on the default scenario: every attack that forges a claim, one device each (tier, attack).
LIES = (("phone-low", "inflate_examples"), ("phone-low", "fake_time"), ("phone-mid", "fake_residual"),
        ("phone-mid", "fake_accuracy"), ("phone-flagship", "fake_steps"))


def adversaries_override(entries) -> str:
    """A ``--set adversaries=[...]`` value planting one device per (tier, attack) entry."""
    return "adversaries=[" + ", ".join(f"{{tier: {t}, count: 1, attack: {a}}}" for t, a in entries) + "]"


LIARS = adversaries_override(LIES)
#: The same five devices (the draw depends on the entries' order, tiers and counts, not on the attack), silent.
SILENT = adversaries_override((tier, "silent") for tier, _ in LIES)


def shipped_label() -> str:
    """The configuration default.yaml ships with: the liars are measured against it."""
    fusion = load_scenario(ROOT / "scenarios" / "default.yaml").fusion
    return f"quality/{fusion.score}" if fusion.rule == "quality" else fusion.rule


#: The issue's own example: two phones inflating their sample counts.
INFLATERS = "adversaries=[{tier: phone-low, count: 2, attack: inflate_examples}]"
#: Adversary studies on the default scenario, against its shipped configuration: label → overrides.
ADVERSARY_RUNS = {"liars": LIARS, "silent": SILENT, "two-inflaters": INFLATERS}
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and 95 % Student-t half-width of ``values``."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = T95.get(n, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "ci95": half, "n": n, "values": values}


def command(scenario: str, overrides: list[str], seed: int, out: Path) -> list[str]:
    """The bare-loop command of one run."""
    sets = [x for o in [*overrides, f"seed={seed}"] for x in ("--set", o)]
    return [PY, "benchmarks/bare_loop.py", f"scenarios/{scenario}.yaml", "--out", str(out), *sets]


def run_one(cmd: list[str], out: Path, scenario: Scenario, code: str) -> dict:
    """Run one study run and read its results. A finished run of the same scenario by the same code is reused
    (the study resumes); any other is run again (benchmarks/reuse.py)."""
    if reuse.finished_summary(scenario, out, code) is None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "run.log", "w", encoding="utf-8") as log:
            done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"study run failed ({done.returncode}): {shlex.join(cmd)}; see {out / 'run.log'}")
        reuse.mark_made_by(out, code)
    summary = json.loads((out / "summary.json").read_text())
    metrics = read_metrics(out)
    probe = [m["probe"]["wall_s"] for m in metrics if m.get("probe")]
    late = [m["accuracy"] for m in metrics[-LATE_ROUNDS:]]
    return {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "late_accuracy": statistics.fmean(late),
            "sim_time_s": summary["sim_time_s"], "wall_time_s": summary["wall_time_s"], "metrics": metrics,
            "rejected": sum(m["clients_rejected"] for m in metrics),
            "probe_wall_s_per_round": statistics.fmean(probe) if probe else None}


def study(seeds: list[int], jobs: int, out: Path) -> dict:
    """Every (scenario, config, seed) run, then the liars on the default scenario; aggregated."""
    plan = [(scenario, label, overrides, seed) for scenario in SCENARIOS for label, overrides in CONFIGS.items()
            for seed in seeds]
    plan += [("default", label, [*CONFIGS[shipped_label()], adversaries], seed)
             for label, adversaries in ADVERSARY_RUNS.items() for seed in seeds]
    started = time.perf_counter()
    code = reuse.code_digest()

    def task(item):
        scenario, label, overrides, seed = item
        run_dir = out / scenario / label.replace("/", "-") / f"seed{seed}"
        cmd = command(scenario, overrides, seed, run_dir)
        expected = load_scenario(ROOT / "scenarios" / f"{scenario}.yaml", [*overrides, f"seed={seed}"])
        result = run_one(cmd, run_dir, expected, code)
        print(f"  {scenario:20s} {label:18s} seed {seed}: final {result['final_accuracy']:.3f}", flush=True)
        return item, cmd, result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(task, plan))
    runs: dict = {}
    for (scenario, label, _, seed), cmd, result in done:
        runs.setdefault(scenario, {}).setdefault(label, {})[seed] = {**result, "command": shlex.join(cmd)}
    return {"seeds": seeds, "wall_s": time.perf_counter() - started, "targets": SCENARIOS, "runs": len(done),
            "run_wall_s_total": sum(result["wall_time_s"] for _, _, result in done), "jobs": jobs,
            "liars_against": shipped_label(),
            "scenarios": {s: summarise(s, by_label, seeds) for s, by_label in runs.items()}}


def summarise(scenario: str, by_label: dict, seeds: list[int]) -> dict:
    """Per configuration: final/best accuracy, time to target and paired differences to FedAvg."""
    target = SCENARIOS[scenario]
    rows = {}
    for label, by_seed in by_label.items():
        reached = {s: time_to_target(r["metrics"], target) for s, r in by_seed.items()}
        rows[label] = {
            "late_accuracy": interval([by_seed[s]["late_accuracy"] for s in seeds]),
            "final_accuracy": interval([by_seed[s]["final_accuracy"] for s in seeds]),
            "best_accuracy": interval([by_seed[s]["best_accuracy"] for s in seeds]),
            "reached_target": sum(v is not None for v in reached.values()),
            # A run that never reaches the target counts its whole simulated horizon (said in the docs).
            "time_to_target_s": interval([reached[s] if reached[s] is not None else by_seed[s]["sim_time_s"]
                                          for s in seeds]),
            "rejected_replies": interval([float(by_seed[s]["rejected"]) for s in seeds]),
            "probe_wall_s_per_round": by_seed[seeds[0]]["probe_wall_s_per_round"],
            "commands": [by_seed[s]["command"] for s in seeds],
        }
    for label, row in rows.items():
        base = shipped_label() if label in ADVERSARY_RUNS else BASELINE
        if label == base or base not in by_label:
            continue
        row["late_minus_" + ("honest" if label in ADVERSARY_RUNS else base)] = interval(
            [by_label[label][s]["late_accuracy"] - by_label[base][s]["late_accuracy"] for s in seeds])
        if label == "liars" and "silent" in by_label:
            # Every lie caught means the liars' fleet fuses exactly what it fuses when they never answer.
            row["same_accuracy_as_silent"] = all(
                [m["accuracy"] for m in by_label["liars"][s]["metrics"]]
                == [m["accuracy"] for m in by_label["silent"][s]["metrics"]] for s in seeds)
    return rows


def best_config(rows: dict) -> str:
    """The configuration with the highest mean late accuracy (the liars run is not a configuration)."""
    return max((label for label in rows if label in CONFIGS), key=lambda l: rows[l]["late_accuracy"]["mean"])


def plot(data: dict, path: Path) -> None:
    """Per scenario, each configuration's late accuracy minus FedAvg's, paired by seed (dots: seeds; bars:
    mean ± 95 % interval); adversary runs against the honest shipped configuration, in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scenarios = list(data["scenarios"])
    figure = Figure(figsize=(6 * len(scenarios), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(scenarios), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        rows = data["scenarios"][scenario]
        labels = [l for l in [*CONFIGS, *ADVERSARY_RUNS] if l in rows and l != BASELINE]
        for i, label in enumerate(labels):
            cell = rows[label].get("late_minus_honest") or rows[label].get(f"late_minus_{BASELINE}")
            if cell is None:
                continue
            colour = "tab:red" if label in ADVERSARY_RUNS else "tab:blue" if label.startswith("quality") else "tab:gray"
            ax.errorbar([i], [cell["mean"]], yerr=[cell["ci95"]], fmt="o", color=colour, capsize=5, markersize=7)
            ax.plot([i] * len(cell["values"]), cell["values"], ".", color="black", markersize=4)
        ax.axhline(0.0, color="black", linewidth=0.8)
        names = [f"{l}\n(− honest)" if l in ADVERSARY_RUNS else l for l in labels]
        ax.set_xticks(range(len(labels)), names, rotation=35, ha="right", fontsize="small")
        ax.set_title(f"{scenario}: {len(data['seeds'])} seeds, paired by seed", fontsize="small")
        ax.set_ylabel(f"test accuracy (last {LATE_ROUNDS} rounds) − FedAvg\n(red: − the honest run)")
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def fmt(cell: dict, digits: int = 3) -> str:
    """'mean ± ci95' for a table."""
    return f"{cell['mean']:.{digits}f} ± {cell['ci95']:.{digits}f}"


def section(data: dict) -> str:
    """The fusion section of docs/benchmarks.md."""
    lines = [START, "## Fusion rules: quality scores vs FedAvg vs FedNova (multi-seed)", "",
             f"Made by `make bench` (step `fusion`: `{PY} benchmarks/fusion_study.py --seeds "
             f"{','.join(map(str, data['seeds']))}`): {data['runs']} runs, {data['run_wall_s_total'] / 60:.0f} min of run "
             f"time on this machine ({data['jobs']} at a time). Each cell is "
             f"the mean ± 95 % Student-t half-width over seeds {', '.join(map(str, data['seeds']))}; every run "
             "is the bare loop (the same RoundDriver as `fed-deq simulate`), its command in "
             "`benchmarks/fusion.json`. Time to target counts the whole simulated horizon for a run that never "
             "reaches it.", "", "![accuracy minus FedAvg per rule, paired by seed](img/fusion_study.png)", ""]
    best = {scenario: best_config(rows) for scenario, rows in data["scenarios"].items()}
    lines += [f"Reading: the highest mean accuracy over the last rounds is {', '.join(f'`{c}` on {s}' for s, c in best.items())}; "
              f"the shipped default is `{data['liars_against']}` (`scenarios/default.yaml`, and the schema's default "
              "score). A paired difference whose interval holds 0 is not a finding: on these fleets most rules are "
              "within noise of FedAvg, and scores that weight by the budget share (`budget`, `product`) lose on the "
              "default fleet because they down-weight the phones' data.", ""]
    for scenario, rows in data["scenarios"].items():
        target = data["targets"][scenario]
        lines += [f"### {scenario}", "",
                  f"| rule | accuracy, last {LATE_ROUNDS} rounds | − FedAvg (paired) | final accuracy | best accuracy "
                  f"| sim. time to {target:g} (s) | runs reaching it | probe s/round |",
                  "|---|---|---|---|---|---|---|---|"]
        for label in [l for l in CONFIGS if l in rows]:
            row = rows[label]
            diff = row.get("late_minus_fedavg")
            probe = row["probe_wall_s_per_round"]
            lines.append(f"| {label} | {fmt(row['late_accuracy'])} | {fmt(diff) if diff else '—'} | "
                         f"{fmt(row['final_accuracy'])} | {fmt(row['best_accuracy'])} | "
                         f"{fmt(row['time_to_target_s'], 0)} | {row['reached_target']}/{len(data['seeds'])} | "
                         f"{'—' if probe is None else f'{probe:.2f}'} |")
        lines.append("")
    default = data["scenarios"].get("default", {})
    if "liars" in default:
        liars = default["liars"]
        lines += ["### Lying clients (default scenario, default rule)", "",
                  "Five of the twenty devices lie every round (`inflate_examples`, `fake_time`, `fake_residual`, "
                  "`fake_accuracy`, `fake_steps`; `benchmarks/fusion_study.py` LIARS). Every lie is caught and the "
                  "reply rejected, so the fleet trains on the honest fifteen: round for round the same accuracy as "
                  "when the same five devices never answer (`silent`): "
                  f"{'identical in every seed' if liars.get('same_accuracy_as_silent') else 'NOT identical'}. "
                  "What the liars cost is their data, not control of the model.", "",
                  f"| run | accuracy, last {LATE_ROUNDS} rounds | final accuracy | rejected replies per run "
                  "| last rounds − honest (paired) |", "|---|---|---|---|---|",
                  f"| honest ({data['liars_against']}) | {fmt(default[data['liars_against']]['late_accuracy'])} | "
                  f"{fmt(default[data['liars_against']]['final_accuracy'])} | "
                  f"{fmt(default[data['liars_against']]['rejected_replies'], 1)} | — |",
                  f"| with liars | {fmt(liars['late_accuracy'])} | {fmt(liars['final_accuracy'])} | "
                  f"{fmt(liars['rejected_replies'], 1)} | {fmt(liars['late_minus_honest'])} |"]
        for label, name in (("silent", "the same five silent"), ("two-inflaters", "two phones inflating n")):
            if label in default:
                row = default[label]
                lines.append(f"| {name} | {fmt(row['late_accuracy'])} | {fmt(row['final_accuracy'])} | "
                             f"{fmt(row['rejected_replies'], 1)} | {fmt(row['late_minus_honest'])} |")
        lines.append("")
    lines += [END]
    return "\n".join(lines)


def update_doc(path: Path, text: str) -> None:
    """Replace the fusion section of ``path`` (append it when absent)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line: run the study, write fusion.json, the plot and the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/fusion")
    parser.add_argument("--docs-only", action="store_true", help="rewrite plot and docs from fusion.json")
    args = parser.parse_args(argv)
    if args.docs_only:
        data = json.loads(RESULTS.read_text())
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        data = study(seeds, args.jobs, ROOT / args.out)
        for rows in data["scenarios"].values():
            for row in rows.values():
                row.pop("metrics", None)
        RESULTS.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot(data, PLOT)
    update_doc(DOC, section(data))
    for scenario, rows in data["scenarios"].items():
        print(f"{scenario}: best mean final accuracy: {best_config(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
