"""The explanations under the fleet table of docs/benchmarks.md, filled from the measured details.

Where a sentence reports a profile made while building the benchmark (not re-measured by every run), it says
so; everything with a number from this run comes from results.json.
"""

from __future__ import annotations

from benchmarks.overhead_notes import overhead_note, per_update_note, study_note, verdict


def memory_note(fig: dict) -> str:
    """Where the large fleet's memory goes."""
    d = fig["details"]
    return (
        f"**`large_fleet_peak_rss_gib` = {fig['value']:.2f} GiB ({verdict(fig)}).** Resident memory summed over "
        f"the whole process tree of the run ({d['processes_at_peak']} processes at the peak, sampled every 0.25 s "
        f"from /proc); counting shared pages once (PSS) it is {d['peak_pss_gib']:.2f} GiB. The fleet size costs "
        f"almost nothing: the 100-client run peaked at {d['fleet_100_peak_rss_gib']:.2f} GiB. The memory is the "
        "fixed set of processes of a local Ray instance (GCS, raylet, dashboard, dashboard agent, runtime-env "
        "agent, log monitor, autoscaler monitor) plus three processes with torch loaded (the driver and two "
        "actors, about 0.6 GiB each). Per-node state stays small: a warm-start bank is 16 samples × 32 channels "
        f"× 40 floats, 80 KB per client that trained. Run: {d['rounds']} rounds, {d['wall_s']:.0f} s."
    )


def fleet_size_note(fig: dict) -> str:
    """What changes between 100 and 1,000 clients, and the Flower hot spot found there."""
    d = fig["details"]
    return (
        f"**`fleet_size_round_ratio` = {fig['value']:.2f}× ({verdict(fig)}).** Median round wall (rounds 2 on; "
        f"round 1 includes the actors' start-up) {d['round_wall_1000_s']:.2f} s with 1,000 clients vs "
        f"{d['round_wall_100_s']:.2f} s with 100; 50 sampled per round in both, the same training and validation "
        "samples per client and the same test, probe and server validation sets (so the server's work costs the "
        "same), only the fleet size differs (`benchmarks/scale.py` `same_data_overrides`; "
        "tests/test_bench_schema.py checks the sizes on the data a run loads). Until 2026-11-30 the 100-client run "
        "left the probe set and the server's validation split out of its arithmetic: its clients got 9 training "
        "samples and no validation sample against 15 and 1, which read as 1.23× in two runs (a guess that "
        "returning clients' warm starts made the small fleet faster was wrong: it did less work per client). "
        "Found and fixed on the way to this benchmark: Flower 1.42's simulation engine finds undelivered messages by asking "
        "its in-memory LinkState once per node every 0.1 s, and each ask scans every stored message — nodes × "
        "messages checks per sweep (py-spy: a quarter of a core in the driver during rounds at 1,000 nodes, and a "
        "million checks per sweep during discovery, when 1,000 queries are in flight). `tools/flower_patch.py` now "
        "replaces that loop with one pass over the undelivered messages (same rules: expired messages dropped, at "
        "most one message per node per sweep, marked delivered before queued; only for flwr 1.42). Measured while "
        "building this benchmark on large-fleet.yaml: discovery 22 s → 12 s, a 6-round run 55 s → 33 s; before it, "
        f"rounds at 1,000 clients took about 1.27× those at 100. Whole runs here: {d['wall_1000_s']:.0f} s "
        f"(1,000) and {d['wall_100_s']:.0f} s (100)."
    )


