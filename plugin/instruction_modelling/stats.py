"""Instruction and output lengths of a dataset, in words (the paper's Table 5 and Figure 2 axes).

One definition for the whole project (data preparation, the diagnose command, the recipes table):

* instruction = every non-assistant message (system, user, tool); for Alpaca rows the
  instruction, input and system fields; for prompt/completion rows the prompt;
* output = every assistant message; the Alpaca output; the completion;
* words = ``len(text.split())``;
* ratio = mean instruction words / mean output words (a ratio of means, as in the paper).

The paper's Table 5 counts every message one word longer than ``len(text.split())``. On the
released LIMA, Dolly 3k and Alpaca 5k files, adding 1 per message reproduces Table 5 to the
printed two decimals, so ``dataset_stats`` reports that convention too (``table5_*`` keys).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .segments import RowError, RowFields, detect_format, normalize_messages


def side_texts(row: Mapping[str, Any], fields: RowFields = RowFields()) -> tuple[list[str], list[str]]:
    """``(instruction_texts, output_texts)``: one text per message on each side.

    Alpaca and prompt/completion rows have one text per side (the paper wraps an Alpaca triple
    into a single user message). Raises ``RowError`` naming the bad field.
    """
    fmt = detect_format(row, fields)
    if fmt == "messages":
        messages = normalize_messages(row, fields)
        return ([m.content for m in messages if m.role != "assistant"],
                [m.content for m in messages if m.role == "assistant"])
    if fmt == "alpaca":
        names, out_name = (fields.system, fields.instruction, fields.input), fields.output
    else:
        names, out_name = (fields.prompt,), fields.completion
    for name in (*names, out_name):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise RowError(name, f"must be a string, got {type(row[name]).__name__}")
    instruction = "\n".join(row[n] for n in names if row.get(n))
    return [instruction], [row.get(out_name) or ""]


def count_words(row: Mapping[str, Any], fields: RowFields = RowFields()) -> tuple[int, int]:
    """``(instruction_words, output_words)`` of one row, words = ``len(text.split())``."""
    instruction, output = side_texts(row, fields)
    return sum(len(t.split()) for t in instruction), sum(len(t.split()) for t in output)


def dataset_stats(rows: Iterable[Mapping[str, Any]], fields: RowFields = RowFields(),
                  source: str = "<rows>") -> dict[str, float]:
    """Mean instruction and output words and their ratio over ``rows``.

    Returns a dict with ``n``, ``mean_instruction_words``, ``mean_output_words``, ``ratio`` and
    the same three under the paper's Table 5 convention (``table5_mean_instruction_words``,
    ``table5_mean_output_words``, ``table5_ratio``: +1 word per message). A bad row raises
    ``ValueError`` naming ``source``, the row index and the field.
    """
    n = instruction = output = instruction_msgs = output_msgs = 0
    for i, row in enumerate(rows):
        try:
            ins, outs = side_texts(row, fields)
        except RowError as exc:
            raise ValueError(f"{source} row {i}: {exc}") from exc
        n += 1
        instruction += sum(len(t.split()) for t in ins)
        output += sum(len(t.split()) for t in outs)
        instruction_msgs += len(ins)
        output_msgs += len(outs)
    if n == 0:
        raise ValueError(f"{source}: no rows")
    mi, mo = instruction / n, output / n
    ti, to = (instruction + instruction_msgs) / n, (output + output_msgs) / n
    return {
        "n": n,
        "mean_instruction_words": mi,
        "mean_output_words": mo,
        "ratio": mi / mo if mo else float("inf"),
        "table5_mean_instruction_words": ti,
        "table5_mean_output_words": to,
        "table5_ratio": ti / to if to else float("inf"),
    }
