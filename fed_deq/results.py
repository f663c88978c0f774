"""Run records and report: metrics.jsonl, summary.json, scenario.yaml and accuracy.png.

A round record is a JSON object with at least ``round`` (int), ``accuracy`` (float or null) and
``sim_time_s`` (CUMULATIVE simulated seconds since the start of the run, non-decreasing), optionally
``accuracy_by_tier`` (tier name → accuracy) and anything else the runner wants to keep. NaN and ±inf are
written as ``null`` so every file is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fed_deq.errors import InputError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SCENARIO_FILE = "scenario.yaml"
#: The last recorded global model of a run, as numpy arrays keyed by state-dict name (``fed-deq attack-eval``).
MODEL_FILE = "model.npz"
#: The accuracy a summary's ``sim_time_to_target_s`` and ``bytes_to_target`` are measured to.
DEFAULT_TARGET = 0.8


def to_json_safe(value):
    """Convert ``value`` to plain JSON types: numpy scalars/arrays to Python, NaN/±inf to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"results: cannot write a {type(value).__name__} value to JSON")


def _dumps(value, **kwargs) -> str:
    return json.dumps(to_json_safe(value), allow_nan=False, **kwargs)


class MetricsWriter:
    """Writes one JSON line per round to ``out_dir/metrics.jsonl``, durable as soon as it is written.

    Use as a context manager; entering starts a fresh file (creating ``out_dir`` if needed).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / METRICS_FILE
        self._file = None

    def __enter__(self) -> "MetricsWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_round(self, record: Mapping) -> None:
        """Append ``record`` as one JSON line, then flush and fsync so an interrupted run keeps it."""
        if self._file is None:
            raise RuntimeError("MetricsWriter.write_round called outside its with-block")
        if not isinstance(record, Mapping):
            raise InputError(f"results: a round record must be a dict, got {type(record).__name__}")
        self._file.write(_dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` to ``path`` all at once or not at all; returns the path.

    ``content`` is text (written as UTF-8), bytes, or a function that writes into the binary file handle it is
    given (e.g. ``lambda handle: figure.savefig(handle, format="png")``). The data goes to a temporary file in
    the same folder, which is then renamed over ``path``, so a reader never sees half a file and an interrupted
    write leaves the previous file as it was.
    """
    path = Path(path)
    if isinstance(content, str):
        content = content.encode("utf-8")
    write = (lambda handle, data=content: handle.write(data)) if isinstance(content, bytes) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_summary(out_dir: str | os.PathLike, summary: Mapping) -> Path:
    """Atomically write ``summary`` to ``out_dir/summary.json``; returns the path."""
    path = Path(out_dir) / SUMMARY_FILE
    text = _dumps(summary, indent=2) + "\n"
    return write_atomic(path, text)


def write_scenario(out_dir: str | os.PathLike, yaml_text: str) -> Path:
    """Atomically write the resolved scenario YAML to ``out_dir/scenario.yaml``; returns the path."""
    if not isinstance(yaml_text, str):
        raise InputError(f"results: scenario text must be a string, got {type(yaml_text).__name__}")
    path = Path(out_dir) / SCENARIO_FILE
    return write_atomic(path, yaml_text)


