"""The server's side of a federated round, without Flower: one driver every runner calls.

    plan (who is sampled, what budget each gets) → instructions → replies → screened report → weights
    → fused model → clock

:class:`RoundDriver` holds what the server knows from the scenario (each partition's size, tier, assigned
budget, local step count and the most solver work that budget allows) and never takes a client's word for
any of it. A reply is accepted only if it is well formed, its claims agree with those facts (tolerances
below), the server's own re-evaluation of its model on the client's validation split agrees with what it
reports, the server's clock puts it inside the deadline, and its update norm is not an outlier. Fusion
weights come from server-known sizes and server-measured scores only. Anything that raises while one reply
is screened rejects that reply; if fusing fails, the round keeps the previous global model. No client
input can end a run.

:func:`run_rounds` is the run loop: it owns the global model and passes each round's report to the
recorder. The Flower ServerApp (server/federation.py) and the bare loop (benchmarks/bare_loop.py) differ
only in the ``exchange`` function that carries instructions to clients and replies back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fed_deq import adversary, collusion, fleet, fusion, screening, workload
from fed_deq.audit import Auditor
from fed_deq.round_data import Arrays, Instruction, OpenRound, Reply, RoundReport  # noqa: F401 - re-exported
from fed_deq.rules import FUSION_RULES, FusionInputs
from fed_deq.scenario import Scenario
from fed_deq.screening import ClientFacts, Dropped, Rejected

#: A robust aggregation rule provided by an adapter (Flower's FedMedian, FedTrimmedAvg, Krum):
#: (server round, reference arrays, client arrays, server-known sizes) -> fused arrays.
Fuser = Callable[[int, Arrays, list[Arrays], np.ndarray], Arrays]


@dataclass
class _Checked:
    """A reply that passed the per-reply checks, with what the server measured about it."""

    reply: Reply
    facts: ClientFacts
    sim_time_s: float
    val_accuracy: float
    val_residual: float


class DerivedFacts(Mapping[int, ClientFacts]):
    """partition id -> ClientFacts, each derived the first time it is asked for, then kept.

    A round needs the facts of its sampled clients only; deriving all of them up front cost a 10,000-client
    fleet 5–8 s before its first round (a budget and a validation split per client, most never sampled).
    Iterating (``values()``, ``items()``) derives every one.
    """

    def __init__(self, derive: Callable[[int], ClientFacts], partition_ids: Sequence[int]) -> None:
        self._derive = derive
        self._ids = list(partition_ids)
        self._known_ids = set(self._ids)
        self._facts: dict[int, ClientFacts] = {}

    def __getitem__(self, partition_id: int) -> ClientFacts:
        if partition_id not in self._facts:
            if partition_id not in self._known_ids:
                raise KeyError(partition_id)
            self._facts[partition_id] = self._derive(partition_id)
        return self._facts[partition_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class RoundDriver:
    """The server's round logic for one scenario; see the module docstring."""

    def __init__(self, scenario: Scenario, *, robust_fuser: Fuser | None = None) -> None:
        self.scenario = scenario
        self.devices = fleet.build_fleet(scenario)
        self.auditor = Auditor(scenario)
        self.adversaries = adversary.assign(scenario)
        by_id = {d.partition_id: d for d in self.devices}
        self.facts = DerivedFacts(lambda pid: self._derive_facts(by_id[pid]), list(by_id))
        if FUSION_RULES[scenario.fusion.rule].adapter is not None and robust_fuser is None:
            raise ValueError(f"fusion rule {scenario.fusion.rule!r} needs a robust_fuser from an adapter")
        self.robust_fuser = robust_fuser

    # --- facts and plan ---------------------------------------------------------------------------------

    def _derive_facts(self, device: fleet.Device) -> ClientFacts:
        t = self.scenario.training
        local = self.auditor.local(device.partition_id)
        n = len(local.y_train)
        budget = workload.plan_client_budget(self.scenario, device, self.auditor.model, n)
        return ClientFacts(
            partition_id=device.partition_id, tier=device.tier, num_examples=n, num_val=len(local.y_val),
            local_steps=fleet.local_steps(n, t.batch_size, t.local_epochs), budget=budget,
            budget_share=workload.budget_share(self.scenario, budget),
            max_work=workload.client_max_work(self.scenario, n, budget),
        )

    def initial_arrays(self) -> Arrays:
        """The scenario's starting global model (seeded)."""
        return workload.model_arrays(workload.build_scenario_model(self.scenario, self.auditor.bundle))

    def open_round(self, server_round: int, global_arrays: Arrays) -> OpenRound:
        """Sample the round's clients with the scenario's generators and write each one's instruction.

        Clients the simulation drops out, and silent adversaries, get no instruction: they are recorded as
        dropped and keep the round waiting until its deadline.
        """
        plan = fleet.plan_round(self.devices, seed=self.scenario.seed, round=server_round,
                                clients_per_round=self.scenario.training.clients_per_round)
        report = RoundReport(server_round=server_round, sampled=list(plan.sampled),
                             unavailable=len(self.devices) - len(plan.available))
        f = self.scenario.fusion
        mu = f.proximal_mu if FUSION_RULES[f.rule].proximal else 0.0
        instructions = {}
        for pid in plan.sampled:
            if pid in plan.dropped_out:
                report.dropped[pid] = "dropped out mid-round"
            elif self.adversaries.get(pid) == "silent":
                report.dropped[pid] = "no reply by the deadline"
            else:
                instructions[pid] = Instruction(partition_id=pid, budget=self.facts[pid].budget, proximal_mu=mu)
        return OpenRound(server_round=server_round, reference=dict(global_arrays), report=report,
                         instructions=instructions)

    # --- closing a round ----------------------------------------------------------------------------------

    def close_round(self, open_round: OpenRound, replies: Sequence[Reply],
                    offline: Sequence[int] = ()) -> tuple[Arrays, RoundReport]:
        """Screen the replies, fuse the accepted ones and run the clock; returns the new global model."""
        report = open_round.report
        for pid in offline:
            report.dropped[pid] = "node offline"
        report.bytes_down = open_round.bytes_down * len(set(open_round.instructions) - set(offline))
        candidates = self._check_each(open_round, replies)
        heard = {r.partition_id for r in replies} | set(offline)
        for pid in sorted(set(open_round.instructions) - heard):
            report.dropped[pid] = "no reply before the round timeout"
        accepted = self._screen_norms(open_round, candidates)
        probe_losses: dict[int, float] = {}
        if self._uses_probe():
            accepted, probe_losses = self._probe(open_round, accepted)
        report.accepted = sorted(c.facts.partition_id for c in accepted)
        self._close_clock(report, accepted)
        arrays = open_round.reference
        if accepted:
            try:
                arrays = self._fuse(open_round, accepted, probe_losses)
            except Exception as exc:  # noqa: BLE001 - a round that cannot be fused keeps the last model
                report.fusion_weights, report.previous_model_weight = {}, 1.0
                report.fusion_error = f"{type(exc).__name__}: {exc}"
                arrays = open_round.reference
        return arrays, report

    def _check_each(self, open_round: OpenRound, replies: Sequence[Reply]) -> list[_Checked]:
        report, seen, checked = open_round.report, set(), []
        for reply in replies:
            report.bytes_up += workload.arrays_nbytes(reply.arrays or {})
            label = reply.partition_id if reply.partition_id is not None else reply.node_id
            if reply.error is not None:
                report.failed[label] = f"client raised: {reply.error}"
                continue
            try:
                if label in seen:
                    raise Rejected("a second reply for this partition")
                seen.add(label)
                checked.append(self._check(open_round, reply))
            except Rejected as exc:
                report.rejected[label] = str(exc)
            except Dropped as exc:
                report.dropped[label] = str(exc)
            except Exception as exc:  # noqa: BLE001 - whatever a reply does, it only loses its own place
                report.rejected[label] = f"screening failed: {type(exc).__name__}: {exc}"
        return checked

    def _check(self, open_round: OpenRound, reply: Reply) -> _Checked:
        """Every per-reply check, cheapest first; raises Rejected or Dropped with the reason."""
        pid = screening.check_sender(reply.problem, reply.partition_id, reply.node_id, open_round.instructions)
        bytes_up = workload.arrays_nbytes(reply.arrays or {})  # as it crossed the wire, before decoding
        reply = replace(reply, arrays=screening.decode_upload(reply.arrays, self.scenario.training.upload,
                                                              open_round.reference))
        screening.check_payload(reply.arrays, reply.metrics, open_round.reference)
        metrics, facts = reply.metrics, self.facts[pid]
        screening.check_identity(metrics, open_round.server_round, pid)
        screening.check_ranges(metrics, facts)
        screening.check_claims(metrics, facts)
        sim_time = self._server_time(open_round, reply, facts, bytes_up)
        screening.check_time(float(metrics["sim-time-s"]), sim_time)
        deadline = self.scenario.training.deadline_s
        if sim_time > deadline:
            open_round.report.client_sim_time_s[pid] = sim_time
            raise Dropped(f"straggler: {sim_time:.2f}s > deadline {deadline:g}s (server's clock)")
        val = self.auditor.validation(reply.arrays, pid, facts.budget)
        screening.check_validation(metrics, val, facts)
        open_round.report.client_sim_time_s[pid] = sim_time
        return _Checked(reply=reply, facts=facts, sim_time_s=sim_time,
                        val_accuracy=float(val.accuracy) if val.num_examples else 0.0,
                        val_residual=float(val.rel_residual))

    def _server_time(self, open_round: OpenRound, reply: Reply, facts: ClientFacts, bytes_up: int) -> float:
        """The server's clock for a reply: the work it reports (bounded by the budget, checked before) on its
        device, with the scenario's straggler draw, plus the bytes really sent and received."""
        m = reply.metrics
        work = fleet.WorkCounts(solve_evals=m["work-solve-evals"], grad_evals=m["work-grad-evals"],
                                vjp_evals=m["work-vjp-evals"], samples=m["work-samples"],
                                norm_calls=m["work-norm-calls"], solver_steps=m["work-solver-steps"])
        compute_s, comm_s = workload.round_clock(
            self.scenario, self.devices[facts.partition_id], self.auditor.model, work,
            server_round=open_round.server_round, bytes_down=open_round.bytes_down,
            bytes_up=bytes_up)
        return compute_s + comm_s

    def _screen_norms(self, open_round: OpenRound, checked: list[_Checked]) -> list[_Checked]:
        """Reject updates whose norm is far above the round's median (fusion.max_norm_ratio)."""
        ratio = self.scenario.fusion.max_norm_ratio
        norms = np.array([fusion.update_norm(c.reply.arrays, open_round.reference) for c in checked])
        outliers = fusion.norm_outliers(norms, ratio) if checked else np.zeros(0, bool)
        kept = []
        for item, norm, outlier in zip(checked, norms, outliers):
            if outlier:
                open_round.report.rejected[item.facts.partition_id] = (
                    f"update norm {norm:.3g} > {ratio:g}x round median")
                open_round.report.client_sim_time_s.pop(item.facts.partition_id, None)
            else:
                kept.append(item)
        return sorted(kept, key=lambda c: c.facts.partition_id)

    def _uses_probe(self) -> bool:
        f = self.scenario.fusion
        return FUSION_RULES[f.rule].scored and f.score == "probe"

    def _probe(self, open_round: OpenRound, accepted: list[_Checked]) -> tuple[list[_Checked], dict[int, float]]:
        """Score each accepted model on the probe set; record the cost (wall seconds, FLOPs) in the report."""
        kept, losses, wall, flops, residuals, accuracies = [], {}, 0.0, 0.0, [], []
        for item in accepted:
            pid = item.facts.partition_id
            try:
                result = self.auditor.probe(item.reply.arrays)
            except Exception as exc:  # noqa: BLE001 - a model the server cannot evaluate is not fused
                open_round.report.rejected[pid] = f"probe evaluation failed: {type(exc).__name__}: {exc}"
                continue
            wall, flops = wall + result.wall_s, flops + result.flops
            losses[pid] = result.loss
            residuals.append(result.rel_residual)
            accuracies.append(result.accuracy)
            kept.append(item)
        open_round.report.probe = {
            "clients": len(losses), "samples": self.auditor.probe_size(), "wall_s": wall, "flops": flops,
            "mean_loss": float(np.mean(list(losses.values()))) if losses else None,
            "mean_accuracy": float(np.mean(accuracies)) if accuracies else None,
            "mean_rel_residual": float(np.mean(residuals)) if residuals else None,
        }
        return kept, losses

    def _close_clock(self, report: RoundReport, accepted: list[_Checked]) -> None:
        """The round lasts as long as its slowest accepted client, or the deadline if anyone is missing."""
        deadline = self.scenario.training.deadline_s
        times = [c.sim_time_s for c in accepted] + [math.inf] * len(report.dropped)
        _, report.round_sim_time_s = fleet.round_time(times, deadline)
        if accepted:
            report.mean_iterations = float(np.mean(
                [c.reply.metrics["forward-iterations"] + c.reply.metrics["backward-iterations"] for c in accepted]))
            report.mean_rel_residual = float(np.mean([c.reply.metrics["rel-residual"] for c in accepted]))

    # --- fusion --------------------------------------------------------------------------------------------

    def _fuse(self, open_round: OpenRound, accepted: list[_Checked], probe_losses: dict[int, float]) -> Arrays:
        """The fusion rule of the scenario on the accepted replies; weights from server-known facts only."""
        f, report = self.scenario.fusion, open_round.report
        rule = FUSION_RULES[f.rule]
        pids = [c.facts.partition_id for c in accepted]
        arrays = [c.reply.arrays for c in accepted]
        sizes = np.array([c.facts.num_examples for c in accepted], dtype=np.float64)
        if rule.adapter is not None:
            # Coordinate-wise rules pick values, not clients: no per-client weight to report.
            fused = self.robust_fuser(open_round.server_round, open_round.reference, arrays, sizes)
            screening.check_fused(fused, open_round.reference)
            return fused
        scores = self.quality_scores(accepted, probe_losses) if rule.scored else None
        if scores is not None:
            report.scores = dict(zip(pids, map(float, scores)))
        result = rule.fuse(FusionInputs(reference=open_round.reference, arrays=arrays, sizes=sizes,
                                        local_steps=[c.facts.local_steps for c in accepted], scores=scores,
                                        fusion=f, training=self.scenario.training,
                                        tiers=tuple(c.facts.tier for c in accepted)))
        screening.check_fused(result.arrays, open_round.reference)
        report.fusion_weights = dict(zip(pids, map(float, result.weights)))
        report.previous_model_weight = result.previous_model_weight
        return result.arrays

    def quality_scores(self, accepted: list[_Checked], probe_losses: dict[int, float]) -> np.ndarray:
        """Quality in [0, 1] per accepted reply, from numbers the server derived or measured itself."""
        f = self.scenario.fusion
        probe = probe_losses
        return fusion.quality_scores(
            f.score,
            budget_share=[c.facts.budget_share for c in accepted],
            rel_residual=[c.val_residual for c in accepted],
            val_accuracy=[c.val_accuracy for c in accepted],
            probe_loss=[probe.get(c.facts.partition_id, math.inf) for c in accepted] if f.score == "probe" else None,
            beta=f.beta,
        )


