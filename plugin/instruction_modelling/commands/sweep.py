"""Write a grid of Axolotl configs from one base config (e.g. a prompt-loss-weight sweep).

    python -m instruction_modelling.sweep recipes/lima_im.yml \\
        --grid im_instruction_weight=0,0.01,0.1,0.4,1 --grid im_output_weight=0.6,1 \\
        --set im_loss_normalization=nonzero --out sweeps/lima

writes one YAML per point of the grid (the cartesian product of every ``--grid``), named after
the base file and the point (``lima_im_p0.01_r0.6.yml``), each with its own ``output_dir``
(the base's, plus the point's name) and the base's ``dataset_prepared_path`` (Axolotl hashes the
settings that change the prepared data, so points share what they can). ``--set`` changes a key
in every config. Values are read as YAML (``0.1`` is a number, ``true`` a boolean). Every config
is checked against the plugin's options before anything is written, so an invalid point (say,
an instruction weight under ``im_mode: it``) stops the sweep with the reason. No Axolotl import.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

# Short names of the weight keys in file names: p = prompt (instruction), r = response (output),
# as WIT's λp / λr; a = the share normalisation's α.
SHORT = {"im_instruction_weight": "p", "im_output_weight": "r", "im_instruction_share": "a"}


def parse_assignment(text: str, multiple: bool) -> tuple[str, list[Any]]:
    """``key=v1,v2`` -> ``(key, [v1, v2])`` with YAML-typed values (one value unless ``multiple``)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"expected KEY=VALUE{'[,VALUE...]' if multiple else ''}, got {text!r}")
    parsed = [yaml.safe_load(v) for v in (values.split(",") if multiple else [values])]
    return key.strip(), parsed


def point_name(point: dict[str, Any]) -> str:
    """File-name suffix of a grid point, e.g. ``p0.01_r0.6``."""
    parts = []
    for key, value in point.items():
        label = SHORT.get(key, key.removeprefix("im_") + "-")
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{label}{text}")
    return "_".join(parts).replace("/", "-")


def build_grid(base: dict, grid: dict[str, Sequence[Any]], fixed: dict[str, Any] | None = None,
               stem: str = "sweep") -> list[tuple[str, dict]]:
    """``(name, config)`` for every point of ``grid`` (cartesian product, in the order given).

    Args:
        base: the base Axolotl config.
        grid: key -> values to sweep.
        fixed: keys set in every config.
        stem: prefix of every name (the base file's stem).

    Returns:
        The configs, each validated against ``IMArgs``.

    Raises:
        ValueError: naming the first invalid point and why.
    """
    from pydantic import ValidationError

    from instruction_modelling.core.options import IMArgs

    keys = list(grid)
    out_root = Path(base.get("output_dir") or "outputs")
    configs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        cfg = copy.deepcopy(base)
        cfg.update(fixed or {})
        cfg.update(point)
        name = f"{stem}_{point_name(point)}" if point else stem
        cfg["output_dir"] = str(out_root / point_name(point)) if point else str(out_root)
        try:
            IMArgs.from_cfg(cfg)
        except ValidationError as exc:
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"grid point {point}: {reason}") from exc
        configs.append((name, cfg))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instruction_modelling.sweep",
                                     description="Write a grid of Axolotl configs from one base config.")
    parser.add_argument("base", type=Path, help="base Axolotl YAML (e.g. a recipe)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a key and the values to sweep (repeat for a product grid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a key in every config")
    parser.add_argument("--out", type=Path, required=True, help="folder for the configs")
    args = parser.parse_args(argv)
    try:
        base = yaml.safe_load(args.base.read_text(encoding="utf-8"))
        if not isinstance(base, dict):
            raise ValueError(f"{args.base}: expected an Axolotl config (a mapping)")
        grid = dict(parse_assignment(g, multiple=True) for g in args.grid)
        fixed = {k: v[0] for k, v in (parse_assignment(s, multiple=False) for s in args.set)}
        configs = build_grid(base, grid, fixed, stem=args.base.stem)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    grid_text = " ".join(f"--grid {g}" for g in args.grid) + "".join(f" --set {s}" for s in args.set)
    for name, cfg in configs:
        path = args.out / f"{name}.yml"
        header = f"# Written by `python -m instruction_modelling.sweep {args.base} {grid_text}`: one point of the grid.\n"
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=10_000), encoding="utf-8")
        print(f"{path}\toutput_dir {cfg['output_dir']}")
    print(f"wrote {len(configs)} configs; train each with `accelerate launch -m axolotl.cli.train <config>`, "
          "then compare them with `python -m instruction_modelling.analyze losses`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
