"""Helpers for tests that run the real Axolotl CLI (imported by name: ``from cli_helpers import ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


def shared_file(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the test needs the shared data checked out beside the repo (../shared)")
    return path


def axolotl_template(name: str) -> str:
    """A chat template shipped with Axolotl 0.19.0 (read from the installed package)."""
    import importlib.util

    spec = importlib.util.find_spec("axolotl")
    if spec is None:
        pytest.skip("axolotl is not installed")
    path = Path(spec.origin).parent / "utils" / "chat_templates" / "templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


class AxolotlRun:
    def __init__(self, proc: subprocess.CompletedProcess, cfg: dict):
        self.returncode = proc.returncode
        self.output = proc.stdout
        self.cfg = cfg

    def log_history(self) -> list[dict]:
        """``log_history`` of the last checkpoint's trainer_state.json."""
        states = sorted(Path(self.cfg["output_dir"]).glob("checkpoint-*/trainer_state.json"),
                        key=lambda p: int(p.parent.name.split("-")[1]))
        assert states, f"no checkpoint with trainer_state.json in {self.cfg['output_dir']}:\n{self.output[-3000:]}"
        return json.loads(states[-1].read_text())["log_history"]

    def prepared_dataset(self):
        from datasets import load_from_disk

        dirs = [p.parent for p in Path(self.cfg["dataset_prepared_path"]).glob("*/dataset_info.json")]
        assert len(dirs) == 1, f"expected one prepared dataset, found {dirs}"
        return load_from_disk(str(dirs[0]))


def run_axolotl(command: str, cfg: dict, path: Path, timeout: int = 600) -> AxolotlRun:
    """Run ``python -m axolotl.cli.<command> <path>`` after writing ``cfg`` to ``path``."""
    from instruction_modelling.axolotl.configs import write_config

    write_config(cfg, path)
    proc = subprocess.run(
        [sys.executable, "-m", f"axolotl.cli.{command}", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return AxolotlRun(proc, cfg)
