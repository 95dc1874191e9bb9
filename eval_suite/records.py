"""Reading user-supplied record files with errors that name the file, the row and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record file is malformed; the message names the file, row (1-based) and field."""


def read_records(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Read a JSON Lines file, or a JSON file holding a list of objects, and check required fields.

    Args:
        path: ``.jsonl`` (one object a line) or ``.json`` (a list of objects).
        required: field name -> accepted type(s), checked on every row.

    Returns:
        The rows, as dicts.

    Example:
        >>> read_records("samples.jsonl", {"task_id": str, "completion": str})  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        numbered = list(enumerate(rows, 1))
    else:  # rows are numbered by line, so the number points at the line to fix
        numbered = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}: row {line_no}: not valid JSON ({e.msg})") from None
    for row_no, row in numbered:
        if not isinstance(row, dict):
            raise RecordError(f"{path}: row {row_no}: expected an object, got {type(row).__name__}")
        for field, types in required.items():
            if field not in row:
                raise RecordError(f"{path}: row {row_no}: missing field '{field}'")
            if not isinstance(row[field], types):
                want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
                raise RecordError(
                    f"{path}: row {row_no}: field '{field}' should be {want}, got {type(row[field]).__name__}"
                )
    return [row for _, row in numbered]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
