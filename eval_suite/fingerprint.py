"""A content hash of a model folder that costs milliseconds on a 13 GB checkpoint.

What is hashed, per file the model loads (weights, configs, tokenizer, chat template, custom code):
its name and size, then

- files up to :data:`FULL_HASH_BYTES` (configs, tokenizers, most LoRA adapters): every byte;
- ``.safetensors``: the header (every tensor's name, dtype, shape and offsets) plus
  :data:`SAMPLE_BYTES` at the start, middle and end of every tensor's data;
- zip-format ``.bin``/``.pt`` (``torch.save``): the archive's directory plus the same three samples of
  every stored tensor;
- anything else (old pickles, ``.gguf``): :data:`EVEN_SAMPLES` samples spread evenly over the file.

So a retrained checkpoint (every tensor changes), a fine-tune of a single tensor, another shard
layout, dtype or tokenizer all hash differently; a change confined to bytes between the samples of
one tensor does not (a trade for reading ~3.5 MiB instead of 13 GB: 291 tensors x 3 x 4 KiB for
LLaMA-2-7B). Training leftovers (optimizer, scheduler, RNG and trainer state) are not part of the model
and are left out. An adapter folder also hashes its local base model (``base_model_name_or_path``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

FULL_HASH_BYTES = 64 * 2**20
SAMPLE_BYTES = 4096
EVEN_SAMPLES = 256
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja", ".py", ".tiktoken",
                  ".gguf", ".msgpack", ".h5", ".vocab")
TRAINER_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


def is_model_file(name: str) -> bool:
    return (name.endswith(MODEL_SUFFIXES) and name not in TRAINER_FILES and not name.startswith(("rng_state", "."))
            and not name.endswith((".sqlite", ".meta.json")))


def weights_fingerprint(model_dir: str | Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """``{"path", "sha256" (16 hex), "files", "bytes", "bytes_read", "method"}`` of a model folder.

    A name that is not a local folder (a hub id) gets ``sha256: None``: it is known by name only.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return {"path": str(model_dir), "sha256": None, "method": "not a local folder: known by its name only"}
    files = sorted(f for f in path.iterdir() if f.is_file() and is_model_file(f.name))
    digest = hashlib.sha256()
    total = read = 0
    methods: set[str] = set()
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            method, n = _hash_file(fh, f.name, size, digest)
        methods.add(method)
        read += n
    info: dict[str, Any] = {"path": str(model_dir), "sha256": None, "files": len(files), "bytes": total,
                            "bytes_read": read, "method": ", ".join(sorted(methods)) or "no model files"}
    base = _adapter_base(path)
    if base is not None:
        resolved = Path(base).resolve() if Path(base).is_dir() else None
        if resolved is not None and resolved not in _seen and resolved != path.resolve():
            info["base_model"] = weights_fingerprint(base, _seen | {path.resolve()})
        else:
            info["base_model"] = {"path": base, "sha256": None, "method": "not a local folder: known by its name only"}
        digest.update(json.dumps(info["base_model"].get("sha256") or base).encode())
    info["sha256"] = digest.hexdigest()[:16]
    return info


def _adapter_base(path: Path) -> str | None:
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return None  # the file's bytes are hashed anyway


def _hash_file(fh: BinaryIO, name: str, size: int, digest) -> tuple[str, int]:
    """Feed ``digest`` with what identifies the file; returns (how, bytes read)."""
    if size <= FULL_HASH_BYTES:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
        return "every byte of small files", size
    if name.endswith(".safetensors"):
        spans = _safetensors_spans(fh, size, digest)
        if spans is not None:
            return "safetensors header + 3 samples per tensor", _sample(fh, spans, digest)
    if zipfile.is_zipfile(fh):
        spans = _zip_spans(fh, digest)
        if spans is not None:
            return "zip directory + 3 samples per stored tensor", _sample(fh, spans, digest)
    step = size // EVEN_SAMPLES
    return f"{EVEN_SAMPLES} evenly spaced samples", _sample(fh, [(i * step, SAMPLE_BYTES) for i in range(EVEN_SAMPLES)]
                                                            + [(max(0, size - SAMPLE_BYTES), SAMPLE_BYTES)], digest)


def _safetensors_spans(fh: BinaryIO, size: int, digest) -> list[tuple[int, int]] | None:
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(size - 8, 100 * 2**20):
        return None
    header = fh.read(n)
    digest.update(header)
    try:
        entries = json.loads(header)
        offsets = [tuple(e["data_offsets"]) for k, e in entries.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # the header bytes are in the digest; sample evenly as for an unknown file
    return [span for begin, end in offsets for span in _three(8 + n + begin, end - begin)]


def _zip_spans(fh: BinaryIO, digest) -> list[tuple[int, int]] | None:
    try:
        entries = zipfile.ZipFile(fh).infolist()
    except (zipfile.BadZipFile, OSError):
        return None
    spans = []
    for e in entries:
        digest.update(f"{e.filename}\0{e.file_size}\0{e.CRC}\0".encode())  # CRC-32 of every entry: whole-content check
        # Data starts after the local header: 30 bytes plus the name and extra field as stored there.
        fh.seek(e.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        spans += _three(e.header_offset + 30 + name_len + extra_len, e.compress_size)
    return spans


def _three(start: int, length: int) -> list[tuple[int, int]]:
    """Start, middle and end of a byte range, :data:`SAMPLE_BYTES` each (fewer for a short range)."""
    if length <= 3 * SAMPLE_BYTES:
        return [(start, length)]
    return [(start, SAMPLE_BYTES), (start + length // 2, SAMPLE_BYTES), (start + length - SAMPLE_BYTES, SAMPLE_BYTES)]


def _sample(fh: BinaryIO, spans: list[tuple[int, int]], digest) -> int:
    read = 0
    for offset, length in spans:
        fh.seek(offset)
        block = fh.read(length)
        digest.update(block)
        read += len(block)
    return read
