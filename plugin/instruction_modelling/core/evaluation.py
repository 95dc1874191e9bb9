"""Per-example instruction-token and output-token losses of a model on a data file.

Segments come from ``segments.RowEncoder`` (the same masking as training) and the losses from
``losses.segment_weighted_loss``, so these numbers are exactly what the trainer logs as
``instruction_loss`` / ``output_loss``. No Axolotl import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .losses import segment_weighted_loss, weight_table
from .segments import RowEncoder, RowError, Segment


@dataclass
class ExampleLoss:
    index: int
    instruction_loss: float | None  # mean CE over instruction tokens (None if the row has none)
    output_loss: float | None
    instruction_tokens: int
    output_tokens: int


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, or of a JSON file holding a list of rows (``data.read.read_local``)."""
    from .read import read_local

    return read_local(path).rows


@torch.no_grad()
def example_losses(model: Any, encoder: RowEncoder, rows: Sequence[dict], batch_size: int = 8,
                   max_length: int | None = None) -> list[ExampleLoss]:
    """Mean CE over the instruction tokens and over the output tokens of every row."""
    model.eval()
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id or 0
    table = weight_table(1.0, 1.0)
    encoded = []
    for i, row in enumerate(rows):
        try:
            encoded.append(encoder.encode(row))
        except RowError as exc:
            raise ValueError(f"row {i}: {exc}") from exc  # which row: the encoder only knows the field
    if max_length:
        encoded = [e.truncate(max_length) for e in encoded]
    results = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        length = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        segs = torch.full((len(chunk), length), int(Segment.PAD), dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            segs[i, :len(e.segment_ids)] = torch.tensor(e.segment_ids)
            mask[i, :len(e.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i in range(len(chunk)):
            out = segment_weighted_loss(logits[i:i + 1], ids[i:i + 1].to(device), segs[i:i + 1].to(device), table)
            ni, no = int(out.instruction_count), int(out.output_count)
            results.append(ExampleLoss(
                start + i,
                float(out.instruction_sum) / ni if ni else None,
                float(out.output_sum) / no if no else None,
                ni,
                no,
            ))
    return results


def pooled(losses: Iterable[ExampleLoss]) -> dict[str, float]:
    """Token-weighted means over all examples (what the trainer logs)."""
    losses = list(losses)
    out = {}
    for seg in ("instruction", "output"):
        n = sum(getattr(x, f"{seg}_tokens") for x in losses)
        s = sum((getattr(x, f"{seg}_loss") or 0.0) * getattr(x, f"{seg}_tokens") for x in losses)
        out[f"{seg}_loss"] = s / n if n else float("nan")
    return out