def write_model(out_dir: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Atomically write a global model to ``out_dir/model.npz`` (uncompressed numpy arrays); returns the path."""
    return write_atomic(Path(out_dir) / MODEL_FILE, lambda handle: np.savez(handle, **dict(arrays)))


def read_model(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The global model a run saved (``run_dir/model.npz``); InputError naming the file if it is missing or
    unreadable."""
    path = Path(run_dir) / MODEL_FILE
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no saved model (runs save model.npz when they finish)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable model file ({exc})") from None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Round records from a metrics.jsonl file (or a run directory holding one).

    A torn last line (the run was killed mid-write) is dropped; a bad line anywhere else is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such metrics file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return records


# ---------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------


def _accuracy(record: Mapping) -> float | None:
    value = record.get("accuracy")
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _sim_times(metrics: Sequence[Mapping]) -> list[float]:
    times = []
    for index, record in enumerate(metrics):
        value = record.get("sim_time_s")
        if value is None or not math.isfinite(float(value)):
            raise InputError(f"metrics record {index}: sim_time_s must be a finite number, got {value!r}")
        if times and float(value) < times[-1]:
            raise InputError(f"metrics record {index}: sim_time_s must be cumulative (non-decreasing), "
                             f"got {value} after {times[-1]}")
        times.append(float(value))
    return times


def summarise(metrics: Sequence[Mapping], *, scenario_name: str, fusion_rule: str, wall_time_s: float,
              target: float = DEFAULT_TARGET) -> dict:
    """Run summary: final and best accuracy, rounds, wall and simulated time, scenario and fusion rule, bytes on
    the wire (sums of the rows' ``bytes_down`` / ``bytes_up``), and the time and bytes it took to reach ``target``."""
    accuracies = [a for a in (_accuracy(r) for r in metrics) if a is not None]
    times = _sim_times(metrics)
    down, up = (sum(int(r.get(key) or 0) for r in metrics) for key in ("bytes_down", "bytes_up"))
    return {
        "scenario": scenario_name,
        "fusion_rule": fusion_rule,
        "rounds": len(metrics),
        "final_accuracy": _accuracy(metrics[-1]) if metrics else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "wall_time_s": float(wall_time_s),
        "sim_time_s": times[-1] if times else 0.0,
        "total_bytes_down": down,
        "total_bytes_up": up,
        "total_bytes": down + up,
        "target_accuracy": target,
        "sim_time_to_target_s": time_to_target(metrics, target),
        "bytes_to_target": bytes_to_target(metrics, target),
    }


def time_to_target(metrics: Sequence[Mapping], target: float) -> float | None:
    """First cumulative simulated time at which accuracy reaches ``target``, or ``None`` if it never does."""
    for record, time_s in zip(metrics, _sim_times(metrics)):
        accuracy = _accuracy(record)
        if accuracy is not None and accuracy >= target:
            return time_s
    return None


def bytes_to_target(metrics: Sequence[Mapping], target: float) -> int | None:
    """Bytes on the wire (down + up, through that round) when accuracy first reaches ``target``, or ``None``.

    Reads each record's ``cumulative_bytes``; a record without one adds its ``bytes_down`` + ``bytes_up``
    (missing: 0) to the running total.
    """
    total = 0
    for record in metrics:
        if record.get("cumulative_bytes") is not None:
            total = int(record["cumulative_bytes"])
        else:
            total += int(record.get("bytes_down") or 0) + int(record.get("bytes_up") or 0)
        accuracy = _accuracy(record)
        if accuracy is not None and accuracy >= target:
            return total
    return None


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------


def plot_accuracy(metrics: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Save a PNG with accuracy vs round and vs cumulative simulated time; per-tier curves as thin lines."""
    # Figure + Agg canvas directly: no pyplot, so no global figure registry and no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        raise InputError("plot_accuracy: no rounds to plot")
    rounds = [int(r.get("round", i + 1)) for i, r in enumerate(metrics)]
    times = _sim_times(metrics)
    curves = {"global model, eval budget": [_nan_if_none(_accuracy(r)) for r in metrics]}
    for tier in _tiers(metrics):
        curves[tier] = [_nan_if_none(_accuracy({"accuracy": (r.get("accuracy_by_tier") or {}).get(tier)}))
                        for r in metrics]
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, xs, xlabel in ((axes[0], rounds, "round"), (axes[1], times, "simulated time (s)")):
        for name, ys in curves.items():
            overall = name == "global model, eval budget"
            ax.plot(xs, ys, marker="o" if overall else None, linewidth=2.2 if overall else 0.9,
                    alpha=1.0 if overall else 0.75, label=name if overall else f"at {name} budget")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    out = Path(path)
    write_atomic(out, lambda handle: figure.savefig(handle, format="png"))
    return out


def _tiers(metrics: Sequence[Mapping]) -> list[str]:
    names: dict[str, None] = {}
    for record in metrics:
        names.update(dict.fromkeys(record.get("accuracy_by_tier") or {}))
    return list(names)


def _nan_if_none(value: float | None) -> float:
    # NaN breaks the line in matplotlib, which is how a missing evaluation should look.
    return math.nan if value is None else value
