"""Raw records -> the messages rows the recipes train on, one converter per source format.

Output rows have the paper's shape, ``{"dataset", "id", "messages": [{"role", "content"}, ...]}``,
and are written with ``json.dumps`` defaults, as the paper's scripts did, so a prepared file can be
compared byte for byte with the paper's release. Every output row passes the plugin's own row
check (``segments.normalize_messages``), so a prepared file never fails at training time.

Source formats:

* ``lima``: GAIR/lima ``{"conversations": [user, assistant, user, ...]}``. As in the paper, a
  conversation with an odd number of turns loses its last (user) turn; that is counted.
* ``triples``: AlpaGasus / Code Alpaca ``{"instruction", "input", "output"}`` lists, wrapped in the
  paper's random text templates (``templates.py``).
* ``messages``: rows that are already chat rows (LESS selections, Tulu V2). Any converter also
  accepts such rows, so the paper's own released ``.jsonl`` files go through the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from instruction_modelling.core.read import InputError, Records
from instruction_modelling.core.segments import RowError, RowFields, normalize_messages

from .catalog import DatasetSpec
from .templates import SEED, STREAM_OFFSET, TemplateStream, fill, has_input

FIELDS = RowFields()


class BadRowsError(InputError):
    """Rows that cannot be converted (``--on-bad-rows error``)."""


@dataclass
class Converted:
    """Converted rows and what the conversion dropped or changed, for the report."""

    rows: list[dict]
    skipped: list[str] = field(default_factory=list)  # "<file> row i: field 'x': why"
    notes: list[str] = field(default_factory=list)


def _messages_row(record: dict, dataset: str, row_id: str) -> dict:
    """Validate an existing chat row; keep its dataset/id, write canonical roles."""
    messages = normalize_messages(record, FIELDS)
    return {
        "dataset": record.get("dataset", dataset),
        "id": record.get("id", row_id),
        "messages": [{"role": m.role, "content": m.content} for m in messages],
    }


def _string_field(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if value is None:
        raise RowError(name, "missing")
    if not isinstance(value, str):
        raise RowError(name, f"must be a string, got {type(value).__name__}")
    return value


class _Lima:
    def __init__(self, spec: DatasetSpec):
        self.cut = 0

    def __call__(self, record: dict, index: int) -> dict:
        if "messages" in record:
            return _messages_row(record, "lima", f"lima_{index}")
        turns = record.get("conversations")
        if turns is None:
            raise RowError("conversations", "missing (expected GAIR/lima rows or messages rows)")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RowError("conversations", "must be a list of strings")
        if len(turns) % 2:
            turns = turns[:-1]  # the paper drops a trailing user turn (no answer to learn)
            self.cut += 1
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
        return _messages_row({"messages": messages}, "lima", f"lima_{index}")

    def notes(self) -> list[str]:
        return [f"{self.cut} conversations had an odd number of turns; their last (user) turn was dropped, "
                "as in the paper"] if self.cut else []


class _Triples:
    def __init__(self, spec: DatasetSpec):
        self.dataset = spec.params.get("dataset", spec.name)
        self.id = spec.params.get("id", spec.name + "_{}")
        self.stream = TemplateStream(spec.params.get("seed", SEED), STREAM_OFFSET.get(spec.name, 0))

    def __call__(self, record: dict, index: int) -> dict:
        if "messages" in record:
            return _messages_row(record, self.dataset, self.id.format(index))
        # Draw first, whatever the record holds: a skipped record must still use its draw, or
        # every later row would get a different template than in the paper.
        raw_input = record.get("input")
        index_in_list = self.stream.next_index(has_input(raw_input) if isinstance(raw_input, str) else False)
        instruction = _string_field(record, "instruction")
        inp = _string_field(record, "input", required=False)
        output = _string_field(record, "output")
        wrapped = fill(instruction, inp, output, index_in_list)
        messages = [{"role": "user", "content": wrapped.prompt}, {"role": "assistant", "content": wrapped.completion}]
        return _messages_row({"messages": messages}, self.dataset, self.id.format(index))

    def notes(self) -> list[str]:
        return []


class _Messages:
    def __init__(self, spec: DatasetSpec):
        self.name = spec.name

    def __call__(self, record: dict, index: int) -> dict:
        return _messages_row(record, self.name, f"{self.name}_{index}")

    def notes(self) -> list[str]:
        return []


CONVERTERS: dict[str, Callable[[DatasetSpec], Any]] = {"lima": _Lima, "triples": _Triples, "messages": _Messages}


def convert(spec: DatasetSpec, records: Records, on_bad_rows: str = "error") -> Converted:
    """Convert every record; a bad one stops with its file, row and field, or is skipped and counted.

    Args:
        spec: the dataset (its ``kind`` picks the converter).
        records: raw records from ``read.read_local`` / ``read.read_online``.
        on_bad_rows: ``error`` (default) or ``skip``.
    """
    if spec.kind not in CONVERTERS:
        raise ValueError(f"{spec.name}: kind '{spec.kind}' is derived from another dataset, not converted")
    converter = CONVERTERS[spec.kind](spec)
    out, skipped = [], list(records.unreadable)
    for i, record in enumerate(records.rows):
        try:
            if not isinstance(record, dict):
                raise RowError("<row>", f"must be a JSON object, got {type(record).__name__}")
            out.append(converter(record, i))
        except RowError as exc:
            message = f"{records.where(i)}: {exc}"
            if on_bad_rows != "skip":
                raise BadRowsError(message + " (--on-bad-rows skip drops and counts such rows)") from exc
            skipped.append(message)
    return Converted(out, skipped, converter.notes())
