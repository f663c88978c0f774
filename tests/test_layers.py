"""The house's layers, as pyproject.toml's import-linter contracts state them: kept, and able to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fed_deq", "clients", "server", "wire", "tools")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at ``cwd`` (its pyproject.toml, its packages first on the path)."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(dest: Path) -> Path:
    """The packages and pyproject.toml, copied so one file can be broken on purpose."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("fed_deq/fusion.py", "import flwr.app", "the core imports no Flower"),
    ("fed_deq/fusion.py", "import server.federation", "tools above the Flower adapters"),
    ("clients/app.py", "import server.records", "tools above the Flower adapters"),
    ("wire/records.py", "import tools.cli", "tools above the Flower adapters"),
])
def test_a_deliberate_violation_breaks_a_contract(tmp_path, module, line, contract):
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _violation():\n    {line}  # noqa: F401\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
