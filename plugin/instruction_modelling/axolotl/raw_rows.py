"""Training rows as written: local JSON/JSONL files reach the dataset pass as one JSON text per row.

Axolotl loads a local ``.json``/``.jsonl`` file with ``datasets.load_dataset("json")``, which builds
one Arrow table for the whole file: when one row's ``content`` is not a string, every JSON-looking
content string of the file is decoded (``"42"`` becomes 42, ``"\\"Yes\\""`` becomes ``Yes``), and
Alpaca and prompt/completion rows in one file get each other's columns as nulls. So, for
``type: instruction_modelling`` datasets that are local JSON/JSONL files, the plugin reads the file
itself (``data.read.iter_raw_rows``: per line, bytes capped before decoding) into a saved dataset of
three columns (the row's JSON text, why it could not be read, its line) and points the dataset's
``path`` at it; Axolotl then loads that with ``load_from_disk``, and the strategy decodes each row on
its own (:func:`parse_row`). The saved copy lives under ``dataset_prepared_path/im_rows/<hash of the
file's bytes>``, so an edited file gets a new copy and a new prepared-dataset hash.

No Axolotl import (``datasets`` only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from instruction_modelling.core.read import DEFAULT_MAX_ROW_BYTES, iter_raw_rows
from instruction_modelling.core.segments import RowError

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

ROW_TEXT = "_im_row"  # the row's JSON text, as written
READ_ERROR = "_im_read_error"  # why the row could not be read ("" when it could)
LINE = "_im_line"  # 1-based line of a JSONL file (0 for a JSON list)
ROWS_DIR = "im_rows"
DEFAULT_PREPARED_PATH = "last_run_prepared"  # Axolotl's default dataset_prepared_path
SOURCE_PREFIX = "instruction_modelling rows of "  # DatasetInfo.description: which file the rows came from


def is_local_json_file(ds: dict) -> bool:
    """A dataset entry Axolotl would read with its JSON loader from one local file."""
    path = ds.get("path")
    if not isinstance(path, str) or ds.get("data_files") or ds.get("ds_type") not in (None, "json"):
        return False
    return Path(path).is_file() and Path(path).suffix in (".json", ".jsonl")


def _file_hash(path: Path, max_row_bytes: int) -> str:
    h = hashlib.sha256(f"{path.name}\0{max_row_bytes}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()[:20]


def save_rows(path: str | Path, prepared_dir: str | Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Path:
    """Save the rows of a local JSON/JSONL file, each as its own JSON text; returns the saved directory.

    Written once per file content (to a temporary directory, then renamed, so that concurrent ranks
    never read a half-written copy).

    Raises:
        InputError: the file is not UTF-8 or not JSON as a whole (JSON list), or has no rows.
    """
    from datasets import Dataset, DatasetInfo, Features, Value

    path = Path(path)
    target = Path(prepared_dir) / ROWS_DIR / _file_hash(path, max_row_bytes)
    if (target / "dataset_info.json").exists():
        return target
    columns: dict[str, list] = {ROW_TEXT: [], READ_ERROR: [], LINE: []}
    with open(path, "rb") as f:
        for raw in iter_raw_rows(f, path.name, path.suffix == ".jsonl", max_row_bytes):
            columns[ROW_TEXT].append(raw.text or "")
            columns[READ_ERROR].append(raw.error or "")
            columns[LINE].append(raw.line or 0)
    features = Features({ROW_TEXT: Value("large_string"), READ_ERROR: Value("string"), LINE: Value("int64")})
    dataset = Dataset.from_dict(columns, features=features,
                                info=DatasetInfo(description=SOURCE_PREFIX + str(path), features=features))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    dataset.save_to_disk(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another rank got there first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def redirect_local_files(cfg: Any, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> None:
    """Point every ``type: instruction_modelling`` local JSON/JSONL dataset at its saved rows.

    Raises:
        InputError: a file that cannot be read at all, naming it.
    """
    prepared = cfg.get("dataset_prepared_path") or DEFAULT_PREPARED_PATH
    for key in ("datasets", "test_datasets"):
        for ds in cfg.get(key) or []:
            if not (hasattr(ds, "get") and str(ds.get("type", "")).split(".")[0] == "instruction_modelling"):
                continue
            if not is_local_json_file(ds):
                continue
            if ds.get("split") not in (None, "train"):  # e.g. "train[:500]": a slice of datasets' own loader
                LOG.warning(f"{ds['path']}: split '{ds['split']}' is read by datasets' JSON loader, which types "
                            "each column from the whole file; drop the split to read rows as written")
                continue
            source = ds["path"]
            ds["path"] = str(save_rows(source, prepared, max_row_bytes))
            ds["ds_type"] = None
            LOG.info(f"{source}: rows read one by one (as written) into {ds['path']}")


def load_saved(path: Any) -> Any:
    """The saved rows at ``path`` (a dataset's redirected path), or None for any other path."""
    p = Path(str(path)) if path else None
    if p is None or p.parent.name != ROWS_DIR or not (p / "dataset_info.json").is_file():
        return None
    from datasets import load_from_disk

    return load_from_disk(str(p))


def source_of(dataset: Any) -> str | None:
    """The file a dataset of saved rows came from (None for any other dataset)."""
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    return description[len(SOURCE_PREFIX):] if description.startswith(SOURCE_PREFIX) else None


def parse_row(text: str, error: str) -> dict | RowError:
    """One saved row as a dict with exactly the values written, or the ``RowError`` saying why not."""
    if error:
        return RowError("<row>", error)
    value = json.loads(text)
    if not isinstance(value, dict):
        return RowError("<row>", f"must be a JSON object, got {type(value).__name__} {text[:40]!r}")
    return value
