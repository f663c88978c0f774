"""docs/results.md and its figures from a finished study's rows (benchmarks/study.py runs the study)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fed_deq import results

from tools import multiseed

FIGURE_ACCURACY = "results_accuracy.png"
FIGURE_TIERS = "results_tiers.png"
MIB = 2**20
BASELINE = "fedavg"
REFERENCE_VARIANT = "deq"
#: Variant name -> the scenario overrides that make it; the first is the reference the others are paired with.
VARIANT_TEXT = {
    "deq": "DEQ (spectral contraction, capability-matched budgets)",
    "deq-no-contraction": "DEQ without contraction (`model.contraction: none`)",
    "weight_tied": "weight-tied unroll at fixed depth (`model.kind: weight_tied`)",
    "explicit": "explicit untied stack at fixed depth (`model.kind: explicit`)",
}



# --------------------------------------------------------------------------------------------------------
# Statistics over rows


def interval(values) -> multiseed.Interval:
    """Mean and 95% Student-t interval of the values that are there."""
    return multiseed.mean_interval(values)


def fmt(iv: multiseed.Interval, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """'0.712 [0.690, 0.734]' (or '—' with no value; no interval from one value)."""
    if iv.mean is None:
        return "—"
    text = f"{iv.mean / scale:,.{digits}f}{unit}"
    if iv.low is not None:
        text += f" [{iv.low / scale:,.{digits}f}, {iv.high / scale:,.{digits}f}]"
    return text


def paired(rows: Sequence[Mapping], figure: str, pick: Callable[[Mapping], bool],
           base: Callable[[Mapping], bool]) -> list[float]:
    """Per-seed ``figure`` differences between the rows ``pick`` selects and the rows ``base`` selects."""
    base_by_seed = {r["seed"]: r.get(figure) for r in rows if base(r)}
    return [float(r[figure]) - float(base_by_seed[r["seed"]]) for r in rows
            if pick(r) and r.get(figure) is not None and base_by_seed.get(r["seed"]) is not None]


def verdict(diff: multiseed.Interval, better: str, worse: str, same: str) -> str:
    """Which way a paired difference falls: its interval above 0, below 0, or across it."""
    if diff.mean is None or diff.low is None:
        return "too few paired seeds to say"
    if diff.low > 0:
        return better
    if diff.high < 0:
        return worse
    return same


def select(variant: str, rule: str) -> Callable[[Mapping], bool]:
    """A row filter for one variant and rule."""
    return lambda row: row["variant"] == variant and row["rule"] == rule


def variants_of(rows: Sequence[Mapping]) -> list[str]:
    """Variants in the order they ran."""
    return list(dict.fromkeys(r["variant"] for r in rows))


def rules_of(rows: Sequence[Mapping]) -> list[str]:
    """Rules in the order they ran (the baseline first, as compare runs it)."""
    return list(dict.fromkeys(r["rule"] for r in rows))


def tiers_of(rows: Sequence[Mapping]) -> list[str]:
    """Tier names as the runs report them."""
    return list(dict.fromkeys(t for r in rows for t in r["accuracy_by_tier"]))


def reached(rows: Sequence[Mapping]) -> str:
    """'3/5': seeds that reached the target."""
    return f"{sum(1 for r in rows if r.get('sim_time_to_target_s') is not None)}/{len(rows)}"


def main_table(rows: Sequence[Mapping], target: float) -> list[str]:
    """Per variant and rule: final accuracy, its paired difference to FedAvg, time and bytes to target."""
    lines = [f"| model | rule | final accuracy | Δ vs {BASELINE} (paired) | best accuracy | "
             f"sim. time to {target:g} (s) | reached | MiB to {target:g} | MiB per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in variants_of(rows):
        for rule in rules_of(rows):
            mine = [r for r in rows if select(variant, rule)(r)]
            if not mine:
                continue
            diff = "—" if rule == BASELINE else fmt(interval(paired(
                rows, "final_accuracy", select(variant, rule), select(variant, BASELINE))), digits=3)
            lines.append(
                f"| {variant} | {rule} | {fmt(interval(r['final_accuracy'] for r in mine))} | {diff} | "
                f"{fmt(interval(r['best_accuracy'] for r in mine))} | "
                f"{fmt(interval(r.get('sim_time_to_target_s') for r in mine), digits=0)} | {reached(mine)} | "
                f"{fmt(interval(r.get('bytes_to_target') for r in mine), digits=2, scale=MIB)} | "
                f"{fmt(interval(r.get('total_bytes') for r in mine), digits=2, scale=MIB)} |")
    return lines


def kinds_table(rows: Sequence[Mapping]) -> list[str]:
    """Every variant against the DEQ, same rule, paired by seed: accuracy and bytes."""
    lines = [f"| model | rule | Δ final accuracy vs {REFERENCE_VARIANT} | Δ MiB per run vs {REFERENCE_VARIANT} |",
             "|---|---|---|---|"]
    for variant in variants_of(rows):
        if variant == REFERENCE_VARIANT:
            continue
        for rule in rules_of(rows):
            pick, base = select(variant, rule), select(REFERENCE_VARIANT, rule)
            acc = interval(paired(rows, "final_accuracy", pick, base))
            size = interval(paired(rows, "total_bytes", pick, base))
            lines.append(f"| {variant} | {rule} | {fmt(acc)} | {fmt(size, digits=2, scale=MIB)} |")
    return lines


def tiers_table(rows: Sequence[Mapping]) -> list[str]:
    """Final-round test accuracy at each tier's own budget, mean and interval over seeds."""
    tiers = tiers_of(rows)
    lines = ["| model | rule | " + " | ".join(tiers) + " |", "|---|---|" + "---|" * len(tiers)]
    for variant in variants_of(rows):
        for rule in rules_of(rows):
            mine = [r for r in rows if select(variant, rule)(r)]
            if mine:
                cells = [fmt(interval(r["accuracy_by_tier"].get(t) for r in mine)) for t in tiers]
                lines.append(f"| {variant} | {rule} | " + " | ".join(cells) + " |")
    return lines


