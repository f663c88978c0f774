"""The fleet layer shared by every fed-deq strategy: seeded sampling, per-client messages, reply screening.

A strategy is ``FleetMixin`` + a Flower Message-API strategy; algorithms differ only in :meth:`fuse`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fed_deq import fleet
from fed_deq.rounds import Reply, RoundReport, close_round, screen_replies
from fed_deq.scenario import Scenario
from server.records import from_array_record, to_reply


@dataclass(frozen=True)
class FleetBinding:
    """What a strategy needs to know about the run: the scenario, its devices and who is who."""

    scenario: Scenario
    scenario_text: str            # resolved YAML, sent to clients so nodes need no scenario file
    devices: list[fleet.Device]
    partitions: dict[int, int]    # Flower node id → partition id (learnt by discovery)

    @property
    def nodes(self) -> dict[int, int]:
        """Partition id → Flower node id."""
        return {pid: node for node, pid in self.partitions.items()}


class FleetMixin:
    """Mix in before a Flower strategy class; call :meth:`bind` before ``start``."""

    binding: FleetBinding
    #: Reports of finished rounds, by round (read by the server's round recorder).
    reports: dict[int, RoundReport]
    #: Whether fusion weights are n_k / Σn (FedAvg-like); robust rules report none.
    weights_by_examples = False

    def bind(self, binding: FleetBinding) -> None:
        """Attach the run's fleet to this strategy."""
        self.binding = binding
        self.reports = {}
        self._reference: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample this round's clients with the scenario's generators and give each its own message."""
        b = self.binding
        plan = fleet.plan_round(b.devices, seed=b.scenario.seed, round=server_round,
                                clients_per_round=b.scenario.training.clients_per_round)
        report = RoundReport(server_round=server_round, sampled=list(plan.sampled),
                             unavailable=len(b.devices) - len(plan.available))
        self.reports[server_round] = report
        self._reference = from_array_record(arrays)
        live, nodes = set(grid.get_node_ids()), b.nodes
        messages = []
        for pid in plan.sampled:
            if pid in plan.dropped_out:
                report.dropped[pid] = "dropped out mid-round"
            elif nodes.get(pid) not in live:
                report.dropped[pid] = "node offline"
            else:
                messages.append(self._train_message(server_round, arrays, config, nodes[pid]))
        self._messaged = {pid for pid in plan.sampled if pid not in report.dropped}
        self._sent = messages  # the Grid fills in their message ids when it pushes them
        return messages

    def _train_message(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       node_id: int) -> Message:
        """One client's message; its own RecordDict, since Flower shares one across messages otherwise."""
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["scenario"] = self.binding.scenario_text
        cfg["proximal-mu"] = float(getattr(self, "proximal_mu", 0.0))
        return Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node_id,
                       message_type=MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, then fuse the accepted ones; one bad reply never ends the run."""
        report = self.reports[server_round]
        messages = list(replies)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in getattr(self, "_sent", []) if m.metadata.message_id}
        parsed = [to_reply(m, self.binding.partitions, sent_to) for m in messages]
        by_node = {r.node_id: m for r, m in zip(parsed, messages)}
        t, f = self.binding.scenario.training, self.binding.scenario.fusion
        accepted = screen_replies(parsed, report, reference=self._reference, deadline_s=t.deadline_s,
                                  max_norm_ratio=f.max_norm_ratio)
        heard = {r.partition_id for r in parsed}
        for pid in sorted(getattr(self, "_messaged", set()) - heard):
            report.dropped[pid] = "no reply before the round timeout"
        close_round(report, accepted, t.deadline_s)
        if not accepted:
            return None, None
        arrays, metrics, weights = self.fuse(server_round, accepted, [by_node[r.node_id] for r in accepted])
        report.fusion_weights = weights
        return arrays, metrics

    def fuse(self, server_round: int, accepted: list[Reply],
             messages: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, dict[int, float]]:
        """Aggregate screened replies; by default Flower's own rule of the parent strategy."""
        arrays, metrics = super().aggregate_train(server_round, messages)  # type: ignore[misc]
        weights: dict[int, float] = {}
        if self.weights_by_examples:
            total = sum(r.metrics["num-examples"] for r in accepted)
            weights = {r.partition_id: r.metrics["num-examples"] / total for r in accepted}
        return arrays, metrics, weights
