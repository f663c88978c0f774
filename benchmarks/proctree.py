"""Peak memory of a whole process tree (a `fed-deq simulate` and every Ray process it starts), from /proc.

Ray's GCS server, raylet and workers are all descendants of the driver on a local run, so summing the tree
catches them. Both the RSS sum (an upper bound: shared pages, e.g. torch's libraries, count once per process)
and the PSS sum (shared pages split between their users) are sampled; ``large_fleet_peak_rss_gib`` is the RSS
sum, the conservative one.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def children_map() -> dict[int, list[int]]:
    """Parent pid → child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        # The command name may contain spaces and parentheses: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    tree, found, stack = children_map(), [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0, 0
    pss = rss
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
                break
    except OSError:
        pass  # no smaps_rollup (old kernel, or gone): fall back to RSS
    return rss, pss


@dataclass
class TreePeak:
    """Largest sums seen over the samples, and how many processes the tree had then."""

    rss_kib: int = 0
    pss_kib: int = 0
    processes: int = 0
    samples: int = 0

    @property
    def rss_gib(self) -> float:
        """Peak RSS sum in GiB."""
        return self.rss_kib / 2**20

    @property
    def pss_gib(self) -> float:
        """Peak PSS sum in GiB."""
        return self.pss_kib / 2**20


class TreeSampler:
    """Samples the memory of ``pid``'s tree every ``interval_s`` in a background thread (context manager)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = TreePeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        """One sample of the whole tree."""
        pids = descendants(self.pid)
        sums = [memory_kib(pid) for pid in pids]
        rss, pss = sum(s[0] for s in sums), sum(s[1] for s in sums)
        self.peak.samples += 1
        if rss > self.peak.rss_kib:
            self.peak.rss_kib, self.peak.processes = rss, len(pids)
        self.peak.pss_kib = max(self.peak.pss_kib, pss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measured:
    """A finished command: exit code, wall seconds, memory peak of its tree."""

    returncode: int
    wall_s: float
    peak: TreePeak
    log: Path


def run_measured(command: list[str], log: Path, cwd: Path | None = None) -> Measured:
    """Run ``command`` to completion (output to ``log``), timing it and sampling its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        with TreeSampler(process.pid) as sampler:
            process.wait()
        wall = time.perf_counter() - started
    return Measured(process.returncode, wall, sampler.peak, log)
