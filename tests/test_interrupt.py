"""Ctrl-C ends a `fed-deq simulate` run: exit 130 within 10 s, finished rounds kept, no Ray process left.

The fast tests check the two places that honour the stop: the exchange with the clients and the round loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fed_deq.rounds import run_rounds
from server.federation import send_and_receive

ROOT = Path(__file__).resolve().parent.parent
FIRST_ROUND_WAIT_S = 300  # Ray's start and the first round; a loaded machine is slow
EXIT_WAIT_S = 10          # the promise: Ctrl-C ends the run within 10 s


def session_processes(session_id: int) -> dict[int, str]:
    """Live (not zombie) processes of a session, pid -> command name: the run and everything Ray started for it."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        state, _ppid, _pgrp, session = text[text.rindex(")") + 2:].split()[:4]
        if int(session) == session_id and state not in "ZX":
            found[int(stat.parent.name)] = name
    return found


def start_run(scenario: Path, out: Path, log: Path) -> subprocess.Popen:
    """`fed-deq simulate` in a session of its own, with Ctrl-C at its default even if ours is ignored."""
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "simulate", str(scenario), "--out", str(out), "--no-progress",
         "--set", "training.rounds=500"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_first_round(proc: subprocess.Popen, metrics: Path, log: Path) -> None:
    """Return once metrics.jsonl has a line; fail if the run ends or takes too long to get there."""
    deadline = time.monotonic() + FIRST_ROUND_WAIT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, f"the run ended before its first round:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no round after {FIRST_ROUND_WAIT_S}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


class SilentGrid:
    """A Grid whose first pull returns one reply and later pulls nothing; it sets ``stop`` on its third pull."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop, self.pulls = stop, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls == 3:
            self.stop.set()
        reply = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))
        return [reply] if self.pulls == 1 else []


def test_the_exchange_returns_the_replies_so_far_once_stopped():
    stop = threading.Event()
    grid = SilentGrid(stop)
    replies = send_and_receive(grid, ["to node a", "to node b"], timeout_s=3600, stop=stop)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and grid.pulls == 3


def test_the_round_loop_records_finished_rounds_only():
    stop = threading.Event()
    recorded, closed = [], []

    def exchange(open_round):
        if open_round == 3:
            stop.set()  # Ctrl-C while round 3's clients are training
        return [], []

    driver = SimpleNamespace(scenario=SimpleNamespace(training=SimpleNamespace(rounds=10), adversaries=()),
                             initial_arrays=lambda: "initial", open_round=lambda r, arrays: r,
                             close_round=lambda r, replies, offline: closed.append(r) or (f"after {r}", None))
    recorder = SimpleNamespace(initial_model=lambda arrays: None,
                               record_round=lambda r, arrays, report: recorded.append((r, arrays)))
    assert run_rounds(driver, recorder, exchange, stop.is_set) == "after 2"
    assert closed == [1, 2] and recorded == [(1, "after 1"), (2, "after 2")]


@pytest.mark.ray
def test_ctrl_c_ends_the_run_keeps_its_rounds_and_leaves_no_ray_process(tiny_scenario_path, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_run(tiny_scenario_path, out, log)
    try:
        wait_for_first_round(proc, out / "metrics.jsonl", log)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        code = proc.wait(timeout=EXIT_WAIT_S)
        assert code == 130, log.read_text()[-3000:]
        rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rounds == list(range(1, len(rounds) + 1)) and 1 <= len(rounds) < 500
        summary = json.loads((out / "summary.json").read_text())
        assert summary["interrupted"] is True and summary["rounds"] == len(rounds)
        assert "Traceback" not in log.read_text()
        assert session_processes(proc.pid) == {}  # raylet, gcs_server, ray:: workers: all gone with the run
    finally:
        for pid in session_processes(proc.pid):  # only if the test failed: this run's leftovers, by pid
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
