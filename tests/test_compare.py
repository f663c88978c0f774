"""fed-deq compare over seeds: per-run rows, per-rule means with Student-t intervals checked by hand, paired
differences against the baseline, seed derivation, the plot, an interrupted compare, and bad input. Runs go
through a scripted runner with known accuracies, or the in-process FakeGrid (real ServerApp + ClientApp, no Ray)."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path

import pytest

from clients.app import app as client_app
from fed_deq import results
from fed_deq.errors import InputError
from fed_deq.results import read_metrics
from fed_deq.scenario import load_scenario
from fed_deq.workload import fleet_size
from server.federation import run_federation
from tests.fakegrid import FakeGrid
from tools import compare, multiseed, runs
from tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "scenarios" / "digits-iid.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
#: Student t quantiles t(0.975, df) from a printed table, to check scipy's by hand.
T_975 = {1: 12.706, 2: 4.303}


def tiny_scenario(*extra: str):
    return load_scenario(DIGITS, ["training.rounds=2", "training.clients_per_round=3", *extra])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class TableRunner:
    """Writes three rounds whose test accuracy is ``final[(rule, seed index)] * (0.5, 0.9, 1)``: known figures."""

    def __init__(self, seeds: list[int], final: dict[tuple[str, int], float], interrupt_on: int | None = None):
        self.seeds, self.final, self.interrupt_on = seeds, final, interrupt_on
        self.calls: list[tuple[str, int, Path]] = []

    def __call__(self, scenario, out_dir: Path, name: str) -> dict:
        self.calls.append((scenario.fusion.rule, scenario.seed, Path(out_dir)))
        if len(self.calls) == self.interrupt_on:
            raise KeyboardInterrupt
        final = self.final[(scenario.fusion.rule, self.seeds.index(scenario.seed))]
        with results.MetricsWriter(out_dir) as writer:
            for number, share in ((1, 0.5), (2, 0.9), (3, 1.0)):
                writer.write_round({"round": number, "accuracy": final * share, "sim_time_s": 10.0 * number,
                                    "cumulative_bytes": 1000 * number})
        return {}


FINALS = {("fedavg", 0): 0.80, ("fedavg", 1): 0.82, ("fedavg", 2): 0.84,
          ("quality", 0): 0.85, ("quality", 1): 0.86, ("quality", 2): 0.90}


def three_seed_compare(tmp_path, target=0.76, **kw):
    seeds = multiseed.study_seeds(0, 3)
    runner = TableRunner(seeds, FINALS, **kw)
    comparison = compare.compare(tiny_scenario(), ["fedavg", "quality"], tmp_path, seeds=3, target=target,
                                 run=runner)
    return runner, comparison


# --- seeds and intervals ---------------------------------------------------------------------------------------


def test_study_seeds_start_with_the_scenario_seed_and_are_derived_from_it():
    seeds = multiseed.study_seeds(7, 5)
    assert seeds[0] == 7 and len(set(seeds)) == 5
    assert multiseed.study_seeds(7, 5) == seeds and multiseed.study_seeds(7, 3) == seeds[:3]
    assert multiseed.study_seeds(8, 5)[1:] != seeds[1:] and multiseed.study_seeds(7, 1) == [7]
    with pytest.raises(InputError, match="--seeds"):
        multiseed.check_seeds(0)


def test_mean_interval_by_hand():
    interval = multiseed.mean_interval([0.80, 0.82, 0.84])
    half = T_975[2] * 0.02 / math.sqrt(3)  # s = 0.02
    assert interval.n == 3 and interval.mean == pytest.approx(0.82)
    assert interval.low == pytest.approx(0.82 - half, rel=1e-4) and interval.high == pytest.approx(0.82 + half, rel=1e-4)
    assert multiseed.mean_interval([0.5, None]) == multiseed.Interval(1, 0.5, None, None)  # one value: no interval
    assert multiseed.mean_interval([]) == multiseed.Interval(0, None, None, None)


# --- compare.csv and compare_summary.csv ------------------------------------------------------------------


def test_three_seeds_give_per_run_rows_and_per_rule_intervals_checked_by_hand(tmp_path):
    runner, comparison = three_seed_compare(tmp_path)
    seeds = multiseed.study_seeds(0, 3)
    assert comparison.seeds == seeds and comparison.baseline == "fedavg"
    # Seed by seed, every rule on it, so an interrupted compare has whole pairs.
    assert [(rule, seed) for rule, seed, _ in runner.calls] == [(r, s) for s in seeds for r in ("fedavg", "quality")]
    assert all(path == tmp_path / rule / f"seed-{seed}" for rule, seed, path in runner.calls)

    rows = read_rows(tmp_path / "compare.csv")
    assert list(rows[0]) == list(compare.COMPARE_COLUMNS)
    assert [(r["rule"], int(r["seed"])) for r in rows] == [(rule, seed) for rule, seed, _ in runner.calls]
    for row in rows:
        final = FINALS[(row["rule"], seeds.index(int(row["seed"])))]
        assert float(row["final_accuracy"]) == pytest.approx(final)
        assert float(row["best_accuracy"]) == pytest.approx(final)
        # Target 0.76: round 2 (0.9 x final) reaches it from final 0.845 up, else round 3.
        expected_round = 2 if 0.9 * final >= 0.76 else 3
        assert float(row["sim_time_to_target_s"]) == 10.0 * expected_round

    fedavg, quality = read_rows(tmp_path / "compare_summary.csv")
    assert list(fedavg) == multiseed.summary_columns(with_baseline=True)
    assert (fedavg["rule"], fedavg["baseline"], fedavg["seeds"]) == ("fedavg", "fedavg", "3")
    half = T_975[2] * 0.02 / math.sqrt(3)
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(0.82)
    assert float(fedavg["final_accuracy_ci_low"]) == pytest.approx(0.82 - half, rel=1e-4)
    assert float(fedavg["final_accuracy_ci_high"]) == pytest.approx(0.82 + half, rel=1e-4)
    assert fedavg["final_accuracy_diff_mean"] == "" and fedavg["final_accuracy_diff_n"] == "0"

    # quality - fedavg per seed: 0.05, 0.04, 0.06 -> mean 0.05, s 0.01.
    diff_half = T_975[2] * 0.01 / math.sqrt(3)
    assert int(quality["final_accuracy_diff_n"]) == 3
    assert float(quality["final_accuracy_diff_mean"]) == pytest.approx(0.05)
    assert float(quality["final_accuracy_diff_ci_low"]) == pytest.approx(0.05 - diff_half, rel=1e-4)
    assert float(quality["final_accuracy_diff_ci_high"]) == pytest.approx(0.05 + diff_half, rel=1e-4)

    # Time to target: quality reaches 0.76 at round 2 on every seed (0.765, 0.774, 0.81), fedavg only at
    # round 3 (0.72, 0.738, 0.756 at round 2): paired differences -10 s on every seed, so no spread.
    assert int(quality["sim_time_to_target_s_n"]) == 3 and float(quality["sim_time_to_target_s_mean"]) == 20.0
    assert int(fedavg["sim_time_to_target_s_n"]) == 3 and float(fedavg["sim_time_to_target_s_mean"]) == 30.0
    assert float(quality["sim_time_to_target_s_diff_mean"]) == pytest.approx(-10.0)
    assert float(quality["sim_time_to_target_s_diff_ci_low"]) == pytest.approx(-10.0)

    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)
    table = compare.compare_table(comparison, 0.76)
    assert table.row_count == 2


def test_time_to_target_counts_only_the_seeds_that_reached_it(tmp_path):
    _, comparison = three_seed_compare(tmp_path, target=0.85)
    fedavg, quality = comparison.summary
    # fedavg ends at 0.80-0.84: it never reaches 0.85; quality reaches it at round 3 on every seed.
    assert fedavg["sim_time_to_target_s_n"] == 0 and fedavg["sim_time_to_target_s_mean"] is None
    assert quality["sim_time_to_target_s_n"] == 3 and quality["sim_time_to_target_s_mean"] == 30.0
    assert [r["sim_time_to_target_s"] for r in comparison.rows if r["rule"] == "fedavg"] == [None, None, None]
    assert quality["sim_time_to_target_s_diff_n"] == 0  # no seed where both reached it
    rows = read_rows(tmp_path / "compare_summary.csv")
    assert rows[0]["sim_time_to_target_s_mean"] == "" and rows[0]["sim_time_to_target_s_n"] == "0"


def test_bytes_to_target_comes_from_the_rows_byte_counts(tmp_path):
    if not hasattr(results, "bytes_to_target"):
        pytest.fail("fed_deq.results.bytes_to_target is missing")
    _, comparison = three_seed_compare(tmp_path, target=0.85)
    quality = comparison.summary[1]
    assert quality["bytes_to_target_n"] == 3 and quality["bytes_to_target_mean"] == 3000


def test_one_seed_leaves_the_intervals_empty_and_adds_the_baseline(tmp_path):
    runner = TableRunner([0], {("fedavg", 0): 0.8, ("quality", 0): 0.9})
    comparison = compare.compare(tiny_scenario(), ["quality"], tmp_path, target=0.5, run=runner)
    assert [rule for rule, _, _ in runner.calls] == ["fedavg", "quality"]  # the baseline runs first, added
    assert [seed for _, seed, _ in runner.calls] == [0, 0]  # one seed: the scenario's own
    fedavg, quality = read_rows(tmp_path / "compare_summary.csv")
    assert float(quality["final_accuracy_mean"]) == pytest.approx(0.9)
    assert quality["final_accuracy_ci_low"] == quality["final_accuracy_ci_high"] == ""
    assert float(quality["final_accuracy_diff_mean"]) == pytest.approx(0.1) and quality["final_accuracy_diff_ci_low"] == ""
    assert comparison.summary[1]["final_accuracy_ci_low"] is None


def test_an_interrupted_compare_keeps_its_finished_rows_and_summary(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        three_seed_compare(tmp_path, interrupt_on=4)
    rows = read_rows(tmp_path / "compare.csv")
    assert [r["rule"] for r in rows] == ["fedavg", "quality", "fedavg"]
    fedavg, quality = read_rows(tmp_path / "compare_summary.csv")
    assert fedavg["seeds"] == "2" and quality["seeds"] == "1" and quality["final_accuracy_diff_n"] == "1"
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)


def test_mean_curve_bands_are_per_round_intervals():
    curves = [[{"round": 1, "accuracy": 0.2, "sim_time_s": 1.0}, {"round": 2, "accuracy": 0.4, "sim_time_s": 3.0}],
              [{"round": 1, "accuracy": 0.4, "sim_time_s": 2.0}, {"round": 2, "accuracy": 0.6, "sim_time_s": 5.0}]]
    xs, bands = compare.mean_curve(curves, "sim_time_s")
    assert xs == [1.5, 4.0]
    assert [b.mean for b in bands] == pytest.approx([0.3, 0.5])
    half = T_975[1] * math.sqrt(0.02) / math.sqrt(2)  # s of (0.2, 0.4) is sqrt(0.02)
    assert bands[0].high == pytest.approx(0.3 + half, rel=1e-4)


# --- the command line -------------------------------------------------------------------------------------------


class FakeGridEngine:
    """Stands in for runs.study_engine: one engine per compare, runs through the FakeGrid."""

    def __init__(self):
        self.opened, self.runs = 0, []

    @contextlib.contextmanager
    def __call__(self, scenario, jobs=1, tensorboard=False):
        self.opened += 1

        def run(variant, out_dir, name):
            self.runs.append(Path(out_dir))
            return run_federation(FakeGrid(client_app, fleet_size(variant), seed=variant.seed), variant, out_dir,
                                  name=name)

        yield run


def test_cli_compare_three_seeds_writes_rows_and_summaries_in_one_engine(tmp_path, monkeypatch, capsys):
    engine = FakeGridEngine()
    monkeypatch.setattr(runs, "study_engine", engine)
    out = tmp_path / "cmp"
    code = cli_main(["compare", str(DIGITS), "--rules", "fedavg,quality", "--seeds", "3", "--set",
                     "training.rounds=2", "--target", "0.3", "--out", str(out)])
    assert code == 0
    assert engine.opened == 1 and len(engine.runs) == 6
    rows = read_rows(out / "compare.csv")
    assert len(rows) == 6 and {int(r["seed"]) for r in rows} == set(multiseed.study_seeds(0, 3))
    for row in rows:
        metrics = read_metrics(out / row["rule"] / f"seed-{row['seed']}")
        scenario = load_scenario(out / row["rule"] / f"seed-{row['seed']}" / "scenario.yaml")
        assert (scenario.fusion.rule, scenario.seed) == (row["rule"], int(row["seed"]))
        assert float(row["final_accuracy"]) == pytest.approx(metrics[-1]["accuracy"])
    summary = read_rows(out / "compare_summary.csv")
    assert [s["rule"] for s in summary] == ["fedavg", "quality"]
    for entry in summary:
        finals = [float(r["final_accuracy"]) for r in rows if r["rule"] == entry["rule"]]
        interval = multiseed.mean_interval(finals)
        assert float(entry["final_accuracy_mean"]) == pytest.approx(interval.mean)
        assert float(entry["final_accuracy_ci_low"]) <= interval.mean <= float(entry["final_accuracy_ci_high"])
    assert "fed-deq compare" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--rules", "fedavg,fedsgd"], "fedsgd"),
    (["--rules", "quality", "--baseline", "fedsgd"], "--baseline"),
    (["--rules", "quality", "--seeds", "0"], "--seeds"),
    (["--rules", "quality", "--target", "0"], "--target"),
])
def test_compare_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(DIGITS), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(InputError, match="more than once"):
        compare.parse_rules("quality,quality")
