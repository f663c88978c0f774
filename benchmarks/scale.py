"""Fleet scale-out on one machine: a 10,000-client fleet against a 100-client one, 50 clients sampled per round.

Measured for each run (a child `fed-deq simulate`, its whole process tree sampled from /proc):

- **time before round 1**: from the command's start until its ``progress.json`` says round 1 is running (the
  run loop opens round 1 right after node discovery). Split at the moment ``progress.json`` first appears (the
  recorder starts: imports, Ray and the server's set-up are done; then come the starting model's evaluation and
  node discovery, which waits for the client actors).
- **steady round wall**: median wall seconds per round from round 2 on (round 1 includes the actors' first
  training calls);
- **peak memory**: RSS summed over the process tree (PSS alongside).

The 10,000-client fleet runs twice on one fresh dataset cache (``FED_DEQ_CACHE_DIR``): cold (MNIST-1D generated
and partitioned) then warm. The 100-client fleet has the same training samples per client and the same test set
(so central evaluation costs the same); it runs right before the warm 10,000-client run, so that the round-wall
ratio compares runs made back to back.
Writes benchmarks/scale.json and the figures section of docs/scale.md.

    .venv/bin/python benchmarks/scale.py [--rounds 6] [--out runs/bench/scale]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.proctree import TreePeak, TreeSampler  # noqa: E402 - after the path fix so the script runs anywhere
from fed_deq.scenario import load_scenario  # noqa: E402

SCENARIO = "scenarios/large-fleet.yaml"
BIG, SMALL, BIG_SAMPLES = 10_000, 100, 100_000
GOALS = {"time_before_round1_s": 30.0, "round_wall_ratio": 1.2, "peak_rss_gib": 4.0}
JSON_OUT = ROOT / "benchmarks" / "scale.json"
DOC = ROOT / "docs" / "scale.md"
START, END = "<!-- scale:start -->", "<!-- scale:end -->"
FED_DEQ = ".venv/bin/fed-deq"


@dataclass
class Run:
    """One measured `fed-deq simulate`."""

    label: str
    command: list[str]
    wall_s: float
    recorder_s: float | None      # start → progress.json exists
    round1_s: float | None        # start → progress.json says round 1 is running
    round_walls: list[float]      # rounds 2, 3, ...: the gaps between their metrics lines
    peak: TreePeak

    def figures(self) -> dict:
        """The run as JSON."""
        steady = statistics.median(self.round_walls) if self.round_walls else None
        return {"command": shlex.join(self.command), "wall_s": self.wall_s, "time_before_recorder_s": self.recorder_s,
                "time_before_round1_s": self.round1_s, "round_walls_s": self.round_walls,
                "steady_round_wall_s": steady, "peak_rss_gib": self.peak.rss_gib, "peak_pss_gib": self.peak.pss_gib,
                "processes_at_peak": self.peak.processes}


def same_data_overrides(base_overrides: list[str], clients: int) -> list[str]:
    """``--set`` values giving SCENARIO ``clients`` clients with the training and validation samples per client
    of the scenario under ``base_overrides`` (after the probe set and the server's validation split are drawn)
    and the same test set, probe set and server validation split: only the fleet size differs, so a round
    does the same work. The base's ``fleet.num_clients`` must be set. tests/test_bench_schema.py checks the
    sizes on the data a run would load."""
    base = load_scenario(ROOT / SCENARIO, overrides=base_overrides)
    total = base.dataset.num_samples
    n_test = round(total * base.dataset.test_fraction)  # as fed_deq.data splits
    held = base.fusion.probe_samples + base.dataset.server_validation_samples
    partitioned = (total - n_test - held) * clients // base.fleet.num_clients
    small_total = partitioned + held + n_test
    sets = [f"fleet.num_clients={clients}", f"dataset.num_samples={small_total}"]
    if small_total != total:
        sets.append(f"dataset.test_fraction={n_test / small_total!r}")
    return [x for s in sets for x in ("--set", s)]


def fleet_overrides(clients: int, rounds: int) -> list[str]:
    """``--set`` values for ``clients`` clients with the training samples per client of the 10,000-client fleet
    and its 20,000-sample test set (``same_data_overrides``), run for ``rounds`` rounds."""
    big = [f"dataset.num_samples={BIG_SAMPLES}", f"fleet.num_clients={BIG}"]
    return [*same_data_overrides(big, clients), "--set", f"training.rounds={rounds}"]


def watch_progress(out: Path, started: float, seen: dict, stop: threading.Event) -> None:
    """Record when ``out/progress.json`` appears and when it first says round 1 (or later) is running."""
    path = out / "progress.json"
    while not stop.wait(0.05):
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        now = time.perf_counter() - started
        seen.setdefault("recorder", now)
        if (progress.get("running_round") or 0) >= 1 or progress.get("finished"):
            seen["round1"] = now
            return


def measure(label: str, clients: int, rounds: int, out: Path, env: dict) -> Run:
    """Run one fleet to completion and measure it; a failed run stops the benchmark."""
    run_dir = out / label
    command = [FED_DEQ, "simulate", SCENARIO, "--out", str(run_dir), "--no-progress", *fleet_overrides(clients, rounds)]
    print(f"  $ FED_DEQ_CACHE_DIR={env['FED_DEQ_CACHE_DIR']} {shlex.join(command)}", flush=True)
    log = out / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "progress.json").unlink(missing_ok=True)
    seen: dict = {}
    stop = threading.Event()
    with open(log, "w", encoding="utf-8") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        watcher = threading.Thread(target=watch_progress, args=(run_dir, started, seen, stop), daemon=True)
        watcher.start()
        with TreeSampler(process.pid) as sampler:
            process.wait()
        wall = time.perf_counter() - started
        stop.set()
        watcher.join()
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"scale run {label} failed ({process.returncode}): {shlex.join(command)}\n" + "\n".join(tail))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    stamps = [m["wall_time_s"] for m in metrics]  # when each round's line was written
    run = Run(label, command, wall, seen.get("recorder"), seen.get("round1"),
              [b - a for a, b in zip(stamps, stamps[1:])], sampler.peak)
    print(f"    {wall:.1f} s; round 1 at {run.round1_s or float('nan'):.1f} s; peak RSS {run.peak.rss_gib:.2f} GiB",
          flush=True)
    return run


def measure_all(rounds: int, out: Path) -> dict:
    """A cold 10,000-client run, then 100 and 10,000 (warm) back to back; the figures as JSON."""
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="fed-deq-scale-cache-") as cache:
        env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "FED_DEQ_CACHE_DIR": cache}
        runs["big_cold"] = measure(f"fleet-{BIG}-cold", BIG, rounds, out, env)
        runs["small"] = measure(f"fleet-{SMALL}", SMALL, rounds, out, env)
        runs["big_warm"] = measure(f"fleet-{BIG}-warm", BIG, rounds, out, env)
    big, small = runs["big_warm"], runs["small"]
    ratio = big.figures()["steady_round_wall_s"] / small.figures()["steady_round_wall_s"]
    headline = {"time_before_round1_cold_s": runs["big_cold"].round1_s, "time_before_round1_warm_s": big.round1_s,
                "round_wall_ratio": ratio, "peak_rss_gib": max(r.peak.rss_gib for r in (runs["big_cold"], big))}
    return {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "goals": GOALS, "headline": headline, "runs": {k: r.figures() for k, r in runs.items()}}


def machine() -> dict:
    """Where the figures were measured."""
    return {"cpus": os.cpu_count() or 1, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg())}


def verdict(value: float | None, goal: float) -> str:
    """'met' or '**missed**' for a figure against its upper bound."""
    return "not measured" if value is None else ("met" if value <= goal else "**missed**")


def section(data: dict) -> str:
    """The figures section of docs/scale.md."""
    h, runs, g = data["headline"], data["runs"], data["goals"]
    rows = [("time before round 1, 10,000 clients, cold cache", h["time_before_round1_cold_s"], "s",
             g["time_before_round1_s"]),
            ("time before round 1, 10,000 clients, warm cache", h["time_before_round1_warm_s"], "s",
             g["time_before_round1_s"]),
            ("steady round wall, 10,000 / 100 clients", h["round_wall_ratio"], "x", g["round_wall_ratio"]),
            ("peak RSS of the process tree, 10,000 clients", h["peak_rss_gib"], "GiB", g["peak_rss_gib"])]
    lines = [START, "## Figures", "",
             f"Made by `.venv/bin/python benchmarks/scale.py` (also run by `make bench`) on {data['generated']}: "
             f"{data['machine']['cpus']} CPUs, load average at start "
             f"{', '.join(f'{x:.1f}' for x in data['machine']['load_average_at_start'])}. Raw figures: "
             "`benchmarks/scale.json`. Before round 1: from the command's start until `progress.json` says round 1 "
             "runs (\"before recorder\": until the recorder starts, before the starting model's evaluation and node "
             "discovery); steady round: median wall of "
             "rounds 2 on; peak: the larger of the two 10,000-client runs.", "",
             "| figure | value | goal | |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {value:.2f} {unit} | <= {goal:g} | {verdict(value, goal)} |" if value is not None
              else f"| {name} | — | <= {goal:g} | not measured |" for name, value, unit, goal in rows]
    lines += ["", "| run | before recorder | before round 1 | steady round | wall | peak RSS | peak PSS |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, run in runs.items():
        lines.append(f"| {key} | {_s(run['time_before_recorder_s'])} | {_s(run['time_before_round1_s'])} | "
                     f"{_s(run['steady_round_wall_s'])} | {_s(run['wall_s'])} | {run['peak_rss_gib']:.2f} GiB | "
                     f"{run['peak_pss_gib']:.2f} GiB |")
    lines += ["", "Commands (each with `FED_DEQ_CACHE_DIR` set to the benchmark's fresh cache):", ""]
    lines += [f"- {key}: `{run['command']}`" for key, run in runs.items()]
    return "\n".join([*lines, END])


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def update_doc(path: Path, text: str) -> None:
    """Replace the marked figures section of ``path`` (appended when the markers are missing)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if START in old and END in old:
        new = old[:old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Measure both fleets, write benchmarks/scale.json and the figures section of docs/scale.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (the steady wall: rounds 2..)")
    parser.add_argument("--out", default="runs/bench/scale", help="where the runs write (default runs/bench/scale)")
    parser.add_argument("--docs-only", action="store_true", help="measure nothing: rewrite the docs from the JSON")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if not args.docs_only:
        JSON_OUT.write_text(json.dumps(measure_all(args.rounds, Path(args.out)), indent=2) + "\n", encoding="utf-8")
    update_doc(DOC, section(json.loads(JSON_OUT.read_text(encoding="utf-8"))))
    print(section(json.loads(JSON_OUT.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
