"""Flower ServerApp of fed-deq (used by `flwr run .` and deployments; simulation builds its own)."""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_deq.scenario import load_scenario
from server.federation import run_federation

app = ServerApp()


def _scenario_path(value: str) -> Path:
    """A run-config scenario path: absolute, or relative to the app directory (where this package lives)."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parent.parent / path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario named by the run config (`scenario`, `out-dir`, `set`)."""
    cfg = context.run_config
    path = _scenario_path(str(cfg.get("scenario", "scenarios/default.yaml")))
    scenario = load_scenario(path, overrides=shlex.split(str(cfg.get("set", ""))))
    out_dir = str(cfg.get("out-dir", "")) or f"runs/{path.stem}"
    run_federation(grid, scenario, out_dir, name=path.stem, timeout_s=scenario.simulation.round_timeout_s)
