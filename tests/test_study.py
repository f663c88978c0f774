"""benchmarks/study.py (`make study`): every variant x rule x seed through compare, paired intervals in the
document, reuse of finished runs. Simulations run in-process through the FakeGrid (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

from clients.app import app as client_app
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks import reuse  # noqa: E402
import study  # noqa: E402
import study_report  # noqa: E402

DIGITS = ROOT / "scenarios" / "digits-iid.yaml"
TINY = ("training.rounds=2", "training.clients_per_round=3")
VARIANTS = {"deq": (), "deq-no-contraction": ("model.contraction=none",)}


class CountingRunner:
    """Simulates through the FakeGrid and counts the runs it really made."""

    def __init__(self):
        self.calls = 0

    def __call__(self, scenario, out_dir, name):
        self.calls += 1
        grid = FakeGrid(client_app, fleet_size(scenario), seed=scenario.seed)
        return run_federation(grid, scenario, out_dir, name=name)


def run_tiny(out: Path, runner: CountingRunner) -> dict:
    return study.run_study(DIGITS, out, seeds=2, target=0.5, overrides=TINY, variants=VARIANTS,
                           rules=("quality", "fedavg"), run=runner)


def test_a_study_runs_every_variant_rule_and_seed_and_reuses_finished_runs(tmp_path):
    runner = CountingRunner()
    first = run_tiny(tmp_path, runner)
    assert runner.calls == 2 * 2 * 2 and first["reused"] == 0
    rows = study.collect_rows(first, tmp_path)
    assert {(r["variant"], r["rule"]) for r in rows} == {(v, r) for v in VARIANTS for r in ("quality", "fedavg")}
    tiers = {t.name for t in load_scenario(DIGITS).fleet.tiers}
    assert all(set(r["accuracy_by_tier"]) == tiers for r in rows)
    again = run_tiny(tmp_path, runner)
    assert runner.calls == 8 and again["reused"] == 8  # nothing ran twice
    assert study.collect_rows(again, tmp_path) == [{**r, "wall_time_s": r2["wall_time_s"]}
                                                    for r, r2 in zip(rows, study.collect_rows(again, tmp_path))]


def test_a_run_made_by_other_code_is_not_reused(tmp_path, monkeypatch):
    runner = CountingRunner()
    run_tiny(tmp_path, runner)
    assert len(list(tmp_path.rglob(reuse.CODE_FILE))) == 8
    monkeypatch.setattr(reuse, "code_digest", lambda: "edited-source")  # as if a source file had changed
    again = run_tiny(tmp_path, runner)
    assert runner.calls == 16 and again["reused"] == 0


def test_the_code_digest_follows_every_source_file(tmp_path):
    for package in reuse.CODE_PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = reuse.code_digest(tmp_path)
    (tmp_path / "wire" / "a.py").write_text("x = 2\n")
    assert reuse.code_digest(tmp_path) != before
    assert reuse.code_digest(ROOT) == reuse.code_digest(ROOT)


def test_a_changed_scenario_is_not_reused(tmp_path):
    runner = CountingRunner()
    run_tiny(tmp_path, runner)
    study.run_study(DIGITS, tmp_path, seeds=1, target=0.5, overrides=(*TINY, "training.learning_rate=0.02"),
                    variants={"deq": ()}, rules=("fedavg",), run=runner)
    assert runner.calls == 9


def test_paired_intervals_and_verdicts_by_hand():
    rows = [{"variant": "deq", "rule": rule, "seed": seed, "final_accuracy": acc}
            for rule, accs in (("fedavg", (0.5, 0.6, 0.7)), ("quality", (0.6, 0.7, 0.8))) for seed, acc in
            zip((1, 2, 3), accs)]
    diffs = study_report.paired(rows, "final_accuracy", study_report.select("deq", "quality"),
                                study_report.select("deq", "fedavg"))
    assert [round(d, 12) for d in diffs] == [0.1, 0.1, 0.1]
    iv = study_report.interval(diffs)
    assert abs(iv.mean - 0.1) < 1e-12 and abs(iv.high - iv.low) < 1e-9  # no spread: a point interval
    assert study_report.verdict(iv, "better", "worse", "same") == "better"
    wide = study_report.interval([0.1, -0.1, 0.05])
    assert study_report.verdict(wide, "better", "worse", "same") == "same"
    assert study_report.verdict(study_report.interval([0.2]), "b", "w", "s") == "too few paired seeds to say"


def test_the_document_has_every_table_and_writes_its_figures(tmp_path):
    runner = CountingRunner()
    out = tmp_path / "runs"
    done = run_tiny(out, runner)
    rows = study.collect_rows(done, out)
    args = study.parse_args(["--scenario", str(DIGITS), "--seeds", "2", "--target", "0.5", "--doc",
                             str(tmp_path / "docs" / "results.md"), *[a for o in TINY for a in ("--set", o)]])
    path = study.write_document(done, rows, args)
    text = path.read_text()
    for heading in ("## What the evidence says", "## Accuracy, time and bytes", "## Model kinds against the DEQ",
                    "## Accuracy by tier"):
        assert heading in text
    assert "python benchmarks/study.py --seeds 2 --target 0.5 --set training.rounds=2" in text
    assert "quality − fedavg" in text and "deq-no-contraction − deq" in text
    for figure in (study_report.FIGURE_ACCURACY, study_report.FIGURE_TIERS):
        assert (tmp_path / "docs" / "img" / figure).read_bytes().startswith(b"\x89PNG")
