"""Raw records from local files (JSON list, JSONL, a member of a .zip).

Every record keeps its position so that a bad one can be reported as ``file row N (line N+1)``.
Each row is decoded on its own (``json.loads`` per line), so one row's types never change how
another is read (Arrow's JSON reader, and pandas behind it, re-type a whole column instead).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator


class InputError(ValueError):
    """A raw file or record that cannot be read; the message names the file, row and field."""


@dataclass
class Records:
    """Raw records and where they came from (for error messages and the report)."""

    rows: list[Any]
    source: str  # file name, "archive.zip:member" or the hub id / URL
    lines: list[int] | None = None  # line number of each row in a JSONL file
    unreadable: list[str] = field(default_factory=list)  # "where: why" of rows skipped while reading
    numbers: list[int] | None = None  # each row's number in the file, when unreadable rows were left out

    def where(self, index: int) -> str:
        number = self.numbers[index] if self.numbers else index
        return f"{self.source} row {number}" + (f" (line {self.lines[index]})" if self.lines else "")


# A row longer than this is a bad row, found before it is decoded or tokenised: reading it is
# bounded by this many bytes, however long the line (one 50 MB row once needed 12.6 GB downstream).
DEFAULT_MAX_ROW_BYTES = 8 * 2**20


def max_row_bytes_for(sequence_len: int | None) -> int:
    """The default row cap of training: 32 bytes per token of ``sequence_len``, at least 1 MiB.

    Tokens average 3-5 bytes of text, so a row over the cap has several times more tokens than a
    sequence holds; segmenting one takes about 250 bytes of memory per byte of the row (the
    tokenizer's offsets as Python tuples: a 6.4 MB row took 1.55 GB), so the cap bounds that memory
    too: 250 MiB for sequence_len up to 32k, 1 GiB at 128k.
    """
    return max(2**20, 32 * int(sequence_len or 2048))
_MAX_DEPTH = sys.getrecursionlimit()  # about where Python's json module gives up (RecursionError)


@dataclass
class RawRow:
    """One row of a data file as written: its JSON text, or why it cannot be read.

    ``text`` holds the row's own JSON (a JSONL line, or one element of a JSON list re-serialised
    without changing any value); ``error`` is set instead when the row cannot be read.
    """

    index: int
    line: int | None  # 1-based line in a JSONL file
    text: str | None = None
    error: str | None = None


def _read_line(f: IO[bytes], max_bytes: int) -> tuple[bytes, bool] | None:
    """The next line without its newline, and whether it was longer than ``max_bytes`` (then the rest
    is read and dropped in ``max_bytes`` pieces, so memory stays bounded)."""
    line = f.readline(max_bytes + 1)
    if not line:
        return None
    if len(line) <= max_bytes or line.endswith(b"\n"):
        return line.rstrip(b"\r\n"), False
    while (rest := f.readline(max_bytes)) and not rest.endswith(b"\n"):
        pass
    return b"", True


def iter_raw_rows(f: IO[bytes], source: str, as_jsonl: bool,
                  max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RawRow]:
    """The rows of a JSONL or JSON-list file, each as its own JSON text or with the reason it is bad.

    Per JSONL line: longer than ``max_row_bytes``, not UTF-8 or not JSON -> a bad row naming the
    line; blank lines are not rows. A JSON list is parsed whole (its size bounds the memory), then
    each element over ``max_row_bytes`` is a bad row. A file that is not UTF-8 or not JSON at all,
    or has no rows, raises ``InputError`` naming it.

    Args:
        f: the file, opened in binary mode.
        source: the name used in messages.
        as_jsonl: one row per line (else a JSON list of rows).
        max_row_bytes: the most bytes one row may take.
    """
    if not as_jsonl:
        data = f.read()
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise InputError(f"{source} line {line}: not UTF-8 text (byte {exc.start + 1} of the file: {exc.reason})") from None
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON Lines in a .json file, which datasets reads too
                yield from iter_raw_rows(io.BytesIO(data), source, True, max_row_bytes)
                return
            raise InputError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise InputError(f"{source}: nested too deeply for a JSON reader (over {_MAX_DEPTH} levels)") from None
        if not isinstance(rows, list):
            raise InputError(f"{source}: expected a JSON list of rows, got {type(rows).__name__}")
        if not rows:
            raise InputError(f"{source}: the JSON list has no rows")
        for i, row in enumerate(rows):
            text = json.dumps(row, ensure_ascii=False)
            if len(text.encode("utf-8")) > max_row_bytes:
                yield RawRow(i, None, error=f"longer than {max_row_bytes} bytes")
            else:
                yield RawRow(i, None, text)
        return
    index, n = 0, 0
    while (read := _read_line(f, max_row_bytes)) is not None:
        n += 1
        raw, too_long = read
        if too_long:
            yield RawRow(index, n, error=f"longer than {max_row_bytes} bytes")
            index += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(index, n, error=f"not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason})")
            index += 1
            continue
        if not text.strip():
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(index, n, error=f"not valid JSON ({exc.msg} at column {exc.colno})")
        except RecursionError:
            yield RawRow(index, n, error=f"nested too deeply for a JSON reader (over {_MAX_DEPTH} levels)")
        else:
            yield RawRow(index, n, text)
        index += 1
    if index == 0:
        raise InputError(f"{source}: no rows (the file is empty or blank)")


def _parse(f: IO[bytes], source: str, as_jsonl: bool, max_row_bytes: int, on_bad_rows: str) -> Records:
    rows, lines, unreadable, numbers = [], [], [], []
    for raw in iter_raw_rows(f, source, as_jsonl, max_row_bytes):
        if raw.error:
            where = f"{source} row {raw.index}" + (f" (line {raw.line})" if raw.line else "")
            if on_bad_rows != "skip":
                raise InputError(f"{where}: {raw.error}")
            unreadable.append(f"{where}: {raw.error}")
            continue
        rows.append(json.loads(raw.text))
        numbers.append(raw.index)
        if raw.line:
            lines.append(raw.line)
    return Records(rows, source, lines if as_jsonl else None, unreadable, numbers if unreadable else None)


def read_local(path: str | Path, member: str | None = None, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
               on_bad_rows: str = "error") -> Records:
    """Records of a ``.json`` list, a ``.jsonl`` file, or ``member`` of a ``.zip`` archive.

    ``member`` matches a file name anywhere inside the archive (the LESS release keeps the
    selections in a sub-folder). A row that cannot be read (not UTF-8, not JSON, over
    ``max_row_bytes``) raises ``InputError`` naming the file, row and line, or with
    ``on_bad_rows="skip"`` is left out and listed in ``Records.unreadable``; a file without rows
    always raises. Row numbers count the readable and unreadable rows alike.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".zip":
        if not member:
            raise InputError(f"{path}: a .zip needs the name of the file to read inside it")
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            hits = [n for n in names if n == member or n.endswith("/" + member)]
            if len(hits) != 1:
                json_files = [n for n in names if n.endswith((".jsonl", ".json"))]
                found = ", ".join(json_files[:20]) + (f", ... ({len(json_files)} in all)" if len(json_files) > 20 else "")
                raise InputError(f"{path}: expected exactly one '{member}' inside, found {len(hits)} "
                                 f"(JSON files in the archive: {found or 'none'})")
            with archive.open(hits[0]) as f:
                return _parse(f, f"{path.name}:{hits[0]}", hits[0].endswith(".jsonl"), max_row_bytes, on_bad_rows)
    with open(path, "rb") as f:
        return _parse(f, path.name, path.suffix != ".json", max_row_bytes, on_bad_rows)
