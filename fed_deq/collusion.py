"""The colluders' side channel: where ALIE and IPM adversaries pool their honest updates of a round.

Colluding attacks (fed_deq/adversary.py, stage ``collude``) need each other's updates, which real colluders
would exchange over a network of their own. The simulator stands in for it here, in the round loop between
the exchange and the server's screening (``rounds.run_rounds``), so every runner — Flower + Ray, the bare
loop, a deployment — mounts them the same way. The channel reads only the replies of the colluders
themselves, decoded as the server would decode them; an honest client's reply is never read, and the server's
screening sees nothing but the rewritten replies, as it would from real colluders.

Each colluder trained honestly and sent its honest model. The channel groups colluders by attack and
parameter, computes the group's one malicious update from the members that replied with a readable model,
and rewrites each member's reply: model = global + malicious update, encoded like any upload, and the two
validation claims (``val-accuracy``, ``val-rel-residual``) re-measured on the colluder's own validation split
by the very call the client makes, so the claims agree with the model as a careful attacker's would. A
member whose reply cannot be read (an error, a broken upload) is left as it is, for the server to judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fed_deq import adversary, quantize, workload
from fed_deq.round_data import OpenRound, Reply
from fed_deq.scenario import Scenario


def colluders(scenario: Scenario) -> dict[int, tuple[str, float | None]]:
    """Partition id → (attack, parameter) for every planted colluder of the scenario."""
    return {pid: (entry.attack, adversary.parameter_value(scenario, pid, entry.attack))
            for pid, entry in adversary.planted(scenario).items()
            if adversary.ATTACKS[entry.attack].stage == "collude"}


def side_channel(scenario: Scenario) -> SideChannel | None:
    """The scenario's side channel, or None when it plants no colluders (nothing to do, nothing built)."""
    if not scenario.adversaries:
        return None
    channel = SideChannel(scenario)
    return channel if channel.members else None


class SideChannel:
    """The colluders of one scenario; ``rewrite`` mounts their attack on a round's replies."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.members = colluders(scenario)
        self._model = None  # built on first use: the colluders' own copy of the model, for their claims

    def rewrite(self, open_round: OpenRound, replies: Sequence[Reply]) -> list[Reply]:
        """The round's replies with every readable colluder's reply replaced by its group's attack."""
        out = list(replies)
        groups: dict[tuple[str, float | None], list[int]] = {}
        for index, reply in enumerate(out):
            if reply.partition_id in self.members and reply.partition_id in open_round.instructions \
                    and reply.error is None and reply.arrays is not None:
                groups.setdefault(self.members[reply.partition_id], []).append(index)
        for (attack, value), indices in groups.items():
            for index, reply in self._mount(open_round, attack, value, [out[i] for i in indices]).items():
                out[indices[index]] = reply
        return out

    def _mount(self, open_round: OpenRound, attack: str, value: float | None,
               group: list[Reply]) -> dict[int, Reply]:
        """Position in ``group`` → rewritten reply, for the members whose upload could be read."""
        encoding, reference = self.scenario.training.upload, open_round.reference
        readable: dict[int, dict[str, np.ndarray]] = {}
        for position, reply in enumerate(group):
            try:
                arrays = quantize.decode(reply.arrays, encoding, reference)
            except Exception:  # noqa: BLE001 - a broken upload stays as it is: the server rejects it
                continue
            if set(arrays) == set(reference) and all(np.shape(arrays[k]) == np.shape(reference[k])
                                                     for k in reference):
                readable[position] = arrays
        if not readable:
            return {}
        updates = [adversary.update_of(arrays, reference) for arrays in readable.values()]
        malicious = adversary.collude(attack, value, updates, round_clients=len(open_round.instructions))
        wire = quantize.encode(adversary.with_update(reference, malicious, reference), encoding)
        sent = quantize.decode(wire, encoding, reference)
        return {position: self._with_claims(group[position], open_round, wire, sent) for position in readable}

    def _with_claims(self, reply: Reply, open_round: OpenRound, wire, sent) -> Reply:
        """``reply`` carrying ``wire``, its validation claims re-measured on ``sent`` (the decoded model)."""
        pid = reply.partition_id
        if self._model is None:
            self._model = workload.build_scenario_model(self.scenario, workload.scenario_data(self.scenario))
        workload.load_arrays(self._model, sent)
        val = workload.validate(self.scenario, self._model, workload.client_partition(self.scenario, pid),
                                open_round.instructions[pid].budget)
        metrics = dict(reply.metrics or {})
        metrics["val-accuracy"] = float(val.accuracy) if val.num_examples else 0.0
        metrics["val-rel-residual"] = float(val.rel_residual)
        return replace(reply, arrays=dict(wire), metrics=metrics)
