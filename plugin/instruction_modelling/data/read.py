"""Raw records from local files (JSON list, JSONL, a member of a .zip) or, online, from the hub.

Every record keeps its position so that a bad one can be reported as ``file row N (line N+1)``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import DatasetSpec


class InputError(ValueError):
    """A raw file or record that cannot be read; the message names the file, row and field."""


@dataclass
class Records:
    """Raw records and where they came from (for error messages and the report)."""

    rows: list[Any]
    source: str  # file name, "archive.zip:member" or the hub id / URL
    lines: list[int] | None = None  # line number of each row in a JSONL file

    def where(self, index: int) -> str:
        return f"{self.source} row {index}" + (f" (line {self.lines[index]})" if self.lines else "")


def _parse(text: str, source: str, as_jsonl: bool) -> Records:
    if not as_jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, list):
            raise InputError(f"{source}: expected a JSON list of rows, got {type(data).__name__}")
        return Records(data, source)
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{source} line {n}: not valid JSON ({exc.msg})") from exc
        lines.append(n)
    return Records(rows, source, lines)


def read_local(path: str | Path, member: str | None = None) -> Records:
    """Records of a ``.json`` list, a ``.jsonl`` file, or ``member`` of a ``.zip`` archive.

    ``member`` matches a file name anywhere inside the archive (the LESS release keeps the
    selections in a sub-folder).
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
            text = io.TextIOWrapper(archive.open(hits[0]), encoding="utf-8").read()
        return _parse(text, f"{path.name}:{hits[0]}", as_jsonl=hits[0].endswith(".jsonl"))
    text = path.read_text(encoding="utf-8")
    return _parse(text, path.name, as_jsonl=path.suffix != ".json")


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_online(spec: DatasetSpec, local_path: str | Path | None = None) -> Records:
    """Download ``spec.online`` (needs network; not exercised by the offline test suite).

    * ``hub:<id>``: ``datasets.load_dataset(id, split="train")``;
    * ``hub-file:<org>/<name>/<file>``: ``huggingface_hub.hf_hub_download`` of that file, then
      read like a local file (the LESS release is one zip);
    * ``https://...``: ``datasets.load_dataset("json", data_files=url, split="train")``.
    """
    target = spec.online
    if not target:
        raise InputError(f"{spec.name}: no online source is known; pass a local file with --source")
    if is_offline():
        raise InputError(
            f"{spec.name}: no local raw file, and the machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
            f"set). Download it from {target} and pass --source, or put it at {local_path or spec.raw}"
        )
    if target.startswith("hub-file:"):
        from huggingface_hub import hf_hub_download

        org, name, filename = target[len("hub-file:"):].split("/", 2)
        local = hf_hub_download(f"{org}/{name}", filename, repo_type="dataset")
        return read_local(local, spec.member)
    import datasets

    if target.startswith("hub:"):
        ds = datasets.load_dataset(target[len("hub:"):], split="train")
    else:
        ds = datasets.load_dataset("json", data_files=target, split="train")
    return Records([dict(r) for r in ds], target)
