"""`python -m instruction_modelling.sweep`: a grid of configs from one base config."""

from __future__ import annotations

from pathlib import Path

import yaml

from instruction_modelling.core.options import IMArgs
from instruction_modelling.commands.sweep import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_writes_the_product_grid_from_a_recipe(tmp_path, capsys):
    base = RECIPES / "lima_im.yml"
    code = main([str(base), "--grid", "im_instruction_weight=0,0.01,0.1,0.4,1", "--grid", "im_output_weight=0.6,1",
                 "--set", "im_loss_normalization=nonzero", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    files = sorted(tmp_path.glob("*.yml"))
    assert len(files) == 10
    base_cfg = yaml.safe_load(base.read_text())
    seen = set()
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        weights = IMArgs.from_cfg(cfg).role_weight_map()
        seen.add((weights["user"], weights["assistant"]))
        assert cfg["im_loss_normalization"] == "nonzero"
        assert cfg["output_dir"].startswith(base_cfg["output_dir"] + "/p")
        # Everything else is the base's.
        changed = {k for k in cfg if cfg[k] != base_cfg.get(k)}
        assert changed <= {"im_instruction_weight", "im_output_weight", "im_loss_normalization", "output_dir"}
    assert seen == {(p, r) for p in (0, 0.01, 0.1, 0.4, 1) for r in (0.6, 1)}
    assert (tmp_path / "lima_im_p0.01_r0.6.yml").is_file()
    assert len({yaml.safe_load(f.read_text())["output_dir"] for f in files}) == 10


def test_an_invalid_point_stops_the_sweep_with_the_reason(tmp_path, capsys):
    code = main([str(RECIPES / "lima_it.yml"), "--grid", "im_instruction_weight=0,0.5", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "im_instruction_weight': 0.5" in err and "im_mode: it trains no instruction tokens" in err
    assert not list(tmp_path.glob("*.yml"))  # nothing written


def test_share_grid(tmp_path, capsys):
    code = main([str(RECIPES / "lima_im.yml"), "--set", "im_loss_normalization=share",
                 "--grid", "im_instruction_share=0,0.05,0.5", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert sorted(f.name for f in tmp_path.glob("*.yml")) == ["lima_im_a0.05.yml", "lima_im_a0.5.yml", "lima_im_a0.yml"]
