"""Training rows as written: local JSON/JSONL files reach the dataset pass as one JSON text per row.

Axolotl loads a local ``.json``/``.jsonl`` file with ``datasets.load_dataset("json")``, which builds
one Arrow table for the whole file: when one row's ``content`` is not a string, every JSON-looking
content string of the file is decoded (``"42"`` becomes 42, ``"\\"Yes\\""`` becomes ``Yes``), and
Alpaca and prompt/completion rows in one file get each other's columns as nulls. So, for
``type: instruction_modelling`` datasets that are local JSON/JSONL files, the plugin reads the file
itself (``data.read.iter_raw_rows``: per line, bytes capped before decoding) into a saved dataset of
columns (the row's JSON text, why it could not be read, its line, its file and its row in that file)
and points the dataset's ``path`` at it; Axolotl then loads that with ``load_from_disk``, and the
strategy decodes each row on its own (:func:`parse_row`). The saved copy lives under
``dataset_prepared_path/im_rows/<hash of the files' bytes>``, so an edited file gets a new copy and a
new prepared-dataset hash.

Every source that reaches ``datasets``' JSON loader is read this way: one local file in ``path:``, a
local folder (the files ``datasets`` would take as its train split), ``data_files:`` beside a local
folder, and ``data_files:`` of a hub dataset (downloaded as Axolotl downloads them). Parquet, Arrow
and ``save_to_disk`` folders carry one type per column in the file itself, so reading cannot re-type
them; a hub dataset without ``data_files:`` is loaded by ``datasets`` and a warning says how to read
its rows as written.

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
SOURCE = "_im_source"  # the file the row came from
ROW = "_im_row_number"  # the row's 0-based number in its file
JSON_SUFFIXES = (".json", ".jsonl")
ROWS_DIR = "im_rows"
DEFAULT_PREPARED_PATH = "last_run_prepared"  # Axolotl's default dataset_prepared_path
SOURCE_PREFIX = "instruction_modelling rows of "  # DatasetInfo.description: which file the rows came from



def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file()


def _folder_train_files(folder: Path) -> list[Path]:
    """The files ``datasets.load_dataset(folder, split="train")`` reads (its own split patterns)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except Exception:  # no data files, or none it recognises: Axolotl reports it
        return []
    return [Path(f) for f in files.get("train", [])]


def _hub_files(ds: dict, names: list[str]) -> list[Path]:
    """``data_files`` of a hub dataset, fetched as Axolotl fetches them (``hf_hub_download``, which
    answers from the local cache offline); [] when they cannot be had (Axolotl then says why)."""
    from huggingface_hub import hf_hub_download

    try:
        return [Path(hf_hub_download(repo_id=ds["path"], repo_type="dataset", filename=name,
                                     revision=ds.get("revision"))) for name in names]
    except Exception as exc:
        LOG.warning(f"{ds['path']}: could not fetch {names} to read their rows as written ({exc}); "
                    "datasets' JSON loader reads them instead")
        return []


def json_sources(ds: dict) -> list[Path] | None:
    """The JSON/JSONL files ``datasets``' JSON loader would read for this dataset entry, in its order;
    None for a source that is not (only) JSON, or that the plugin leaves to Axolotl."""
    path, ds_type = ds.get("path"), ds.get("ds_type")
    if not isinstance(path, str) or ds_type not in (None, "json"):
        return None
    data_files = ds.get("data_files")
    names = [data_files] if isinstance(data_files, str) else data_files
    if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return None
    local = Path(path)
    if local.is_file():
        files = [local] if names is None else None
    elif local.is_dir():
        if names is not None:  # datasets resolves them against the working directory
            files = [Path(n) for n in names]
        elif _is_saved_dataset(local):
            return None  # Arrow: typed once, when it was saved
        else:
            files = _folder_train_files(local)
    elif names is not None:
        files = _hub_files(ds, names)
    else:
        LOG.warning(f"{path}: a hub dataset without data_files is read by datasets, whose JSON loader types each "
                    "column from the whole file; list its JSON files under data_files: to read rows as written")
        return None
    if not files or not all(f.is_file() and f.suffix in JSON_SUFFIXES for f in files):
        return None
    return files


