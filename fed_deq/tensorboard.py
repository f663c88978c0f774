"""TensorBoard scalars of a run (``--tensorboard`` on simulate, compare and tune; ``tensorboard=true`` in a
``flwr run`` run config), written under the run folder's ``tb/``.

The recorder hands every finished round's metrics.jsonl record to :class:`ScalarWriter`, which writes the
scalars below at step = round number and flushes at once, so an interrupted run keeps what it wrote. Missing
or non-finite values (a round nobody evaluated) are left out rather than drawn as zeros. Open with
``tensorboard --logdir DIR/tb`` (several runs: ``--logdir runs``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

#: The folder inside a run's output folder.
TB_DIR = "tb"
#: metrics.jsonl key → TensorBoard tag, written every round when present.
SCALARS: Mapping[str, str] = MappingProxyType({
    "accuracy": "accuracy/test",
    "server_val_accuracy": "accuracy/server_validation",
    "loss": "loss/test",
    "bytes_down": "bytes/round_down",
    "bytes_up": "bytes/round_up",
    "cumulative_bytes": "bytes/cumulative",
    "mean_iterations": "iterations/mean_client",
    "eval_iterations": "iterations/eval",
    "sim_time_s": "time/sim_s",
    "round_sim_time_s": "time/round_sim_s",
    "clients_completed": "clients/completed",
})
#: The names TensorBoard gives its event files.
EVENT_FILES = "events.out.tfevents.*"
#: Tag prefix of the accuracy at each tier's own budget (``accuracy_by_tier/<tier>``).
TIER_PREFIX = "accuracy_by_tier/"


class ScalarWriter:
    """One run's TensorBoard event file; ``close`` may be called more than once.

    Event files of an earlier run in ``log_dir`` are removed first, as metrics.jsonl is started afresh:
    TensorBoard would otherwise draw both runs as one.
    """

    def __init__(self, log_dir: str | Path) -> None:
        # Imported here: only runs asked for TensorBoard pay for importing it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        for stale in self.log_dir.glob(EVENT_FILES):
            stale.unlink()
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(self.log_dir))

    def write_round(self, record: Mapping) -> None:
        """Write a round record's scalars (see SCALARS and TIER_PREFIX) at step = its round, then flush."""
        if self._writer is None:
            raise RuntimeError("ScalarWriter.write_round after close")
        step = int(record["round"])
        for key, tag in SCALARS.items():
            self._add(tag, record.get(key), step)
        for tier, accuracy in (record.get("accuracy_by_tier") or {}).items():
            self._add(TIER_PREFIX + str(tier), accuracy, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _add(self, tag: str, value, step: int) -> None:
        if _finite(value):
            self._writer.add_scalar(tag, float(value), global_step=step)


def scalar_tags(record: Mapping) -> list[str]:
    """The tags :meth:`ScalarWriter.write_round` writes for ``record`` (what a reader of ``DIR/tb`` finds)."""
    tags = [tag for key, tag in SCALARS.items() if _finite(record.get(key))]
    return tags + [TIER_PREFIX + str(t) for t, a in (record.get("accuracy_by_tier") or {}).items() if _finite(a)]


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
