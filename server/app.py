"""Flower ServerApp of fed-deq (used by `flwr run .` and deployments; simulation builds its own)."""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_deq.errors import InputError
from fed_deq.scenario import load_scenario
from server.federation import run_federation

app = ServerApp()


def _scenario_path(value: str) -> Path:
    """A run-config scenario path: absolute, or relative to the app directory (where this package lives)."""
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parent.parent / path


def run_config_flag(config, key: str) -> bool:
    """A true/false run-config value (TOML ``true``/``false``, or those words as a string); anything else is an
    InputError naming the key. Missing means false."""
    value = config.get(key, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise InputError(f"run config {key}: must be true or false, got {value!r}")
    return value


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario named by the run config (`scenario`, `out-dir`, `set`; `tensorboard = true` also
    writes TensorBoard scalars to OUT_DIR/tb)."""
    cfg = context.run_config
    tensorboard = run_config_flag(cfg, "tensorboard")
    path = _scenario_path(str(cfg.get("scenario", "scenarios/default.yaml")))
    scenario = load_scenario(path, overrides=shlex.split(str(cfg.get("set", ""))))
    out_dir = str(cfg.get("out-dir", "")) or f"runs/{path.stem}"
    run_federation(grid, scenario, out_dir, name=path.stem, timeout_s=scenario.simulation.round_timeout_s,
                   tensorboard=tensorboard)
