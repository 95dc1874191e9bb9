"""The package's layers (docs/design.md): import-linter's contracts hold on the tree, a wrong import
breaks them, and no module imports another package's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "plugin" / "instruction_modelling"
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts, over the packages found under ``root``."""
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=300)


def test_the_layer_contracts_hold():
    proc = lint(REPO / "plugin", REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("instruction_modelling/core/segments.py", "import axolotl.utils", "never import Axolotl"),
    ("instruction_modelling/core/losses.py", "from instruction_modelling.axolotl import trainer", "Layers"),
    ("instruction_modelling/commands/recipes.py", "from instruction_modelling.quickstart import tiny", "Layers"),
    ("eval_suite/__init__.py", "import instruction_modelling.core.losses", "evaluation suite"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, contract):
    shutil.copytree(PKG, tmp_path / "instruction_modelling", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "eval_suite", tmp_path / "eval_suite", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path, tmp_path).returncode == 0  # the copy is clean before the edit
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # deliberately wrong\n")
    proc = lint(tmp_path, tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert contract in proc.stdout.split("Broken contracts")[-1], proc.stdout


def private_imports(path: Path, source: str | None = None) -> list[str]:
    """``from X import _name`` where X is in another sub-package of instruction_modelling."""
    rel = path.relative_to(PKG)
    own = rel.parts[0] if len(rel.parts) > 1 else ""  # sub-package ("core", ...) or "" at the root
    package = ["instruction_modelling", *rel.parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
        else:
            target = (node.module or "").split(".")
        if target[0] != "instruction_modelling":
            continue
        theirs = target[1] if len(target) > 1 else ""
        names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        if names and theirs != own:
            found.append(f"{rel}:{node.lineno} imports {', '.join(names)} from {'.'.join(target)}")
    return found


def test_no_module_imports_another_packages_private_names():
    found = [f for p in sorted(PKG.rglob("*.py")) for f in private_imports(p)]
    assert not found, found
    # the check sees such an import (so the assertion above can fail)
    wrong = "from ..core.kl import _chunk_kl\nfrom .segments import _private_ok\n"
    assert private_imports(PKG / "commands" / "preview.py", wrong) == [
        "commands/preview.py:1 imports _chunk_kl from instruction_modelling.core.kl"]
