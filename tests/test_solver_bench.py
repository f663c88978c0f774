"""The solver benchmark's measuring helpers (benchmarks/solver_mixing.py) and the warm/cold figure's pairing
(benchmarks/run_all.py), on small hand-made problems whose answers are known."""

from __future__ import annotations

import pytest
import torch

from benchmarks import notes, run_all, solver_mixing


def test_jacobian_radius_of_a_linear_map_is_its_largest_eigenvalue_modulus():
    # Per sample a diagonal map: radii 0.5 and 1.5 (the sign of the eigenvalue must not matter).
    scales = torch.tensor([[0.5, 0.2, -0.1, 0.3], [0.4, -1.5, 1.0, 0.2]])
    radius = solver_mixing.jacobian_radius(lambda z: scales * z + 1.0, torch.zeros(2, 4))
    assert radius.tolist() == pytest.approx([0.5, 1.5], rel=1e-3)


def test_a_repelling_fixed_point_caps_picard_at_the_cap_but_not_anderson():
    """f(z) = -1.5 z + 1: the fixed point 0.4 repels Picard (it stops as divergent, before the cap, and must
    still count as the cap); Anderson, which does not need a contraction, finds it in a few steps."""
    f = lambda z: -1.5 * z + 1.0  # noqa: E731
    z0 = torch.zeros(3, 2)
    picard = solver_mixing.capped_iterations(f, z0, solver="picard", cap=200, tol=1e-6, m=5)
    anderson = solver_mixing.capped_iterations(f, z0, solver="anderson", cap=200, tol=1e-6, m=5)
    assert picard["converged"] == 0 and picard["capped"] == 3
    assert picard["iterations"].tolist() == [200.0] * 3
    assert anderson["converged"] == 3 and anderson["capped"] == 0
    assert float(anderson["iterations"].max()) < 10


def test_batch_ratios_and_summary_spread():
    anderson = torch.tensor([1.0, 1.0, 2.0, 2.0])
    picard = torch.tensor([2.0, 2.0, 2.0, 2.0])
    assert solver_mixing.batch_ratios(anderson, picard, 2) == [0.5, 1.0]
    rows = [{"ratio": 0.2, "batch_ratios": [0.1, 0.3], "samples": 4,
             "picard": {"at_cap": 4}, "anderson": {"at_cap": 0}},
            {"ratio": 0.4, "batch_ratios": [0.35, 0.45], "samples": 4,
             "picard": {"at_cap": 3}, "anderson": {"at_cap": 1}}]
    s = solver_mixing.summary(rows)
    assert (s["ratio_mean"], s["ratio_min"], s["ratio_max"]) == (pytest.approx(0.3), 0.2, 0.4)
    assert (s["batch_ratio_min"], s["batch_ratio_max"]) == (0.1, 0.45)
    assert (s["picard_at_cap"], s["anderson_at_cap"], s["samples"]) == (7, 1, 8)


def _figures(headline_ratio: float, radius: float) -> dict:
    row = {"seed": 0, "samples": 100, "picard": {"mean": 500.0, "at_cap": 100},
           "anderson": {"mean": 50.0, "at_cap": 0}, "ratio": headline_ratio, "batch_ratios": [headline_ratio] * 10,
           "jacobian_radius_median": radius}
    cell = {"contraction": "none", "spectral_gain": 0.9, "seeds": [row], **solver_mixing.summary([row])}
    settings = {"bench_tol": 1e-4, "mixing_max_iter": 500, "mixing_train_budget": 16, "mixing_seeds": [0],
                "mixing_batches": 10}
    return {"settings": settings, "slow_mixing": {"none": cell}, "headline_cell": "none",
            "anderson_over_picard_iters": headline_ratio}


def test_render_states_the_goal_verdict_and_why_picard_is_capped():
    text = "\n".join(solver_mixing.render(_figures(0.1, 2.5)))
    assert "**0.100**" in text and "goal <= 0.6: met" in text
    assert "Picard reached the cap on 100 of 100 samples" in text
    assert "repels Picard" in text  # radius > 1
    contracting = "\n".join(solver_mixing.render(_figures(0.7, 0.6)))
    assert "goal <= 0.6: NOT met" in contracting and "repels" not in contracting


def _reply(round_, pid, warm, iters, **extra):
    return {"round": round_, "partition_id": pid, "had_warm_start": warm, "forward-iterations": iters,
            "budget-total": 100.0, "backward-iterations": 1.0, "rel-residual": 1e-3, **extra}


def test_warm_over_cold_reports_spread_every_reply_and_replies_without_an_earlier_bank():
    warm = [_reply(4, 1, True, 4.0, **{"work-solve-evals": 50.0}), _reply(5, 1, True, 6.0, **{"work-solve-evals": 70.0}),
            _reply(5, 2, False, 9.0, **{"work-solve-evals": 90.0})]
    cold = [{**r, "had_warm_start": False, "forward-iterations": 10.0, "work-solve-evals": 100.0} for r in warm]
    result = run_all.warm_over_cold(warm, cold)
    assert result["ratio"] == pytest.approx(0.5)                      # (4 + 6) / (10 + 10)
    assert result["per_client_round_ratio"]["min"] == pytest.approx(0.4)
    assert result["per_client_round_ratio"]["max"] == pytest.approx(0.6)
    assert result["ratio_all_client_rounds"] == pytest.approx(19 / 30)
    assert result["ratio_without_earlier_bank"] == pytest.approx(0.9)
    assert result["solve_evals_ratio"] == pytest.approx(0.6)          # (50 + 70) / 200
    assert result["cold_clients_at_their_budget"] == 0
    del warm[0]["work-solve-evals"]                                     # older logs: no work metrics
    assert run_all.warm_over_cold(warm, cold)["solve_evals_ratio"] is None


def test_the_warm_start_note_reads_the_details_run_all_writes():
    """notes.py and run_all.py must agree on the details' keys (the docs are rebuilt from results.json)."""
    warm = [_reply(4, 1, True, 4.0), _reply(4, 2, True, 6.0)]
    cold = [{**r, "had_warm_start": False, "forward-iterations": 8.0} for r in warm]
    details = {**run_all.warm_over_cold(warm, cold), "overrides": list(run_all.TOLERANCE_LIMITED),
               "budget_limited": {**run_all.warm_over_cold(warm, cold), "command": "a  vs  b"}}
    fig = run_all.figure("warm_over_cold_iters", details.pop("ratio"), "cmd", details)
    text = notes.warm_start_note(fig)
    assert text.startswith("**`warm_over_cold_iters` = 0.62× (goal <= 0.7: met).**")
    assert "`training.max_iterations=100`" in text and "`a  vs  b`" in text
