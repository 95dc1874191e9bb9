"""Tulu V2 subsets of the paper's analyses (Figure 2 and Figure 6).

* ``percent_subset``: the 10/20/50% subsets. The paper says "randomly sampled", but its code
  (``src/reformat_tulu_dataset.py``) is deterministic and stratified by source: each source
  (the row's ``dataset`` field) gets ``int(share * size)`` rows, taken as its *first* rows in file
  order; the rounding remainder goes to the first rows, in file order, whose source quota is used
  up. This reproduces the paper's sizes (32,618 / 65,236 / 163,090 of 326,181).
* ``ratio_subset``: the Figure 2 subsets of ``count`` rows whose per-example instruction/output
  word ratio is closest to ``alpha`` (``src/select_data.py``: shuffle, stable sort by
  ``|ratio - alpha|``, keep the first ``count``). The paper's script does not seed its shuffle
  and its length helper is missing from the repository, so its exact subsets cannot be
  reproduced; here the shuffle is seeded and lengths are ``stats.count_words`` words.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from instruction_modelling.core.stats import count_words


def percent_subset(rows: Sequence[dict], fraction: float, source_field: str = "dataset") -> list[dict]:
    """The paper's stratified first-k subset with ``int(fraction * len(rows))`` rows."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = len(rows)
    size = int(fraction * total)
    counts = Counter(r.get(source_field) for r in rows)
    quota = {src: int(n / total * size) for src, n in counts.items()}
    remainder = size - sum(quota.values())
    picked = []
    for row in rows:
        src = row.get(source_field)
        if quota[src] > 0:
            quota[src] -= 1
            picked.append(row)
        elif remainder > 0:
            remainder -= 1
            picked.append(row)
    return picked


def example_ratio(row: dict) -> float:
    """Instruction words / output words of one row (0 when the output is empty, as the paper)."""
    instruction, output = count_words(row)
    return instruction / output if output else 0.0


def ratio_subset(rows: Sequence[dict], alpha: float, count: int, seed: int = 42) -> list[dict]:
    """``count`` rows whose instruction/output ratio is closest to ``alpha``."""
    if count > len(rows):
        raise ValueError(f"asked for {count} rows but the dataset has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    ratios = {i: example_ratio(rows[i]) for i in order}
    order.sort(key=lambda i: abs(ratios[i] - alpha))  # stable: ties keep the shuffled order
    return [rows[i] for i in order[:count]]
