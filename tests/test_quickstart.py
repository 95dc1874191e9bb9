"""The README's first command: the CPU quickstart trains IT and IM and prints the loss table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("axolotl")


@pytest.mark.slow
def test_quickstart_prints_the_loss_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "instruction_modelling.quickstart", "--out", str(tmp_path / "qs"), "--epochs", "2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\W*(base \(untrained\)|IT|IM)\W+([\d.]+)\W+([\d.]+)\W+([\d.]+)\W+([\d.]+)", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.groups()[1:]]
    assert set(rows) == {"base (untrained)", "IT", "IM"}, proc.stdout[-3000:]
    # Training lowers the train output loss of both runs below the untrained model's.
    assert rows["IT"][0] < rows["base (untrained)"][0] and rows["IM"][0] < rows["base (untrained)"][0]
    # IM trains the instruction tokens, IT does not.
    assert rows["IM"][2] < rows["IT"][2]
    assert (tmp_path / "qs" / "it.yml").exists() and (tmp_path / "qs" / "im.yml").exists()
