"""The same federated run as `fed-deq simulate`, as a bare sequential loop: no Flower runtime, no Ray, one process.

It drives the very same server round (``fed_deq.rounds.RoundDriver`` and ``run_rounds``) as the ServerApp; only
the exchange differs: each instruction is carried out by calling ``fed_deq.workload.run_client_round`` in this
process (keeping warm starts per partition, as the ClientApp keeps them in ``context.state``). It is the
baseline of ``overhead_ratio``, the fast path for multi-seed studies, and writes ``clients.jsonl`` (one line per
reply) for the warm-start figure.

    .venv/bin/python benchmarks/bare_loop.py scenarios/default.yaml --out runs/bench/bare [--set k=v ...]

With ``--variants fedavg@0,quality@0,...`` it runs the scenario once per fusion rule and seed, one after the
other in this one process (into DIR/<rule>/seed-<seed>/, as ``fed-deq compare`` lays its runs out), and prints
each run's wall time: the work of each run of a study without the study's engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fed_deq import adversary  # noqa: E402 - after the path fix so the script runs from anywhere
from fed_deq.recorder import RunRecorder  # noqa: E402
from fed_deq.rounds import Exchange, OpenRound, Reply, RoundDriver, run_rounds  # noqa: E402
from fed_deq.rules import FUSION_RULES  # noqa: E402
from fed_deq.scenario import Scenario, load_scenario  # noqa: E402
from fed_deq.workload import run_client_round  # noqa: E402


def direct_exchange(scenario: Scenario, banks: dict, log) -> Exchange:
    """Carry out each instruction by a local call, in partition order, like the ClientApp would."""
    attacks = adversary.assign(scenario)

    def exchange(open_round: OpenRound) -> tuple[list[Reply], list[int]]:
        replies = []
        for pid, instruction in open_round.instructions.items():
            had_warm = pid in banks and scenario.training.warm_start
            try:
                result = run_client_round(scenario, pid, open_round.server_round, open_round.reference,
                                          budget=instruction.budget, warm_start=banks.get(pid),
                                          proximal_mu=instruction.proximal_mu, attack=attacks.get(pid))
            except Exception as exc:  # noqa: BLE001 - as Flower turns a raising ClientApp into an error reply
                replies.append(Reply(node_id=pid, partition_id=pid, error=str(exc)))
                continue
            if result.warm_start.size:
                banks[pid] = result.warm_start
            log.write(json.dumps({"round": open_round.server_round, "partition_id": pid,
                                  "had_warm_start": had_warm, **result.metrics}) + "\n")
            replies.append(Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics)))
        return replies, []

    return exchange


def bare_loop(scenario: Scenario, out_dir: str | Path, *, name: str = "scenario") -> dict:
    """Run every round of ``scenario`` sequentially; write the run's files to ``out_dir``; return the summary."""
    out_dir = Path(out_dir)
    fuser = None
    if FUSION_RULES[scenario.fusion.rule].adapter == "flower":
        from server.strategies import robust_fuser  # Flower's rules; imported only when asked for

        fuser = robust_fuser(scenario)
    driver = RoundDriver(scenario, robust_fuser=fuser)
    with RunRecorder(scenario, out_dir, name=name) as recorder, \
            open(out_dir / "clients.jsonl", "w", encoding="utf-8") as log:
        run_rounds(driver, recorder, direct_exchange(scenario, {}, log))
        return recorder.finish()


def run_variants(scenario_path: str, overrides: list[str], variants: str, out_dir: Path) -> list[dict]:
    """Each ``rule@seed`` of ``variants`` run by ``bare_loop`` in turn; their rule, seed and wall seconds."""
    walls = []
    for variant in variants.split(","):
        rule, seed = variant.strip().split("@")
        scenario = load_scenario(scenario_path, [*overrides, f"fusion.rule={rule}", f"seed={int(seed)}"])
        started = time.perf_counter()
        bare_loop(scenario, out_dir / rule / f"seed-{int(seed)}", name=Path(scenario_path).stem)
        walls.append({"rule": rule, "seed": int(seed), "wall_s": time.perf_counter() - started})
    return walls


def main(argv: list[str] | None = None) -> int:
    """Command line: SCENARIO --out DIR [--set k=v ...] [--variants RULE@SEED,...]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", help="comma-separated rule@seed: one run each, in this process")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.variants:
        print(json.dumps({"runs": run_variants(args.scenario, args.overrides, args.variants, Path(args.out))}))
        return 0
    summary = bare_loop(load_scenario(args.scenario, args.overrides), args.out, name=Path(args.scenario).stem)
    print(json.dumps({"final_accuracy": summary["final_accuracy"], "wall_s": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
