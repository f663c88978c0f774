"""When a benchmark may reuse a run it finished earlier: the same scenario, made by the same code.

`make study` and the fusion study resume where they stopped by reusing finished run folders. A folder is
reused only if its run finished (a summary, not interrupted, every round), its scenario.yaml equals the
scenario the study would run now, and its ``CODE_FILE`` holds the digest of today's source: a run made
before a scenario or the code changed is run again, never reported as today's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from fed_deq import results
from fed_deq.scenario import Scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
#: The packages whose source decides what a run computes.
CODE_PACKAGES = ("fed_deq", "clients", "server", "wire", "tools")
#: Written into each run folder a benchmark makes: the digest of the code that made the run.
CODE_FILE = "study-code.txt"


def code_digest(root: Path = ROOT) -> str:
    """A digest of every Python file of ``CODE_PACKAGES`` (paths and contents): any edit changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for package in CODE_PACKAGES for p in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def finished_summary(scenario: Scenario, out_dir: Path, code: str) -> dict | None:
    """The summary of a finished, uninterrupted run of exactly ``scenario`` made by the code ``code`` in
    ``out_dir``, else None."""
    try:
        summary = json.loads((out_dir / results.SUMMARY_FILE).read_text(encoding="utf-8"))
        done = parse_scenario(yaml.safe_load((out_dir / "scenario.yaml").read_text(encoding="utf-8")), "run")
        made_by = (out_dir / CODE_FILE).read_text(encoding="utf-8").strip()
    except Exception:  # noqa: BLE001 - anything unreadable or invalid is simply run again
        return None
    if summary.get("interrupted") or done != scenario or summary.get("rounds") != scenario.training.rounds \
            or made_by != code:
        return None
    return summary


def mark_made_by(out_dir: Path, code: str) -> None:
    """Record in ``out_dir`` that its run was made by the code ``code``."""
    results.write_atomic(Path(out_dir) / CODE_FILE, code + "\n")
