"""Text of the fleet section of docs/benchmarks.md and the terminal summary, from results.json data."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmarks.schema import FIGURES


def read_csv(path: Path) -> list[dict]:
    """compare.csv rows with numbers parsed (empty cells → None)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: (v if k == "rule" else (float(v) if v != "" else None)) for k, v in row.items()})
    return rows


def _value(fig: dict) -> str:
    if fig.get("value") is None:
        return "missing"
    unit = fig["unit"]
    if unit == "s":
        return f"{fig['value']:.3f} s" if abs(fig["value"]) < 1 else f"{fig['value']:.2f} s"
    return f"{fig['value']:.2f} GiB" if unit == "GiB" else f"{fig['value']:.2f}×"


def _verdict(fig: dict) -> str:
    if fig.get("value") is None:
        return "—"
    if fig.get("met") is None:
        return "(no goal)"
    return "met" if fig["met"] else "**missed**"


def figures_table(data: dict) -> str:
    """Markdown table: figure, value, goal, verdict."""
    lines = ["| figure | value | goal | |", "|---|---:|---:|---|"]
    for name in FIGURES:
        fig = data["figures"][name]
        lines.append(f"| `{name}` | {_value(fig)} | {fig.get('goal') or '—'} | {_verdict(fig)} |")
    return "\n".join(lines)


def commands_list(data: dict) -> str:
    """The command behind each figure."""
    return "\n".join(f"- `{name}`: `{data['figures'][name]['command']}`" for name in FIGURES)


def fleet_section(data: dict) -> str:
    """The whole fleet section (between the markers); notes are filled from the measured details."""
    from benchmarks.notes import notes

    m = data["machine"]
    head = (f"## Fleet\n\nMeasured by `make bench` (`.venv/bin/python benchmarks/run_all.py`) on "
            f"{data['generated']}: {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, "
            f"ray {m['ray']}; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
            f"(a shared machine: figures are ratios of runs made back to back). Whole benchmark: "
            f"{data['total_wall_s'] / 60:.1f} min. Raw figures and details: `benchmarks/results.json`.")
    return "\n\n".join([head, figures_table(data), "### Commands", commands_list(data), notes(data)])


def summary_lines(data: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"wrote benchmarks/results.json and the fleet section of docs/benchmarks.md "
             f"({data['total_wall_s']:.0f} s)"]
    for name in FIGURES:
        fig = data["figures"][name]
        lines.append(f"  {name:38s} {_value(fig):>10s}  goal {fig.get('goal') or '—':8s} {_verdict(fig)}")
    return "\n".join(lines)
