"""Data preparation: the paper's training and analysis sets as the messages JSONL the recipes read.

    python -m instruction_modelling.data list
    python -m instruction_modelling.data prepare lima --source train.jsonl     # -> data/prepared/lima.jsonl
    python -m instruction_modelling.data prepare main --raw-dir data/raw       # the 7 Table 1 datasets
    python -m instruction_modelling.data stats data/prepared/lima.jsonl --check

Offline, each dataset is read from ``--source`` or from ``<raw-dir>/<spec.raw>``; when that file
is absent and the machine is online, from the hub id or URL in ``catalog.py``.
No Axolotl import.
"""

from __future__ import annotations

import json
from pathlib import Path

from instruction_modelling.core.read import InputError, Records, read_local

from .catalog import DATASETS, DEFAULT_PREPARED_DIR, DEFAULT_RAW_DIR, MAIN_DATASETS, DatasetSpec, Table5, get
from .convert import BadRowsError, Converted, convert
from .online import read_online
from .tulu import percent_subset, ratio_subset

__all__ = ["DATASETS", "MAIN_DATASETS", "DatasetSpec", "Table5", "build", "load_raw", "prepare", "write_jsonl",
           "InputError", "BadRowsError", "DEFAULT_RAW_DIR", "DEFAULT_PREPARED_DIR"]


def load_raw(spec: DatasetSpec, raw_dir: str | Path = DEFAULT_RAW_DIR, source: str | Path | None = None,
             on_bad_rows: str = "error") -> Records:
    """Raw records of ``spec``: ``source`` if given, else ``<raw_dir>/<spec.raw>``, else online.

    ``on_bad_rows="skip"`` leaves out rows that cannot be read (``Records.unreadable``)."""
    if source is not None:
        return read_local(source, spec.member if str(source).endswith(".zip") else None, on_bad_rows=on_bad_rows)
    local = Path(raw_dir) / spec.raw
    if spec.raw and local.exists():
        return read_local(local, spec.member, on_bad_rows=on_bad_rows)
    return read_online(spec, local)


def build(name: str, raw_dir: str | Path = DEFAULT_RAW_DIR, source: str | Path | None = None,
          on_bad_rows: str = "error", _cache: dict | None = None) -> Converted:
    """Rows of dataset ``name`` (derived Tulu subsets are cut from their converted parent)."""
    spec = get(name)
    if spec.kind in ("tulu_percent", "tulu_ratio"):
        cache = _cache if _cache is not None else {}
        parent_name = spec.params["parent"]
        if parent_name not in cache:
            cache[parent_name] = build(parent_name, raw_dir, source, on_bad_rows)
        parent = cache[parent_name]
        if spec.kind == "tulu_percent":
            rows = percent_subset(parent.rows, spec.params["fraction"])
            how = f"first rows of each source, {spec.params['fraction']:.0%} of {len(parent.rows)}"
        else:
            rows = ratio_subset(parent.rows, spec.params["alpha"], spec.params["count"])
            how = f"{len(rows)} rows with instruction/output ratio closest to {spec.params['alpha']:g}"
        return Converted(rows, parent.skipped, [*parent.notes, f"subset of {parent_name}: {how}"])
    converted = convert(spec, load_raw(spec, raw_dir, source, on_bad_rows), on_bad_rows)
    if not converted.rows:
        raise InputError(f"{name}: no usable rows ({len(converted.skipped)} skipped; the first: "
                         f"{converted.skipped[0] if converted.skipped else '-'}); nothing to write")
    return converted


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """One ``json.dumps`` line per row (ASCII escapes, the paper's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def prepare(name: str, out_dir: str | Path = DEFAULT_PREPARED_DIR, raw_dir: str | Path = DEFAULT_RAW_DIR,
            source: str | Path | None = None, on_bad_rows: str = "error", _cache: dict | None = None
            ) -> tuple[Path, Converted]:
    """Build dataset ``name`` and write ``<out_dir>/<name>.jsonl``."""
    converted = build(name, raw_dir, source, on_bad_rows, _cache)
    return write_jsonl(converted.rows, Path(out_dir) / f"{name}.jsonl"), converted