def _file_hash(paths: list[Path], max_row_bytes: int) -> str:
    h = hashlib.sha256(f"{max_row_bytes}\0".encode())
    for path in paths:
        h.update(f"{path.name}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(2**20):
                h.update(chunk)
    return h.hexdigest()[:20]


def save_rows(paths: str | Path | list, prepared_dir: str | Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Path:
    """Save the rows of local JSON/JSONL files, each as its own JSON text; returns the saved directory.

    Written once per content of the files (to a temporary directory, then renamed, so that
    concurrent ranks never read a half-written copy).

    Raises:
        InputError: a file that is not UTF-8 or not JSON as a whole (JSON list), or has no rows.
    """
    from datasets import Dataset, DatasetInfo, Features, Value

    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    target = Path(prepared_dir) / ROWS_DIR / _file_hash(paths, max_row_bytes)
    if (target / "dataset_info.json").exists():
        return target
    columns: dict[str, list] = {ROW_TEXT: [], READ_ERROR: [], LINE: [], SOURCE: [], ROW: []}
    for path in paths:
        with open(path, "rb") as f:
            for raw in iter_raw_rows(f, path.name, path.suffix == ".jsonl", max_row_bytes):
                columns[ROW_TEXT].append(raw.text or "")
                columns[READ_ERROR].append(raw.error or "")
                columns[LINE].append(raw.line or 0)
                columns[SOURCE].append(str(path))
                columns[ROW].append(raw.index)
    features = Features({ROW_TEXT: Value("large_string"), READ_ERROR: Value("string"), LINE: Value("int64"),
                         SOURCE: Value("string"), ROW: Value("int64")})
    described = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files in {os.path.commonpath(paths)}"
    dataset = Dataset.from_dict(columns, features=features,
                                info=DatasetInfo(description=SOURCE_PREFIX + described, features=features))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    dataset.save_to_disk(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another rank got there first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def redirect_local_files(cfg: Any, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> None:
    """Point every ``type: instruction_modelling`` dataset read by ``datasets``' JSON loader at its
    saved rows (see the module docstring for which sources those are).

    Raises:
        InputError: a file that cannot be read at all, naming it.
    """
    prepared = cfg.get("dataset_prepared_path") or DEFAULT_PREPARED_PATH
    for key in ("datasets", "test_datasets"):
        for ds in cfg.get(key) or []:
            if not (hasattr(ds, "get") and str(ds.get("type", "")).split(".")[0] == "instruction_modelling"):
                continue
            files = json_sources(ds)
            if files is None:
                continue
            if ds.get("split") not in (None, "train"):  # e.g. "train[:500]": a slice of datasets' own loader
                LOG.warning(f"{ds['path']}: split '{ds['split']}' is read by datasets' JSON loader, which types "
                            "each column from the whole file; drop the split to read rows as written")
                continue
            source = ds["path"]
            ds["path"] = str(save_rows(files, prepared, max_row_bytes))
            ds["ds_type"] = None
            ds["data_files"] = None
            LOG.info(f"{source}: rows of {len(files)} file(s) read one by one (as written) into {ds['path']}")


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


def where(dataset: Any, index: int) -> str | None:
    """``lima.jsonl row 12 (line 13)`` for row ``index`` of saved rows (None for any other dataset)."""
    if SOURCE not in (getattr(dataset, "column_names", None) or ()):
        return None
    row = dataset[index]
    line = f" (line {row[LINE]})" if row[LINE] else ""
    return f"{os.path.basename(row[SOURCE])} row {row[ROW]}{line}"


def parse_row(text: str, error: str) -> dict | RowError:
    """One saved row as a dict with exactly the values written, or the ``RowError`` saying why not."""
    if error:
        return RowError("<row>", error)
    value = json.loads(text)
    if not isinstance(value, dict):
        return RowError("<row>", f"must be a JSON object, got {type(value).__name__} {text[:40]!r}")
    return value
