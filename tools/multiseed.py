"""Multi-seed studies: which seeds a study runs, and per-rule summaries with Student-t intervals over them.

A study (``fed-deq compare --seeds N``, ``fed-deq tune --seeds N``) runs each variant once per seed. Its first
seed is the scenario's own, so a one-seed study reproduces a plain ``fed-deq simulate``; the others are drawn
from the scenario seed. A summary gives, per figure, the mean over the seeds and its 95% confidence interval
``mean ± t(0.975, n−1) · s / √n`` (Student t; no interval from a single seed), and the same for the paired
differences ``rule − baseline`` seed by seed. See docs/tuning.md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fed_deq.errors import InputError
from fed_deq.seeding import rng

CONFIDENCE = 0.95
#: Derived seeds are drawn below this bound: short enough to read in a folder name.
SEED_RANGE = 1_000_000
#: The per-run figures a summary averages. The two ``*_to_target`` figures exist only for runs that reached
#: the target, so their means (and their ``_n``) are over those seeds alone.
FIGURES = ("final_accuracy", "best_accuracy", "sim_time_to_target_s", "bytes_to_target")
STATS = ("n", "mean", "ci_low", "ci_high")


def check_seeds(count: int, option: str = "--seeds", minimum: int = 1) -> int:
    """A seed count must be an integer >= ``minimum``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < minimum:
        raise InputError(f"{option}: must be an integer >= {minimum}, got {count}")
    return count


def study_seeds(seed: int, count: int) -> list[int]:
    """``count`` distinct seeds: the scenario's own first, then draws from ``rng(seed, "study-seed", i)``.

    The list for a larger ``count`` starts with the list for a smaller one, so ``--seeds 5`` repeats the runs
    of ``--seeds 3`` and adds two.
    """
    seeds, index = [int(seed)], 1
    while len(seeds) < count:
        draw = int(rng(seed, "study-seed", index).integers(SEED_RANGE))
        index += 1
        if draw not in seeds:  # a repeat would count one run twice
            seeds.append(draw)
    return seeds


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its confidence interval (None where undefined: no value, or one)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None

    def as_columns(self, prefix: str) -> dict[str, Any]:
        """``{prefix_n, prefix_mean, prefix_ci_low, prefix_ci_high}``."""
        return dict(zip((f"{prefix}_{stat}" for stat in STATS), (self.n, self.mean, self.low, self.high)))


def mean_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval ``mean ± t((1+c)/2, n−1) · s / √n`` of the values that are not None."""
    from scipy import stats

    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(kept)
    if n == 0:
        return Interval(0, None, None, None)
    mean = math.fsum(kept) / n
    if n == 1:
        return Interval(1, mean, None, None)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(kept) / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def paired_differences(rows: Sequence[Mapping], rule: str, baseline: str, figure: str) -> list[float]:
    """``rule − baseline`` of ``figure`` for every seed where both runs have it, in seed order."""
    base = {row["seed"]: row.get(figure) for row in rows if row["rule"] == baseline}
    return [float(row[figure]) - float(base[row["seed"]]) for row in rows
            if row["rule"] == rule and row.get(figure) is not None and base.get(row["seed"]) is not None]


def summary_columns(with_baseline: bool, group: str = "rule") -> list[str]:
    """The columns of a summary row, in order."""
    columns = [group, *(["baseline"] if with_baseline else []), "seeds"]
    columns += [f"{figure}_{stat}" for figure in FIGURES for stat in STATS]
    if with_baseline:
        columns += [f"{figure}_diff_{stat}" for figure in FIGURES for stat in STATS]
    return columns


def summarise_rules(rows: Sequence[Mapping], baseline: str | None = None, group: str = "rule") -> list[dict[str, Any]]:
    """One summary row per rule (in order of first appearance) from per-run rows ``{rule, seed, *FIGURES}``.

    ``<figure>_n/_mean/_ci_low/_ci_high`` are over the rule's seeds that have the figure; with a ``baseline``,
    ``<figure>_diff_*`` are over the paired differences against it (left empty on the baseline's own row).
    ``group`` names the column runs are grouped by (``rule``; a tune's test report groups by ``trial``).
    """
    summary = []
    for rule in dict.fromkeys(row[group] for row in rows):
        mine = [row for row in rows if row[group] == rule]
        entry: dict[str, Any] = {group: rule, **({"baseline": baseline} if baseline else {}),
                                 "seeds": len({row["seed"] for row in mine})}
        for figure in FIGURES:
            entry.update(mean_interval(row.get(figure) for row in mine).as_columns(figure))
        if baseline:
            for figure in FIGURES:
                diffs = [] if rule == baseline else paired_differences(rows, rule, baseline, figure)
                entry.update(mean_interval(diffs).as_columns(f"{figure}_diff"))
        summary.append(entry)
    return summary


def format_interval(interval_or_row: Mapping, prefix: str, digits: int = 4, scale: float = 1.0) -> str:
    """'0.9120 [0.9010, 0.9230]' from a summary row's ``prefix_*`` columns; '—' when there is no mean."""
    mean = interval_or_row.get(f"{prefix}_mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    low, high = interval_or_row.get(f"{prefix}_ci_low"), interval_or_row.get(f"{prefix}_ci_high")
    text = f"{mean / scale:,.{digits}f}"
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        text += f" [{low / scale:,.{digits}f}, {high / scale:,.{digits}f}]"
    return text