def findings(rows: Sequence[Mapping]) -> list[str]:
    """One sentence per question, read off the paired intervals, whichever way they fall."""
    lines = []
    for variant in variants_of(rows):
        for rule in rules_of(rows):
            if rule == BASELINE:
                continue
            diff = interval(paired(rows, "final_accuracy", select(variant, rule),
                                         select(variant, BASELINE)))
            said = verdict(diff, f"{rule} beats {BASELINE}", f"{BASELINE} beats {rule}",
                              f"no difference between {rule} and {BASELINE} is measurable")
            lines.append(f"- **{variant}**, final accuracy {rule} − {BASELINE}: {fmt(diff)} → {said}.")
    for variant in variants_of(rows):
        if variant == REFERENCE_VARIANT:
            continue
        for rule in rules_of(rows):
            diff = interval(paired(rows, "final_accuracy", select(variant, rule),
                                         select(REFERENCE_VARIANT, rule)))
            said = verdict(diff, f"{variant} beats the DEQ", f"the DEQ beats {variant}",
                              f"no difference from the DEQ is measurable")
            lines.append(f"- with {rule}, final accuracy {variant} − {REFERENCE_VARIANT}: {fmt(diff)} → {said}.")
    return lines


def plot_accuracy(rows: Sequence[Mapping], path: Path) -> Path:
    """Final accuracy per variant (groups) and rule (bars), with 95% intervals as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants, rules = variants_of(rows), rules_of(rows)
    figure = Figure(figsize=(8, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(rules))
    for index, rule in enumerate(rules):
        means, errors = [], []
        for variant in variants:
            iv = interval(r["final_accuracy"] for r in rows if select(variant, rule)(r))
            means.append(iv.mean or 0.0)
            errors.append(0.0 if iv.low is None else iv.high - iv.mean)
        xs = [v + (index - (len(rules) - 1) / 2) * width for v in range(len(variants))]
        axes.bar(xs, means, width, yerr=errors, capsize=3, label=rule)
    axes.set_xticks(range(len(variants)), variants)
    axes.set_ylabel("final test accuracy (mean, 95% CI)")
    axes.legend(title="fusion rule")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return results.write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


def plot_tiers(rows: Sequence[Mapping], path: Path) -> Path:
    """Final accuracy at each tier's budget, one panel per variant, with the quality rule and FedAvg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants, tiers, rules = variants_of(rows), tiers_of(rows), rules_of(rows)
    figure = Figure(figsize=(3.2 * len(variants), 3.4), dpi=110)
    FigureCanvasAgg(figure)
    width = 0.8 / max(1, len(rules))
    for panel, variant in enumerate(variants, start=1):
        axes = figure.add_subplot(1, len(variants), panel)
        for index, rule in enumerate(rules):
            mine = [r for r in rows if select(variant, rule)(r)]
            means = [interval(r["accuracy_by_tier"].get(t) for r in mine).mean or 0.0 for t in tiers]
            xs = [t + (index - (len(rules) - 1) / 2) * width for t in range(len(tiers))]
            axes.bar(xs, means, width, label=rule)
        axes.set_title(variant, fontsize=9)
        axes.set_xticks(range(len(tiers)), tiers, rotation=30, fontsize=8)
        axes.set_ylim(0, 1)
        if panel == 1:
            axes.set_ylabel("final accuracy at the tier's budget")
            axes.legend(fontsize=7)
    figure.tight_layout()
    return results.write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


def render(rows: Sequence[Mapping], *, command: str, scenario_path: str, seeds: Sequence[int], target: float,
           wall_time_s: float, reused: int, machine: str, generated: str, notes: str = "") -> str:
    """The whole of docs/results.md."""
    variants = "\n".join(f"- `{v}`: {VARIANT_TEXT.get(v, v)}" for v in variants_of(rows))
    parts = [
        "# Results: what the evidence says on the flagship fleet",
        "",
        f"Generated by `{command}` on {generated} ({machine}); {len(rows)} runs, {reused} reused from an earlier "
        f"pass, {wall_time_s / 60:.1f} min of wall time. Do not edit by hand: `make study` rewrites this file.",
        "",
        f"Scenario `{scenario_path}`; seeds {', '.join(map(str, seeds))} (the scenario's own first, then derived "
        f"from it); target accuracy {target:g}. Every figure is the mean over seeds with its 95% Student-t "
        f"interval in brackets; differences are paired by seed (same seed = same data split, fleet, sampling). "
        f"Accuracy is on the central test set at the evaluation budget unless said otherwise.",
        "",
        "Models:",
        variants,
        "",
        *([notes, ""] if notes else []),
        "## What the evidence says",
        "",
        *findings(rows),
        "",
        "## Accuracy, time and bytes",
        "",
        *main_table(rows, target),
        "",
        f"![final accuracy by model and rule]({Path('img') / FIGURE_ACCURACY})",
        "",
        "## Model kinds against the DEQ (same rule, paired by seed)",
        "",
        *kinds_table(rows),
        "",
        "## Accuracy by tier (final round, each tier's own evaluation budget)",
        "",
        *tiers_table(rows),
        "",
        f"![accuracy by tier]({Path('img') / FIGURE_TIERS})",
        "",
    ]
    return "\n".join(parts)