def warm_start_note(fig: dict) -> str:
    """What warm starts save where the tolerance stops the solve, and what they save on the default budgets."""
    d, limited = fig["details"], fig["details"]["budget_limited"]
    spread = d["per_client_round_ratio"]
    budgets = ", ".join(f"{k}: {v:.2f}×" for k, v in limited["ratio_by_forward_budget"].items())
    no_bank = d["ratio_without_earlier_bank"]
    return (
        f"**`warm_over_cold_iters` = {fig['value']:.2f}× ({verdict(fig)}).** Measured where the tolerance, not the "
        f"budget, stops the solve: the default scenario with {', '.join(f'`{o}`' for o in d['overrides'])} (every "
        f"client gets {_budget_list(list(d['ratio_by_forward_budget']))} forward iterations, model.tol 1e-3), run "
        "with `training.warm_start=true` and `false`. Mean forward iterations per solve of the "
        f"{d['client_rounds_compared']} client-rounds after round 3 whose client had trained before: warm "
        f"{d['warm_forward_iterations']:.2f} vs {d['cold_forward_iterations']:.2f} for the same clients and rounds "
        f"cold (per client-round {spread['mean']:.2f}× ± {spread['ci95'] or 0:.3f} at 95 %, range {spread['min']:.2f}–"
        f"{spread['max']:.2f}; {d['cold_clients_at_their_budget']} cold client-rounds at their budget; the same "
        f"residual, {d['warm_rel_residual']:.1e} vs {d['cold_rel_residual']:.1e}). Over all client-rounds "
        f"{d['ratio_all_client_rounds']:.2f}×"
        + (f"; whole-batch f evaluations (a batch solves until its slowest sample stops) {d['solve_evals_ratio']:.2f}×"
           if d.get("solve_evals_ratio") is not None else "")
        + (f"; clients without a bank from an earlier round (only local epochs 2 and 3 start warm) {no_bank:.2f}×"
           if no_bank is not None else "") +
        ". With `true` a client reuses each sample's fixed point from its previous round in its first local epoch "
        "and from the previous epoch in the later ones; with `false` every solve starts from zero. The saving is "
        "about a fixed number of iterations, set by how far the fixed point moved since it was stored (an epoch "
        "of optimiser steps within a round, whole rounds for an earlier round's bank), so a looser tolerance "
        "lowers the ratio and a tighter one raises it"
        + (": the same pair at " + "; ".join(
            f"tol {tol}: {t['ratio']:.2f}× ({t['warm_forward_iterations']:.2f} vs {t['cold_forward_iterations']:.2f} "
            f"iterations)" for tol, t in d["by_tolerance"].items()) if d.get("by_tolerance") else "")
        + (". With `model.solver=picard` (the same pair, tol 1e-3) the warm start saves more: "
           f"{d['by_solver']['picard']['ratio']:.2f}× ({d['by_solver']['picard']['warm_forward_iterations']:.2f} vs "
           f"{d['by_solver']['picard']['cold_forward_iterations']:.2f} iterations): Picard's count follows the "
           "starting residual alone, while Anderson spends its first iterations building the history it "
           "extrapolates from, wherever it starts" if d.get("by_solver", {}).get("picard") else "")
        + ". The goal is a property of the tolerance as much as of the warm start; at the scenario's tolerance "
        + ("it is met" if fig["met"] else "it is missed, and that is the finding") + ". On the "
        f"default fleet's own budgets ({_budget_list(list(limited['ratio_by_forward_budget']))} forward "
        f"iterations) the ratio is {limited['ratio']:.2f}× (by budget {budgets}): "
        f"{limited['cold_clients_at_their_budget']} of {limited['client_rounds_compared']} cold client-rounds spend "
        "their whole budget, warm or cold, and the warm start shows up as a lower residual instead "
        f"({limited['warm_rel_residual']:.3f} vs {limited['cold_rel_residual']:.3f}); command: "
        f"`{limited['command']}`. The bare loop calls the ClientApp's `run_client_round` and keeps the banks per "
        "partition as `context.state` does (the overhead note shows both paths give identical runs)."
    )


def fusion_note(fig: dict) -> str:
    """What the quality / FedAvg figure is: a paired ratio over seeds, with its interval."""
    d = fig["details"]
    q, f = d["quality_time_to_target_s"], d["fedavg_time_to_target_s"]
    faster = "FedAvg got there first on average" if fig["value"] > 1 else "The quality rule got there first on average"
    return (
        f"**`quality_over_fedavg_time_to_target` = {fig['value']:.2f}× ± {d['ratio_ci95']:.2f} (95 % interval over "
        f"seeds {', '.join(map(str, d['seeds']))}; {verdict(fig)}).** Simulated seconds until the test accuracy "
        f"first reached {d['target_accuracy']:g} on scenarios/heterogeneous-fleet.yaml, `{d['quality_config']}` "
        f"(the shipped default) over FedAvg, paired by seed (per seed: "
        f"{', '.join(f'{r:.2f}' for r in d['per_seed_ratio'])}): quality {q['mean']:.0f} ± {q['ci95']:.0f} s "
        f"({d['quality_reached']} of {len(d['seeds'])} runs reached it), FedAvg {f['mean']:.0f} ± {f['ci95']:.0f} s "
        f"({d['fedavg_reached']} of {len(d['seeds'])}); a run that never reaches the target counts its whole "
        f"horizon. {faster}. Every rule and score side by side: the fusion section below."
    )


def _budget_list(budgets: list[str]) -> str:
    """"2 and 6", "12, 17 and 23"."""
    return budgets[0] if len(budgets) == 1 else f"{', '.join(budgets[:-1])} and {budgets[-1]}" if budgets else "no"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def solver_note(data: dict) -> str:
    """Where the two solver figures come from."""
    a, t = data["figures"]["anderson_over_picard_iters"], data["figures"]["solver_time_ratio_vs_torchdeq"]
    if a.get("value") is None or t.get("value") is None:
        return f"**Solver figures:** {a.get('missing') or t.get('missing')}."
    return (f"**Solver figures** are copied from `benchmarks/solvers.json` ({a['details'].get('date', 'undated')}); "
            "the Solvers section of this page explains them.")


def notes(data: dict) -> str:
    """Every note, in the order of the table."""
    f = data["figures"]
    return "\n\n".join(["### Notes", overhead_note(f["overhead_ratio"]), per_update_note(f["overhead_per_update_s"]),
                        study_note(f["study_extra_run_s"]), memory_note(f["large_fleet_peak_rss_gib"]),
                        fleet_size_note(f["fleet_size_round_ratio"]), solver_note(data),
                        warm_start_note(f["warm_over_cold_iters"]),
                        fusion_note(f["quality_over_fedavg_time_to_target"])])
