"""The same federated run as `fed-deq simulate`, as a bare sequential loop: no Flower, no Ray, one process.

Each round samples the same clients with the scenario's generators, calls ``fed_deq.workload.run_client_round``
for each of them (keeping warm starts per partition, as the ClientApp keeps them in ``context.state``), screens
and fuses the replies with the server's own functions (``fed_deq.rounds``, ``fed_deq.fusion``) and evaluates
the global model centrally with the same ``RunRecorder``. It is the baseline of ``overhead_ratio``: the client
work and central evaluation a simulation does, without the machinery. It also writes ``clients.jsonl`` (one
line per reply) for the warm-start figure.

    .venv/bin/python benchmarks/bare_loop.py scenarios/default.yaml --out runs/bench/bare [--set k=v ...]
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

from fed_deq import fleet, fusion  # noqa: E402 - after the path fix so the script runs from anywhere
from fed_deq.recorder import RunRecorder  # noqa: E402
from fed_deq.rounds import Reply, RoundReport, close_round, quality_fusion_weights, screen_replies  # noqa: E402
from fed_deq.scenario import Scenario, load_scenario  # noqa: E402
from fed_deq.workload import model_arrays, run_client_round  # noqa: E402

#: Rules whose fusion is a weighted average the loop can reproduce exactly without Flower.
SUPPORTED_RULES = ("quality", "fedavg")


def fusion_weights(scenario: Scenario, accepted: list[Reply]):
    """The server's fusion weights for the accepted replies (quality rule, or FedAvg by examples)."""
    f = scenario.fusion
    if f.rule == "quality":
        return quality_fusion_weights(accepted, score=f.score, size_exponent=f.size_exponent,
                                      quality_exponent=f.quality_exponent, beta=f.beta, floor=f.floor)
    return [r.metrics["num-examples"] for r in accepted]


def train_round(scenario: Scenario, server_round: int, global_arrays: dict, banks: dict,
                devices: list) -> tuple[RoundReport, list[Reply]]:
    """Sample, drop and train the round's clients in order, like the strategy's configure_train + ClientApp."""
    plan = fleet.plan_round(devices, seed=scenario.seed, round=server_round,
                            clients_per_round=scenario.training.clients_per_round)
    report = RoundReport(server_round=server_round, sampled=list(plan.sampled),
                         unavailable=len(devices) - len(plan.available))
    replies = []
    for pid in plan.sampled:
        if pid in plan.dropped_out:
            report.dropped[pid] = "dropped out mid-round"
            continue
        result = run_client_round(scenario, pid, server_round, global_arrays, warm_start=banks.get(pid))
        if result.warm_start.size:
            banks[pid] = result.warm_start
        replies.append(Reply(node_id=pid, partition_id=pid, arrays=result.arrays, metrics=dict(result.metrics)))
    return report, replies


def bare_loop(scenario: Scenario, out_dir: str | Path, *, name: str = "scenario") -> dict:
    """Run every round of ``scenario`` sequentially; write the run's files to ``out_dir``; return the summary."""
    if scenario.fusion.rule not in SUPPORTED_RULES:
        raise SystemExit(f"bare_loop: fusion rule {scenario.fusion.rule!r} not supported ({', '.join(SUPPORTED_RULES)})")
    out_dir = Path(out_dir)
    devices = fleet.build_fleet(scenario)
    t, f = scenario.training, scenario.fusion
    banks: dict[int, object] = {}
    with RunRecorder(scenario, out_dir, name=name) as recorder, \
            open(out_dir / "clients.jsonl", "w", encoding="utf-8") as log:
        global_arrays = model_arrays(recorder.model)
        recorder.initial_model(global_arrays)
        for server_round in range(1, t.rounds + 1):
            warm_before = set(banks)
            report, replies = train_round(scenario, server_round, global_arrays, banks, devices)
            for reply in replies:
                log.write(json.dumps({"round": server_round, "partition_id": reply.partition_id,
                                      "had_warm_start": reply.partition_id in warm_before and t.warm_start,
                                      **reply.metrics}) + "\n")
            accepted = screen_replies(replies, report, reference=global_arrays, deadline_s=t.deadline_s,
                                      max_norm_ratio=f.max_norm_ratio)
            close_round(report, accepted, t.deadline_s)
            if accepted:
                weights = fusion_weights(scenario, accepted)
                global_arrays = fusion.weighted_average([r.arrays for r in accepted], weights)
                total = float(sum(weights))
                report.fusion_weights = {r.partition_id: float(w) / total for r, w in zip(accepted, weights)}
            recorder.record_round(server_round, global_arrays, report)
        return recorder.finish()


def main(argv: list[str] | None = None) -> int:
    """Command line: SCENARIO --out DIR [--set k=v ...]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    summary = bare_loop(load_scenario(args.scenario, args.overrides), args.out, name=Path(args.scenario).stem)
    print(json.dumps({"final_accuracy": summary["final_accuracy"], "wall_s": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
