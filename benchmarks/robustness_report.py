"""docs/robustness.md from the robustness study's figures (benchmarks/robustness_study.py): tables with 95%
Student-t intervals, the findings they support, and a figure of robust accuracy by cell and training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fed_deq import results
from tools import multiseed
from tools.robustness import CLEAN, fraction_label

FIGURE_MATRIX = "robustness_matrix.png"
FIGURE_CELLS = "robustness_cells.png"
#: The radius the findings about the fused model are read at (the middle of the evaluated ones).
FOCUS_EPS = 0.1


def fmt(interval: multiseed.Interval | None, digits: int = 3) -> str:
    """``mean [low, high]``, ``mean`` for one value, ``—`` for none."""
    if interval is None or interval.mean is None or not math.isfinite(interval.mean):
        return "—"
    if interval.low is None:
        return f"{interval.mean:.{digits}f}"
    return f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def _row_interval(row: Mapping, prefix: str) -> multiseed.Interval:
    return multiseed.Interval(mean=row.get(f"{prefix}_mean"), low=row.get(f"{prefix}_ci_low"),
                              high=row.get(f"{prefix}_ci_high"), n=int(row.get("runs") or 0))


# --- the matrix -------------------------------------------------------------------------------------------------


def matrix_section(summary: Sequence[Mapping], worst: Sequence[Mapping], rules: Sequence[str]) -> list[str]:
    """Per rule: a table of attacks x fractions (mean final accuracy, paired change against the clean run)."""
    lines = []
    for rule in rules:
        mine = [e for e in summary if e["rule"] == rule]
        clean = next((e for e in mine if e["attack"] == CLEAN), None)
        lines += [f"**{rule}** — clean final accuracy {fmt(_row_interval(clean, 'final_accuracy')) if clean else '—'}",
                  "", "| attack | fraction | planted | final accuracy | change vs clean (paired) | adversaries rejected per run |",
                  "|---|---:|---:|---|---|---:|"]
        for e in mine:
            if e["attack"] == CLEAN:
                continue
            diff = _row_interval(e, "final_accuracy_diff")
            lines.append(f"| {e['attack']} | {fraction_label(e['fraction'])} | {e['adversaries']} | "
                         f"{fmt(_row_interval(e, 'final_accuracy'))} | {fmt(diff)} | "
                         f"{e['rejected_adversaries_mean']:.1f} |")
        lines.append("")
    lines += ["Each rule's worst attack per fraction (lowest mean final accuracy):", "",
              "| rule | fraction | worst attack | final accuracy | clean | change vs clean |", "|---|---:|---|---|---|---|"]
    for w in worst:
        clean = w.get("clean_final_accuracy_mean")
        lines.append(f"| {w['rule']} | {fraction_label(w['fraction'])} | {w['attack']} | "
                     f"{fmt(_row_interval(w, 'final_accuracy'))} | {'—' if clean is None else f'{clean:.3f}'} | "
                     f"{fmt(_row_interval(w, 'final_accuracy_diff'))} |")
    return lines + [""]


def matrix_findings(summary: Sequence[Mapping], worst: Sequence[Mapping], fractions: Sequence[float]) -> list[str]:
    """What the matrix says, read off its intervals: the best worst case, and the attacks that hurt."""
    lines = []
    for fraction in fractions:
        cases = [w for w in worst if w["fraction"] == fraction and w["final_accuracy_mean"] is not None]
        if not cases:
            continue
        best = max(cases, key=lambda w: w["final_accuracy_mean"])
        ranked = ", ".join(f"{w['rule']} {w['final_accuracy_mean']:.3f} ({w['attack']})"
                           for w in sorted(cases, key=lambda w: -w["final_accuracy_mean"]))
        lines.append(f"- At fraction {fraction_label(fraction)}, the best worst case is **{best['rule']}**; worst "
                     f"cases by rule (mean final accuracy, worst attack): {ranked}.")
    hurt = [e for e in summary if e["attack"] != CLEAN and e.get("final_accuracy_diff_ci_high") is not None
            and e["final_accuracy_diff_ci_high"] < 0]
    unhurt = [e for e in summary if e["attack"] != CLEAN and e.get("final_accuracy_diff_ci_low") is not None
              and e["final_accuracy_diff_ci_low"] <= 0 <= e["final_accuracy_diff_ci_high"]]
    lines.append(f"- {len(hurt)} of {len(hurt) + len(unhurt)} attacked cells lose accuracy against the clean run "
                 f"with the whole 95% interval below zero; in the other {len(unhurt)} the interval includes zero "
                 f"(no loss shown with {max(int(e['runs']) for e in summary)} seeds per cell)." if hurt or unhurt else
                 "- One seed per cell: no intervals, so no cell's loss is shown to be more than noise.")
    screened = sorted({(e["rule"], e["attack"]) for e in summary if e["attack"] != CLEAN
                       and e["rejected_adversaries_mean"] > 0})
    if screened:
        by_attack = sorted({a for _, a in screened})
        lines.append(f"- The server's screens rejected adversaries' updates for: {', '.join(by_attack)} (the "
                     "update-norm screen, `fusion.max_norm_ratio`, catches an update far larger than the round's "
                     "median; the claim checks pass every poisoner, whose claims agree with its model).")
    return lines


# --- the cells ---------------------------------------------------------------------------------------------------


def eps_index(report: Mapping, eps: float) -> int | None:
    """Where ``eps`` sits in a run's adversarial report (None if it was not evaluated)."""
    values = [float(e) for e in report["eps"]]
    return values.index(float(eps)) if float(eps) in values else None


