"""The `im` entry point: commands, help with defaults, and third-party noise filtered at our entry points only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from instruction_modelling.commands.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")])}
ENV.pop("IM_VERBOSE", None)
# Messages that reach the user from imports of torchao, torch and bitsandbytes (Axolotl's environment).
NOISE = ("_C_mxfp8", "Failed to load", "is an Enum subclass", "publisher trust check", "gemm_4bit", '"base_model":')


def im(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``im ARGS`` as a user runs it: the installed console script when there is one, else its module."""
    script = Path(sys.executable).parent / "im"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "instruction_modelling.commands.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_help_lists_every_command():
    proc = im("--help")
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert f"  {name} " in proc.stdout
    assert "--verbose" in proc.stdout and "eval-suite" in proc.stdout
    unknown = im("frobnicate")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


@pytest.mark.parametrize("command, default", [
    ("diagnose", "(default: skip)"),
    ("preview", "(default: 2)"),
    ("quickstart", "(default: quickstart_out)"),
    ("data", "{list,prepare,stats}"),
    ("recipes", "(default: the checkout's recipes/"),
])
def test_command_help_shows_defaults(command, default):
    proc = im(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert default in " ".join(proc.stdout.split()), proc.stdout


def test_im_diagnose_is_python_m_diagnose():
    data = str(FIXTURES / "diag_alpaca.json")
    via_im = im("diagnose", data, "--json")
    via_module = subprocess.run([sys.executable, "-m", "instruction_modelling.diagnose", data, "--json"],
                                capture_output=True, text=True, env=ENV, timeout=300)
    assert via_im.returncode == via_module.returncode == 0, via_im.stderr + via_module.stderr
    assert via_im.stdout == via_module.stdout and '"ratio": 2.5' in via_im.stdout


def test_importing_the_package_installs_no_filter():
    """The filters belong to our entry points: a user's own code importing us sees every message."""
    code = ("import logging, warnings, instruction_modelling.commands.cli, instruction_modelling.commands.diagnose, "
            "instruction_modelling.commands.preview\n"
            "from instruction_modelling.commands.cli import NOISY_LOG_RECORDS\n"
            "assert not any(logging.getLogger(n).filters for n, _ in NOISY_LOG_RECORDS)\n"
            "assert not any('trust check' in str(f[1]) for f in warnings.filters)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_preview_is_quiet_by_default_and_verbose_keeps_the_messages(tiny_model_dir, tmp_path):
    """Real imports of Axolotl, torchao and bitsandbytes; the noise they print depends on the
    environment, so the test compares the same command with and without --verbose."""
    from instruction_modelling.axolotl.configs import cpu_config, write_config
    from instruction_modelling.quickstart.sample_data import TRAIN_FILE

    cfg = write_config(cpu_config(tiny_model_dir, TRAIN_FILE, tmp_path / "run"), tmp_path / "cfg.yml")
    verbose = im("preview", str(cfg), "--rows", "1", "--plain", "--verbose", timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    loud = [n for n in NOISE if n in verbose.stdout + verbose.stderr]
    assert '"base_model":' in loud  # Axolotl's config dump is always printed
    quiet = im("preview", str(cfg), "--rows", "1", "--plain", timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [n for n in loud if n in quiet.stdout + quiet.stderr], quiet.stdout[:3000] + quiet.stderr[:3000]
    assert "carry loss" in quiet.stdout  # the preview itself is still there
