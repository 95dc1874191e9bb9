"""Reading user-supplied record files with errors that name the file, the row and the field."""

from __future__ import annotations

import hashlib
import json
import os
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
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(f"{path}: row {line}: not UTF-8 text (byte {e.start + 1} of the file: {e.reason})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise RecordError(f"{path}: nested too deeply to read") from None
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
                except RecursionError:
                    raise RecordError(f"{path}: row {line_no}: nested too deeply to read") from None
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


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["n: 2 -> 3", "judge.answering: 'a' -> 'b'"]``: the fields that differ, nested dicts spelt out."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class SampleStore:
    """Generated texts keyed by row, appended to a JSONL file as they come, so a killed run resumes.

    Each line is ``{"key", "text", "made"}``, ``made`` being the hash of the settings (``meta``) the
    row was generated with; every append is flushed and fsynced. A last line cut short by a kill is
    dropped on reading (and counted in ``dropped``); the row is generated again. Nothing else in the
    file is taken on trust: rows without a settings file beside them, rows made with other settings,
    and a key stored twice with two texts are refused with a line naming the file and line.

    Args:
        path: the JSONL file (created with its folder).
        meta: settings the stored rows were generated with; a file written with other settings is
            refused with a line naming the setting, instead of mixing rows of two protocols.
        session: what this run adds without changing the samples' settings (batch settings); each
            distinct session is appended to the settings file's ``sessions`` (see :attr:`sessions`).
    """

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None, session: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = 0
        meta_path = self.path.with_suffix(".meta.json")
        meta = json.loads(json.dumps(meta or {}))  # tuples -> lists, as they come back from the file
        self.made = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
        fix = "pass --rerun to generate them again (the old file is moved aside), or use another --run-dir"
        has_rows = self.path.is_file() and self.path.stat().st_size > 0
        old: dict[str, Any] = {}
        if has_rows and not meta_path.is_file():
            raise RecordError(f"{self.path} has samples but no {meta_path.name} saying how they were made; {fix}")
        if meta_path.is_file() and has_rows:
            try:
                old = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise RecordError(f"{meta_path}: not valid JSON ({e.msg}); {fix}") from None
            changed = differences({k: v for k, v in old.items() if k != "sessions"}, meta)
            if changed:
                raise RecordError(f"{self.path} was generated with other settings ({'; '.join(changed)}); {fix}")
        self.sessions: list[dict[str, Any]] = list(old.get("sessions") or [])
        session = json.loads(json.dumps(session)) if session is not None else None
        if session is not None and (not self.sessions or self.sessions[-1] != session):
            self.sessions.append(session)
        meta_path.write_text(json.dumps({**meta, "sessions": self.sessions}, indent=1))

    def texts(self) -> dict[str, str]:
        """key -> text of every complete row in the file."""
        if not self.path.is_file():
            return {}
        rows: dict[str, str] = {}
        first_line: dict[str, int] = {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if line_no == len(lines):  # the last line, cut by a kill mid-write
                    self.dropped += 1
                    continue
                raise RecordError(f"{self.path}: row {line_no}: not valid JSON; delete the file to start over") from None
            if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("text"), str)):
                raise RecordError(f"{self.path}: row {line_no}: expected {{\"key\": str, \"text\": str, \"made\": str}}; "
                                  "pass --rerun to generate the file again")
            if row.get("made") != self.made:
                raise RecordError(f"{self.path}: row {line_no}: made with other settings than the file's "
                                  f"({row.get('made')!r}, not {self.made!r}); pass --rerun to generate the file again")
            key = row["key"]
            if key in rows and rows[key] != row["text"]:
                raise RecordError(f"{self.path}: row {line_no}: key {key!r} is stored twice with different texts "
                                  f"(rows {first_line[key]} and {line_no}); pass --rerun to generate the file again")
            if key not in rows:
                rows[key], first_line[key] = row["text"], line_no
        if self.dropped:  # rewrite without the torn line, so appends start on a fresh line
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(self._line(k, t) for k, t in rows.items())
        return rows

    def _line(self, key: str, text: str) -> str:
        return json.dumps({"key": key, "text": text, "made": self.made}, ensure_ascii=False) + "\n"

    def append(self, rows: dict[str, str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(self._line(k, t) for k, t in rows.items())
            f.flush()
            os.fsync(f.fileno())