def cell_value(row: Mapping, eps: float, budget: str = "eval", attack: str = "worst") -> float | None:
    """A run's robust accuracy at ``eps`` for ``budget`` (a tier name, or "eval") and ``attack``."""
    report = row.get("adversarial")
    if not report:
        return None
    i = eps_index(report, eps)
    by_attack = report["accuracy"].get(budget, {})
    if i is None or attack not in by_attack:
        return None
    return by_attack[attack][i]


def groups(cells: Sequence[Mapping]) -> dict[tuple[str, str], list[Mapping]]:
    """(cell, training) → its runs, in study order."""
    out: dict[tuple[str, str], list[Mapping]] = {}
    for row in cells:
        out.setdefault((row["cell"], row["training"]), []).append(row)
    return out


def cells_section(cells: Sequence[Mapping]) -> list[str]:
    """Robust accuracy (worst of the two attacks) at the evaluation budget per radius, and by tier at FOCUS_EPS."""
    grouped = groups(cells)
    first = next((r["adversarial"] for r in cells if r.get("adversarial")), None)
    if first is None:
        return ["No run of the cell study recorded an adversarial evaluation.", ""]
    eps = [float(e) for e in first["eps"]]
    tiers = [name for name in first["accuracy"] if name != "eval"]
    head = "| cell | training | " + " | ".join(f"ε={e:g}" for e in eps) + " |"
    lines = ["Robust test accuracy at the evaluation budget (worst of PGD and the intermediate-state attack; "
             "ε = 0 is the clean accuracy), mean [95% interval] over seeds:", "", head,
             "|---|---|" + "---|" * len(eps)]
    for (cell, training), rows in grouped.items():
        values = [fmt(multiseed.mean_interval(cell_value(r, e) for r in rows)) for e in eps]
        lines.append(f"| {cell} | {training} | " + " | ".join(values) + " |")
    lines += ["", f"By tier, at ε = {FOCUS_EPS:g}, each at the tier's own forward budget (listed per row: a cell's "
              "cost per iteration and adversarial training's attack steps both shrink what a device affords):",
              "", "| cell | training | budgets (eval, " + ", ".join(tiers) + ") | eval | " + " | ".join(tiers) + " |",
              "|---|---|---|---|" + "---|" * len(tiers)]
    for (cell, training), rows in grouped.items():
        budgets = next((r["adversarial"]["budgets"] for r in rows if r.get("adversarial")), {})
        values = [fmt(multiseed.mean_interval(cell_value(r, FOCUS_EPS, budget) for r in rows))
                  for budget in ["eval", *tiers]]
        lines.append(f"| {cell} | {training} | {', '.join(str(budgets.get(b, '—')) for b in ['eval', *tiers])} | "
                     + " | ".join(values) + " |")
    return lines + [""]


def cells_findings(cells: Sequence[Mapping]) -> list[str]:
    """Adversarial training's paired effect per cell, the cells side by side, and PGD against Yang et al.'s attack."""
    grouped = groups(cells)
    lines = []
    for cell in dict.fromkeys(c for c, _ in grouped):
        standard = {r["seed"]: r for r in grouped.get((cell, "standard"), [])}
        adversarial = {r["seed"]: r for r in grouped.get((cell, "adversarial"), [])}
        seeds = sorted(set(standard) & set(adversarial))
        robust = [cell_value(adversarial[s], FOCUS_EPS) - cell_value(standard[s], FOCUS_EPS) for s in seeds
                  if cell_value(adversarial[s], FOCUS_EPS) is not None and cell_value(standard[s], FOCUS_EPS) is not None]
        clean = [cell_value(adversarial[s], 0.0) - cell_value(standard[s], 0.0) for s in seeds
                 if cell_value(adversarial[s], 0.0) is not None and cell_value(standard[s], 0.0) is not None]
        if robust:
            lines.append(f"- **{cell}**: adversarial training changes robust accuracy at ε = {FOCUS_EPS:g} by "
                         f"{fmt(multiseed.mean_interval(robust))} and clean accuracy by "
                         f"{fmt(multiseed.mean_interval(clean))} (paired by seed).")
    ranked = sorted(((multiseed.mean_interval(cell_value(r, FOCUS_EPS) for r in rows), key)
                     for key, rows in grouped.items()), key=lambda item: -(item[0].mean or -1))
    if ranked and ranked[0][0].mean is not None:
        lines.append("- Ranked by robust accuracy at ε = " + f"{FOCUS_EPS:g}: " + ", ".join(
            f"{cell}/{training} {fmt(interval)}" for interval, (cell, training) in ranked) + ".")
    gaps = [cell_value(r, FOCUS_EPS, attack="pgd") - cell_value(r, FOCUS_EPS, attack="intermediate") for r in cells
            if cell_value(r, FOCUS_EPS, attack="intermediate") is not None]
    if gaps:
        gap = multiseed.mean_interval(gaps)
        stronger = ("Yang et al.'s attack on intermediate states finds more adversarial inputs" if gap.mean > 0 else
                    "PGD through the equilibrium finds more adversarial inputs than the intermediate-state attack")
        lines.append(f"- Robust accuracy under PGD on the final state minus that under the intermediate-state attack, "
                     f"at ε = {FOCUS_EPS:g}, over every run: {fmt(gap)}: {stronger}"
                     + (" (the interval excludes zero)." if gap.low is not None and (gap.low > 0 or gap.high < 0)
                        else " (the interval includes zero)."))
    return lines


