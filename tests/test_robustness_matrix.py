"""fed-deq robustness: the rules x attacks x fractions x seeds matrix. A small matrix runs through the real
server round loop on the in-process FakeGrid (no Ray) in one engine; a scripted runner with known accuracies
checks the summaries, the paired differences and the worst cases by hand; bad input exits 2 writing nothing."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path

import pytest

from fed_deq import adversary, results
from fed_deq.errors import InputError
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario
from tests.test_compare import FakeGridEngine
from tools import multiseed, robustness, runs
from tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "scenarios" / "digits-iid.yaml"  # two tiers of 5 devices, 5 clients per round
PNG = b"\x89PNG\r\n\x1a\n"
RULES, ATTACKS, FRACTIONS = ("fedavg", "quality"), ("fake_accuracy", "nan_update"), (0.2, 0.4)
#: Student t quantile t(0.975, 2) from a printed table, to check the intervals by hand.
T_975_2 = 4.303

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_scenario(*extra: str):
    return load_scenario(DIGITS, ["training.rounds=2", "training.clients_per_round=3", *extra])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def cell_of(row: dict) -> tuple[str, str, float]:
    return row["rule"], row["attack"], float(row["fraction"])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, single_torch_thread):
    """2 rules x 2 attacks x 2 fractions x 2 seeds of one-round digits through the CLI, in one FakeGrid engine."""
    out = tmp_path_factory.mktemp("robustness") / "matrix"
    engine, stdout = FakeGridEngine(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(io.StringIO()):
        patch.setattr(runs, "study_engine", engine)
        code = cli_main(["robustness", str(DIGITS), "--rules", ",".join(RULES), "--attacks", ",".join(ATTACKS),
                         "--fractions", ",".join(map(str, FRACTIONS)), "--seeds", "2",
                         "--set", "training.rounds=1", "--out", str(out)])
    return {"code": code, "out": out, "engine": engine, "stdout": stdout.getvalue(),
            "rows": read_rows(out / "robustness.csv"), "summary": read_rows(out / "robustness_summary.csv"),
            "worst": read_rows(out / "robustness_worst.csv")}


# --- the matrix through the FakeGrid ---------------------------------------------------------------------------


def test_matrix_writes_a_row_per_run_in_one_engine(matrix):
    out, rows, engine = matrix["out"], matrix["rows"], matrix["engine"]
    assert matrix["code"] == 0
    seeds = multiseed.study_seeds(0, 2)
    expected = [(rule, robustness.CLEAN, 0.0) for rule in RULES]
    expected += [(rule, attack, fraction) for rule in RULES for attack in ATTACKS for fraction in FRACTIONS]
    assert len(rows) == len(expected) * 2 == 20  # clean runs included
    assert sorted((*cell_of(r), int(r["seed"])) for r in rows) == sorted((*c, s) for c in expected for s in seeds)
    assert list(rows[0]) == list(robustness.ROW_COLUMNS)
    assert engine.opened == 1 and len(engine.runs) == 20  # every run shares the one engine
    for row in rows:
        rule, attack, fraction = cell_of(row)
        folder = out / rule / f"{attack}-{robustness.fraction_label(fraction)}" / f"seed-{row['seed']}"
        assert folder.is_dir() and folder in engine.runs
        variant = load_scenario(folder / "scenario.yaml")
        assert (variant.fusion.rule, variant.seed) == (rule, int(row["seed"]))
        assert int(row["adversaries"]) == len(adversary.assign(variant))
        assert float(row["final_accuracy"]) == pytest.approx(read_metrics(folder)[-1]["accuracy"])
    # Tiers of 5: 0.2 plants round(1.0) = 1 per tier, 0.4 plants 2; the clean runs none.
    assert {int(r["adversaries"]) for r in rows if cell_of(r)[2] == 0.2} == {2}
    assert {int(r["adversaries"]) for r in rows if cell_of(r)[2] == 0.4} == {4}
    assert {int(r["adversaries"]) for r in rows if r["attack"] == "none"} == {0}
    assert (out / "fedavg" / "none-0").is_dir() and (out / "robustness.png").read_bytes().startswith(PNG)
    assert "fed-deq robustness" in matrix["stdout"] and f"outputs in {out}/" in matrix["stdout"]


def test_summary_means_are_the_means_of_the_rows(matrix):
    rows, summary = matrix["rows"], matrix["summary"]
    assert len(summary) == 10 and list(summary[0]) == list(robustness.SUMMARY_COLUMNS)
    for entry in summary:
        mine = [r for r in rows if cell_of(r) == cell_of(entry)]
        assert int(entry["runs"]) == len(mine) == 2
        finals = [float(r["final_accuracy"]) for r in mine]
        assert float(entry["final_accuracy_mean"]) == pytest.approx(sum(finals) / 2)
        assert float(entry["best_accuracy_mean"]) == pytest.approx(sum(float(r["best_accuracy"]) for r in mine) / 2)
        assert float(entry["rejected_adversaries_mean"]) == pytest.approx(
            sum(int(r["rejected_adversaries"]) for r in mine) / 2)
        if entry["attack"] == "none":
            assert entry["final_accuracy_diff_n"] == "0" and entry["final_accuracy_diff_mean"] == ""
            continue
        clean = {r["seed"]: float(r["final_accuracy"]) for r in rows
                 if r["rule"] == entry["rule"] and r["attack"] == "none"}
        diffs = [float(r["final_accuracy"]) - clean[r["seed"]] for r in mine]
        assert float(entry["final_accuracy_diff_mean"]) == pytest.approx(sum(diffs) / 2)


def test_rejections_count_planted_partitions_apart_from_honest_ones(matrix):
    out, rows = matrix["out"], matrix["rows"]
    caught = 0
    for row in rows:
        folder = out / row["rule"] / f"{row['attack']}-{robustness.fraction_label(float(row['fraction']))}" \
            / f"seed-{row['seed']}"
        planted = {str(pid) for pid in adversary.assign(load_scenario(folder / "scenario.yaml"))}
        (record,) = read_metrics(folder)  # one round
        rejected = set(record["rejected"])
        answered = rejected | set(record["fusion_weights"]) | set(record["dropped"]) | set(record["failed"])
        assert int(row["rejected_adversaries"]) == len(rejected & planted)
        assert int(row["rejected_honest"]) == len(rejected - planted)
        assert int(row["dropped"]) == record["clients_dropped"] and int(row["failed"]) == record["clients_failed"]
        if row["attack"] == "nan_update":
            # A NaN update is always rejected: every planted partition the round sampled, and it is not fused.
            assert int(row["rejected_adversaries"]) == len(planted & answered)
            assert not planted & set(record["fusion_weights"])
            caught += int(row["rejected_adversaries"])
        if row["attack"] == "none":
            assert row["rejected_adversaries"] == "0"
    assert caught > 0  # the sampled rounds did include planted partitions


def test_worst_case_is_the_attack_with_the_lowest_mean(matrix):
    summary, worst = matrix["summary"], matrix["worst"]
    assert len(worst) == len(RULES) * len(FRACTIONS)
    for entry in worst:
        cells = [s for s in summary if s["rule"] == entry["rule"] and s["attack"] != "none"
                 and float(s["fraction"]) == float(entry["fraction"])]
        lowest = min(float(s["final_accuracy_mean"]) for s in cells)
        first_lowest = next(s for s in cells if float(s["final_accuracy_mean"]) == lowest)  # ties: first listed
        assert entry["attack"] == first_lowest["attack"]
        assert float(entry["final_accuracy_mean"]) == pytest.approx(lowest)
        clean = next(s for s in summary if s["rule"] == entry["rule"] and s["attack"] == "none")
        assert float(entry["clean_final_accuracy_mean"]) == pytest.approx(float(clean["final_accuracy_mean"]))


# --- known accuracies: intervals, paired differences and worst cases by hand ------------------------------------


class TableRunner:
    """Writes one round whose test accuracy is ``clean[rule][seed index] - drop[(attack, fraction)]``."""

    CLEAN = {"fedavg": (0.80, 0.82, 0.84), "fedmedian": (0.70, 0.70, 0.73)}
    DROP = {("none", 0.0): 0.0, ("fake_accuracy", 0.1): 0.01, ("fake_accuracy", 0.3): 0.20,
            ("nan_update", 0.1): 0.05, ("nan_update", 0.3): 0.10}

    def __init__(self, seeds, interrupt_on: int | None = None):
        self.seeds, self.interrupt_on, self.calls = seeds, interrupt_on, []

    def __call__(self, scenario, out_dir, name):
        self.calls.append((scenario, Path(out_dir)))
        if len(self.calls) == self.interrupt_on:
            raise KeyboardInterrupt
        entries = scenario.adversaries
        attack, share = (entries[0].attack, entries[0].share) if entries else ("none", 0.0)
        accuracy = self.CLEAN[scenario.fusion.rule][self.seeds.index(scenario.seed)] - self.DROP[(attack, share)]
        with results.MetricsWriter(out_dir) as writer:
            writer.write_round({"round": 1, "accuracy": accuracy, "sim_time_s": 1.0,
                                "rejected": {"0": "x", "1": "y"}, "clients_dropped": 1, "clients_failed": 0})
        return {}


def scripted(tmp_path, **kw):
    runner = TableRunner(multiseed.study_seeds(0, 3), **kw)
    result = robustness.robustness(tiny_scenario(), ["fedavg", "fedmedian"], ["fake_accuracy", "nan_update"],
                                   [0.1, 0.3], tmp_path, seeds=3, run=runner, console=_quiet())
    return runner, result


def _quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


def test_known_accuracies_give_the_summary_and_worst_cases_by_hand(tmp_path):
    runner, result = scripted(tmp_path)
    assert len(runner.calls) == 2 * 5 * 3 and result.seeds == multiseed.study_seeds(0, 3)
    # Seed by seed; per rule the clean run first; every tier gets the fraction as its share.
    order = [(s.seed, s.fusion.rule, tuple((e.tier, e.attack, e.share) for e in s.adversaries))
             for s, _ in runner.calls]
    assert [seed for seed, _, _ in order] == [seed for seed in result.seeds for _ in range(10)]
    assert order[0][1:] == ("fedavg", ()) and order[5][1:] == ("fedmedian", ())
    assert order[1][1:] == ("fedavg", (("slow", "fake_accuracy", 0.1), ("fast", "fake_accuracy", 0.1)))
    assert runner.calls[4][1] == tmp_path / "fedavg" / "nan_update-0.3" / f"seed-{result.seeds[0]}"
    cell = next(s for s in result.summary if (s["rule"], s["attack"], s["fraction"]) == ("fedavg", "nan_update", 0.3))
    half = T_975_2 * 0.02 / math.sqrt(3)  # finals 0.70, 0.72, 0.74: s = 0.02
    assert cell["final_accuracy_mean"] == pytest.approx(0.72)
    assert (cell["final_accuracy_ci_low"], cell["final_accuracy_ci_high"]) == pytest.approx((0.72 - half, 0.72 + half),
                                                                                           rel=1e-3)
    # Paired with the clean run seed by seed: -0.10 every time, so no spread at all.
    assert cell["final_accuracy_diff_mean"] == pytest.approx(-0.10)
    assert cell["final_accuracy_diff_ci_low"] == pytest.approx(-0.10)
    assert cell["adversaries"] == 4 and cell["rejected_adversaries_mean"] + cell["rejected_honest_mean"] == 2
    # Worst: at 0.1 nan_update (drop 0.05), at 0.3 fake_accuracy (drop 0.20), for both rules.
    assert [(w["rule"], w["fraction"], w["attack"]) for w in result.worst] == [
        ("fedavg", 0.1, "nan_update"), ("fedavg", 0.3, "fake_accuracy"),
        ("fedmedian", 0.1, "nan_update"), ("fedmedian", 0.3, "fake_accuracy")]
    median = result.worst[3]
    assert median["final_accuracy_mean"] == pytest.approx(0.71 - 0.20)
    assert median["clean_final_accuracy_mean"] == pytest.approx(0.71)
    assert read_rows(tmp_path / "robustness_worst.csv")[3]["attack"] == "fake_accuracy"
    assert robustness.worst_table(result).row_count == 4


def test_an_interrupted_matrix_keeps_its_rows_and_plot(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        scripted(tmp_path, interrupt_on=8)
    rows = read_rows(tmp_path / "robustness.csv")
    assert [r["attack"] for r in rows] == ["none", *["fake_accuracy"] * 2, *["nan_update"] * 2, "none", "fake_accuracy"]
    summary = read_rows(tmp_path / "robustness_summary.csv")
    assert len(summary) == 7 and all(s["runs"] == "1" for s in summary)
    assert (tmp_path / "robustness.png").read_bytes().startswith(PNG)


def test_variants_plant_a_share_of_every_tier_rounded_half_up():
    scenario = tiny_scenario()
    for fraction, planted in ((0.1, 2), (0.3, 4), (1.0, 10)):  # tiers of 5: 0.5 -> 1, 1.5 -> 2, 5
        variant = robustness.variant_scenario(scenario, ("fedmedian", "nan_update", fraction), 7)
        assert (variant.fusion.rule, variant.seed) == ("fedmedian", 7)
        assert [(e.tier, e.share) for e in variant.adversaries] == [("slow", fraction), ("fast", fraction)]
        assert len(adversary.assign(variant)) == planted
    assert robustness.variant_scenario(scenario, ("fedmedian", "none", 0.0), 7).adversaries == ()
    assert [robustness.fraction_label(f) for f in (0.1, 1.0, 0.0)] == ["0.1", "1", "0"]


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--rules", "fedavg,fedsgd"], "--rules"),
    (["--attacks", "nan_update,nan_updat"], "--attacks"),
    (["--fractions", "0,0.2"], "--fractions"),
    (["--fractions", "1.5"], "--fractions"),
    (["--fractions", "0.2,0.20"], "--fractions"),
    (["--fractions", "a"], "--fractions"),
    (["--seeds", "0"], "--seeds"),
    (["--set", "adversaries=[{tier: slow, count: 1, attack: nan_update}]"], "already plants adversaries"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    engine = FakeGridEngine()
    monkeypatch.setattr(runs, "study_engine", engine)
    out = tmp_path / "matrix"
    options = {"--rules": "fedavg", "--attacks": "nan_update", "--fractions": "0.2"}
    options.update(dict(zip(argv[::2], argv[1::2])))
    code = cli_main(["robustness", str(DIGITS), *(x for pair in options.items() for x in pair), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and engine.opened == 0


def test_the_function_checks_its_input_too(tmp_path):
    with pytest.raises(InputError, match="more than once"):
        robustness.robustness(tiny_scenario(), ["fedavg"], ["nan_update", "nan_update"], [0.2], tmp_path, run=print)
    with pytest.raises(InputError, match="already plants adversaries"):
        robustness.robustness(tiny_scenario("adversaries=[{tier: fast, share: 0.2, attack: nan_update}]"),
                              ["fedavg"], ["nan_update"], [0.2], tmp_path, run=print)
    assert list(tmp_path.iterdir()) == []