# --- the run loop --------------------------------------------------------------------------------------------

#: Carries a round's instructions to the clients; returns their replies and the partitions found offline.
Exchange = Callable[[OpenRound], tuple[list[Reply], list[int]]]


def run_rounds(driver: RoundDriver, recorder, exchange: Exchange,
               stop_requested: Callable[[], bool] | None = None) -> Arrays:
    """Every round of the scenario: open, exchange, close, record. Returns the last recorded global model.

    The loop owns the global model; ``recorder`` (fed_deq.recorder.RunRecorder) only evaluates and writes.
    Once ``stop_requested()`` is true (the user pressed Ctrl-C) the loop ends: a round whose exchange was cut
    short is neither fused nor recorded, so metrics.jsonl holds finished rounds only.
    """
    stopped = stop_requested or (lambda: False)
    # The colluders' network (ALIE, IPM), between the clients and the server's screening: fed_deq/collusion.py.
    side_channel = collusion.side_channel(driver.scenario)
    arrays = driver.initial_arrays()
    recorder.initial_model(arrays)
    for server_round in range(1, driver.scenario.training.rounds + 1):
        if stopped():
            break
        open_round = driver.open_round(server_round, arrays)
        replies, offline = exchange(open_round)
        if stopped():
            break
        if side_channel is not None:
            replies = side_channel.rewrite(open_round, replies)
        arrays, report = driver.close_round(open_round, replies, offline)
        recorder.record_round(server_round, arrays, report)
    return arrays