def plot_cells(cells: Sequence[Mapping], path: Path) -> Path:
    """Robust accuracy against ε at the evaluation budget: one line per (cell, training), mean over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for (cell, training), rows in groups(cells).items():
        first = next((r["adversarial"] for r in rows if r.get("adversarial")), None)
        if first is None:
            continue
        eps = sorted(float(e) for e in first["eps"])
        means = [multiseed.mean_interval(cell_value(r, e) for r in rows).mean for e in eps]
        ax.plot(eps, [math.nan if m is None else m for m in means], marker="o",
                linestyle="-" if training == "standard" else "--", label=f"{cell}, {training}")
    ax.set_xlabel("ε (ℓ∞, input units)")
    ax.set_ylabel("robust test accuracy (eval budget, worst attack)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return results.write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


# --- the document ------------------------------------------------------------------------------------------------


def evaluation_words(cells: Sequence[Mapping]) -> str:
    """How the cell runs' models were attacked, read from their reports."""
    first = next((r["adversarial"] for r in cells if r.get("adversarial")), None)
    if first is None:
        return "no run recorded one"
    return (f"{first['norm']} PGD, {first['steps']} steps of 2.5 ε / {first['steps']}, {first['samples']} test "
            f"samples; gradient: {first['gradient']}")


def render(study: Mapping, *, command: str, rules: Sequence[str], attacks: Sequence[str], fractions: Sequence[float],
           machine: str, generated: str) -> str:
    """The whole of docs/robustness.md."""
    matrix = study["matrix"]
    lines = [
        "# Robustness: the federation under poisoning, the fused model under attack", "",
        f"Generated by `{command}` on {generated} ({machine}) in {study['wall_time_s'] / 60:.0f} min "
        f"(the matrix {study['matrix_wall_s'] / 60:.0f} min; {study['reused']} finished runs reused). Scenario "
        f"`scenarios/default.yaml`, seeds {', '.join(map(str, study['seeds']))}; every interval is a 95% "
        "Student-t interval over seeds, every difference paired by seed. Do not edit by hand: rerun the command.", "",
        "## 1. The federation under poisoning", "",
        f"`fed-deq robustness scenarios/default.yaml --rules {','.join(rules)} --attacks {','.join(attacks)} "
        f"--fractions {','.join(fraction_label(f) for f in fractions)} --seeds {len(study['seeds'])}`: each "
        "attack (README, \"Model poisoning\"; each with its defaults) mounted by that fraction of every tier's "
        "devices, rounded half up per tier (`planted` counts them), against a clean run of the same rule on the "
        "same seed. Final test accuracy at the evaluation budget.", "",
        f"![robustness matrix](img/{FIGURE_MATRIX})", "",
        *matrix_section(matrix.summary, matrix.worst, rules),
        "What the matrix says:", "", *matrix_findings(matrix.summary, matrix.worst, fractions), "",
        "## 2. The fused model under attack, by cell and training", "",
        f"The final global model of a run with `evaluation.adversarial` ({evaluation_words(study['cells'])}) and "
        "Yang et al.'s attack on random intermediate states of the dynamics. Cells: `model.contraction` spectral (the default), "
        "monotone, lyapunov (LyaDEQ); training standard or `training.adversarial: {eps: 0.1, steps: 3, "
        "intermediate_states: true}` (PGD examples and the intermediate-state loss, charged to each device's "
        "budget, so the slow tiers get fewer iterations).", "",
        f"![robust accuracy by cell](img/{FIGURE_CELLS})", "",
        *cells_section(study["cells"]),
        "What the runs say:", "", *cells_findings(study["cells"]), "",
    ]
    return "\n".join(lines) + "\n"
