"""Which tokens of an example are template, instruction or output.

This module is the core of Instruction Modelling (Eq. 4 of Shi et al., 2024): every token
belongs to exactly one segment, and only instruction and output tokens may carry loss.
It has no Axolotl import and works on plain strings, token ids and a Hugging Face *fast*
tokenizer (for character offsets).

How a chat example is segmented
-------------------------------
1. The conversation is rendered twice with the chat template: once as it is, and once with
   every message's content replaced by a unique sentinel. The sentinel render is the
   *skeleton*: the text between sentinels is template text (role tags, separators, BOS,
   default system prompts, ...).
2. Walking both renders in step (in render order, so templates that move a content, such as
   Mistral v3 putting the system prompt into the last user turn, work) gives the exact
   character span of every message's content in the real render. Templates that ``trim`` content are handled (the stripped content is
   matched); a template that drops, repeats or rewrites a message's content is an error, so
   no example is ever trained with a mask we cannot justify.
3. The whole text is tokenised once, as ``apply_chat_template`` would, and each token takes the
   segment of the characters it covers. A token that straddles template text and content
   (a tokenizer merge across the boundary) is treated conservatively: it becomes a template
   token and carries no loss (``EncodedExample.straddled`` counts them). The one exception is
   whitespace glue: a token made of content plus template *whitespace* only (" 4", "▁Yes",
   "?\n") joins that content, since the tokenizer attaches the space to the word the model
   must produce.
4. The end-of-turn token that closes an assistant turn (EOS, ``<|im_end|>``, ``<|eot_id|>``, ...:
   the first non-whitespace token after the content, if it is one of ``end_token_ids``) joins
   the output segment, so the model learns to stop. End-of-turn tokens after system and user
   turns stay template tokens.

Alpaca-style and prompt/completion rows are turned into the same ``Piece`` list by their own
renderers, so one function (``encode_pieces``) assigns segments for every format.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Mapping, Sequence


class Segment(IntEnum):
    """Segment id of a token, stored per token in the ``segment_ids`` column (0 pads)."""

    TEMPLATE = 0  # role tags, separators, BOS, template text: never carries loss
    SYSTEM = 1  # system prompt content (instruction side)
    USER = 2  # user content; Alpaca instruction and input; prompt (instruction side)
    OUTPUT = 3  # assistant content and the end-of-turn token closing it; completion
    TOOL = 4  # tool / function results fed back to the model (instruction side)


INSTRUCTION_SEGMENTS = (Segment.SYSTEM, Segment.USER, Segment.TOOL)
OUTPUT_SEGMENTS = (Segment.OUTPUT,)

ROLE_SEGMENT = {
    "system": Segment.SYSTEM,
    "user": Segment.USER,
    "assistant": Segment.OUTPUT,
    "tool": Segment.TOOL,
}
CANONICAL_ROLES = tuple(ROLE_SEGMENT)

# Dataset role spellings that map to the canonical roles without any configuration.
DEFAULT_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}

# End-of-turn markers of common chat templates; the tokenizer's EOS is always included.
KNOWN_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)

_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"  # private-use chars: never trimmed


class RowError(ValueError):
    """A row that cannot be encoded. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Piece:
    """A run of text that belongs to one segment."""

    text: str
    segment: Segment


@dataclass(frozen=True)
class Message:
    role: str  # canonical: system | user | assistant | tool
    content: str


@dataclass
class EncodedExample:
    """Token ids with one segment id per token.

    Attributes:
        input_ids: token ids, length T.
        segment_ids: ``Segment`` value per token, length T.
        straddled: tokens that covered template text and content at once (no loss).
    """

    input_ids: list[int]
    segment_ids: list[int]
    straddled: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def labels(self) -> list[int]:
        """Labels for a causal LM: the token id where the token is content, else -100."""
        return [
            tok if seg != Segment.TEMPLATE else -100
            for tok, seg in zip(self.input_ids, self.segment_ids)
        ]

    def truncate(self, max_len: int) -> "EncodedExample":
        return EncodedExample(
            self.input_ids[:max_len], self.segment_ids[:max_len], self.straddled, self.meta
        )


# ----------------------------------------------------------------------------------------
# Row normalisation: every supported format becomes a list of canonical messages.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFields:
    """Field names of the supported row formats (Axolotl's dataset options map onto these)."""

    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    prompt: str = "prompt"
    completion: str = "completion"
    role_aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLE_ALIASES))


def detect_format(row: Mapping[str, Any], fields: RowFields) -> str:
    """``messages``, ``alpaca`` or ``prompt_completion``, from the fields a row has."""
    if fields.messages in row and row[fields.messages] is not None:
        return "messages"
    if fields.instruction in row or fields.output in row:
        return "alpaca"
    if fields.prompt in row or fields.completion in row:
        return "prompt_completion"
    raise RowError(
        fields.messages,
        f"missing; a row needs '{fields.messages}' (chat), '{fields.instruction}'/'{fields.output}' "
        f"(Alpaca) or '{fields.prompt}'/'{fields.completion}'; found fields {sorted(row)}",
    )


def _text_field(row: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(name, "missing")
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(name, "is empty")
    return value


def normalize_messages(row: Mapping[str, Any], fields: RowFields) -> list[Message]:
    """Validate a chat row and map its roles to canonical ones.

    The conversation must contain content in every message and end with an assistant turn:
    a trailing instruction has no output to learn and signals a truncated or malformed row.
    """
    raw = row.get(fields.messages)
    name = fields.messages
    if raw is None:
        raise RowError(name, "missing")
    if not isinstance(raw, (list, tuple)):
        raise RowError(name, f"must be a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RowError(name, "is empty")
    messages = []
    for i, msg in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(msg, Mapping):
            raise RowError(where, f"must be an object, got {type(msg).__name__}")
        role = msg.get(fields.role)
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}.{fields.role}", "missing" if role is None else "must be a non-empty string")
        canonical = fields.role_aliases.get(role)
        if canonical is None:
            known = ", ".join(sorted(fields.role_aliases))
            raise RowError(
                f"{where}.{fields.role}",
                f"unknown role '{role}' (known: {known}); map it with the dataset's `roles:` option",
            )
        content = msg.get(fields.content)
        if content is None:
            raise RowError(f"{where}.{fields.content}", "missing")
        if not isinstance(content, str):
            raise RowError(f"{where}.{fields.content}", f"must be a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"{where}.{fields.content}", "is empty")
        messages.append(Message(canonical, content))
    if messages[-1].role != "assistant":
        raise RowError(
            f"{name}[{len(messages) - 1}].{fields.role}",
            f"the conversation ends with a '{messages[-1].role}' turn; it must end with an assistant turn",
        )
    return messages


# ----------------------------------------------------------------------------------------
# Renderers: rows -> pieces of (text, segment).
# ----------------------------------------------------------------------------------------

RenderFn = Callable[[list[dict[str, str]]], str]


class TemplateError(RowError):
    """The chat template does not render a message's content verbatim (or at all)."""


def _sentinel(i: int) -> str:
    return f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}"


def chat_pieces(messages: Sequence[Message], render: RenderFn, messages_field: str = "messages") -> list[Piece]:
    """Split a rendered conversation into template and content pieces.

    Args:
        messages: canonical messages (see ``normalize_messages``).
        render: renders ``[{"role", "content"}, ...]`` to text with the chat template,
            without a generation prompt.
        messages_field: name used in error messages.

    Returns:
        Pieces whose texts concatenate to ``render(messages)`` exactly.
    """
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    try:
        real = render(as_dicts)
        skeleton = render([{"role": m.role, "content": _sentinel(i)} for i, m in enumerate(messages)])
    except Exception as exc:  # jinja raise_exception(), bad role order, ...
        raise TemplateError(messages_field, f"the chat template rejected the conversation: {exc}") from exc

    # Where each message's content sits in the skeleton. Templates may move a content (Mistral v3
    # puts the system prompt into the last user turn), so pieces follow render order.
    located = []
    for i in range(len(messages)):
        s = _sentinel(i)
        j = skeleton.find(s)
        if j < 0:
            hint = (" (some templates, e.g. Mistral v3's, place the system prompt only before a final user "
                    "turn); set the dataset's drop_system_message: true to train without it"
                    if messages[i].role == "system" else "")
            raise TemplateError(
                f"{messages_field}[{i}].content",
                f"the chat template does not render this message's content{hint}; refusing to guess its segment",
            )
        if skeleton.find(s, j + len(s)) >= 0:
            raise TemplateError(f"{messages_field}[{i}].content", "the chat template renders this content twice")
        located.append((j, j + len(s), i))
    located.sort()
    template_texts = []
    prev = 0
    for start, end, _ in located:
        template_texts.append(skeleton[prev:start])
        prev = end
    template_texts.append(skeleton[prev:])

    pieces: list[Piece] = []
    pos = 0
    for k, (_, _, i) in enumerate(located):
        msg = messages[i]
        tpl, nxt = template_texts[k], template_texts[k + 1]
        if not real.startswith(tpl, pos):
            raise TemplateError(
                f"{messages_field}[{i}].content",
                "the chat template's text around this message depends on its content; cannot locate it",
            )
        pos += len(tpl)
        if tpl:
            pieces.append(Piece(tpl, Segment.TEMPLATE))
        is_last = k == len(located) - 1
        for candidate in dict.fromkeys((msg.content, msg.content.strip(), msg.content.lstrip(), msg.content.rstrip())):
            end = pos + len(candidate)
            follows = real.startswith(nxt, end) and (not is_last or end + len(nxt) == len(real))
            if candidate and real.startswith(candidate, pos) and follows:
                break
        else:
            raise TemplateError(
                f"{messages_field}[{i}].content",
                "the chat template rewrites this message's content; cannot tell content from template",
            )
        pieces.append(Piece(candidate, ROLE_SEGMENT[msg.role]))
        pos = end
    if template_texts[-1]:
        pieces.append(Piece(template_texts[-1], Segment.TEMPLATE))
    return pieces


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _format_pieces(fmt: str, values: Mapping[str, tuple[str, Segment]]) -> list[Piece]:
    """Split a ``str.format`` template into template pieces and the named content pieces."""
    import string

    pieces = []
    for literal, name, _spec, _conv in string.Formatter().parse(fmt):
        if literal:
            pieces.append(Piece(literal, Segment.TEMPLATE))
        if name is not None:
            text, seg = values[name]
            pieces.append(Piece(text, seg))
    return pieces


def alpaca_pieces(row: Mapping[str, Any], fields: RowFields) -> list[Piece]:
    """Alpaca ``instruction``/``input``/``output`` with Axolotl's ``alpaca`` prompt text as template."""
    instruction = _text_field(row, fields.instruction)
    inp = _text_field(row, fields.input, required=False)
    output = _text_field(row, fields.output)
    system = _text_field(row, fields.system, required=False)
    fmt = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
    pieces = []
    if system.strip():
        # A per-row system prompt replaces Alpaca's fixed preamble and is instruction content.
        fmt = fmt.split("\n\n", 1)[1]
        pieces += [Piece(system, Segment.SYSTEM), Piece("\n\n", Segment.TEMPLATE)]
    pieces += _format_pieces(fmt, {"instruction": (instruction, Segment.USER), "input": (inp, Segment.USER)})
    pieces.append(Piece(output, Segment.OUTPUT))
    return pieces


def prompt_completion_pieces(row: Mapping[str, Any], fields: RowFields) -> list[Piece]:
    """``prompt`` + ``completion``, joined by a space only when neither side has one (as the paper's code)."""
    prompt = _text_field(row, fields.prompt)
    completion = _text_field(row, fields.completion)
    pieces = [Piece(prompt, Segment.USER)]
    if not prompt[-1].isspace() and not completion[0].isspace():
        pieces.append(Piece(" ", Segment.TEMPLATE))
    pieces.append(Piece(completion, Segment.OUTPUT))
    return pieces


# ----------------------------------------------------------------------------------------
# Tokenisation: pieces -> token ids and segment ids.
# ----------------------------------------------------------------------------------------


def end_of_turn_ids(tokenizer: Any, extra_tokens: Sequence[str] = ()) -> frozenset[int]:
    """Ids that close an assistant turn: EOS, ``extra_tokens`` and known markers in the vocab."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in (*extra_tokens, *KNOWN_END_OF_TURN_TOKENS):
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return frozenset(ids)


def assign_segments(
    text: str,
    pieces: Sequence[Piece],
    offsets: Sequence[tuple[int, int]],
    input_ids: Sequence[int],
    end_ids: frozenset[int],
) -> tuple[list[int], int]:
    """Segment id per token, from character offsets.

    Args:
        text: the concatenated piece texts (what was tokenised).
        pieces: the pieces, in order.
        offsets: ``(start, end)`` character offsets per token (a fast tokenizer's offset mapping).
        input_ids: token ids (to recognise end-of-turn tokens).
        end_ids: ids that close an assistant turn.

    Returns:
        ``(segment_ids, straddled)``.
    """
    starts, ends, segs = [], [], []
    pos = 0
    for p in pieces:
        starts.append(pos)
        pos += len(p.text)
        ends.append(pos)
        segs.append(p.segment)
    assert pos == len(text), "pieces do not cover the tokenised text"

    segment_ids = [Segment.TEMPLATE] * len(offsets)
    piece_of_token = [-1] * len(offsets)
    straddled = 0
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue  # zero-width (e.g. added BOS): template
        k = bisect.bisect_right(starts, s) - 1
        if e <= ends[k]:
            segment_ids[t] = segs[k]
            piece_of_token[t] = k
            continue
        covered = range(k, bisect.bisect_left(starts, e))
        content = [j for j in covered if segs[j] != Segment.TEMPLATE]
        if not content:
            piece_of_token[t] = k
            continue
        # Merged across a template/content boundary. Whitespace glue (" 4", "▁Yes", "?\n") joins
        # the one content piece it touches; any other template text keeps the token loss-free.
        glue_ok = len(content) == 1 and all(
            not text[max(s, starts[j]):min(e, ends[j])].strip() for j in covered if j != content[0]
        )
        if glue_ok:
            segment_ids[t] = segs[content[0]]
            piece_of_token[t] = content[0]
        else:
            straddled += 1

    # End-of-turn after each output piece: the first non-whitespace token that starts
    # after the content, inside the following template text.
    for k, p in enumerate(pieces):
        if p.segment != Segment.OUTPUT:
            continue
        t = _first_token_at(offsets, ends[k])
        while t < len(offsets):
            s, e = offsets[t]
            if s >= ends[k] and piece_of_token[t] != -1 and segs[piece_of_token[t]] != Segment.TEMPLATE:
                break  # reached the next content: no end-of-turn token in between
            if e > s and text[s:e].strip():
                if input_ids[t] in end_ids and segment_ids[t] == Segment.TEMPLATE:
                    segment_ids[t] = Segment.OUTPUT
                break
            t += 1
    return [int(x) for x in segment_ids], straddled


def _first_token_at(offsets: Sequence[tuple[int, int]], char_pos: int) -> int:
    """Index of the first token starting at or after ``char_pos`` (offsets are sorted)."""
    lo, hi = 0, len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][0] < char_pos:
            lo = mid + 1
        else:
            hi = mid
    return lo


def encode_pieces(
    pieces: Sequence[Piece],
    tokenizer: Any,
    end_ids: frozenset[int],
    *,
    add_bos: bool = False,
    add_eos: bool = False,
) -> EncodedExample:
    """Tokenise pieces as one text and give each token its segment.

    Args:
        pieces: output of a renderer.
        tokenizer: a Hugging Face fast tokenizer.
        end_ids: ids that close an assistant turn (``end_of_turn_ids``).
        add_bos: prepend the BOS id (template) for formats without a chat template.
        add_eos: append the EOS id (output) for formats without a chat template.

    Example:
        >>> pieces = [Piece("Q: ", Segment.TEMPLATE), Piece("2+2?", Segment.USER),
        ...           Piece(" A: ", Segment.TEMPLATE), Piece("4", Segment.OUTPUT)]
        >>> ex = encode_pieces(pieces, tok, end_of_turn_ids(tok), add_eos=True)  # doctest: +SKIP
    """
    text = "".join(p.text for p in pieces)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _encoded(text, pieces, enc["input_ids"], enc["offset_mapping"], tokenizer, end_ids, add_bos, add_eos)


def encode_many(
    batch: Sequence[Sequence[Piece]],
    tokenizer: Any,
    end_ids: frozenset[int],
    *,
    add_bos: Sequence[bool] | bool = False,
    add_eos: Sequence[bool] | bool = False,
) -> list[EncodedExample]:
    """``encode_pieces`` for many examples with one batched tokenizer call (faster)."""
    texts = ["".join(p.text for p in pieces) for pieces in batch]
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    n = len(texts)
    bos = [add_bos] * n if isinstance(add_bos, bool) else list(add_bos)
    eos = [add_eos] * n if isinstance(add_eos, bool) else list(add_eos)
    return [
        _encoded(texts[i], batch[i], enc["input_ids"][i], enc["offset_mapping"][i], tokenizer, end_ids, bos[i], eos[i])
        for i in range(n)
    ]


def _encoded(text, pieces, input_ids, offsets, tokenizer, end_ids, add_bos, add_eos) -> EncodedExample:
    segment_ids, straddled = assign_segments(text, pieces, offsets, input_ids, end_ids)
    input_ids = list(input_ids)
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.insert(0, int(tokenizer.bos_token_id))
        segment_ids.insert(0, int(Segment.TEMPLATE))
    if add_eos and tokenizer.eos_token_id is not None:
        input_ids.append(int(tokenizer.eos_token_id))
        segment_ids.append(int(Segment.OUTPUT))
    return EncodedExample(input_ids, segment_ids, straddled)


# ----------------------------------------------------------------------------------------
# One entry point for a row of any format.
# ----------------------------------------------------------------------------------------


@dataclass
class RowEncoder:
    """Encodes dataset rows of any supported format into ``EncodedExample``.

    Args:
        tokenizer: a Hugging Face fast tokenizer (character offsets are required).
        render: chat-template renderer for ``messages`` rows; ``None`` disables chat rows.
        fields: field names (see ``RowFields``).
        end_tokens: extra end-of-turn token strings (Axolotl's ``eot_tokens``).
        add_bos_to_plain: prepend BOS to Alpaca and prompt/completion rows (when the tokenizer has one).
    """

    tokenizer: Any
    render: RenderFn | None
    fields: RowFields = field(default_factory=RowFields)
    end_tokens: Sequence[str] = ()
    add_bos_to_plain: bool = True

    def __post_init__(self):
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "instruction_modelling needs a fast (Rust) tokenizer for character offsets; "
                f"{type(self.tokenizer).__name__} is a slow one (load it with use_fast=True)"
            )
        self.end_ids = end_of_turn_ids(self.tokenizer, self.end_tokens)

    def pieces(self, row: Mapping[str, Any]) -> tuple[list[Piece], bool]:
        """``(pieces, plain)``: plain formats get BOS/EOS ids added around them."""
        fmt = detect_format(row, self.fields)
        if fmt == "messages":
            if self.render is None:
                raise RowError(self.fields.messages, "chat rows need a chat template (set `chat_template:`)")
            return chat_pieces(normalize_messages(row, self.fields), self.render, self.fields.messages), False
        if fmt == "alpaca":
            return alpaca_pieces(row, self.fields), True
        return prompt_completion_pieces(row, self.fields), True

    def encode(self, row: Mapping[str, Any]) -> EncodedExample:
        """One row; raises ``RowError`` naming the bad field."""
        result = self.encode_rows([row])[0]
        if isinstance(result, RowError):
            raise result
        return result

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[EncodedExample | RowError]:
        """``encode`` for many rows with one batched tokenizer call; a bad row yields its ``RowError``."""
        results: list[EncodedExample | RowError | None] = [None] * len(rows)
        good, batch, plain = [], [], []
        for i, row in enumerate(rows):
            try:
                pieces, is_plain = self.pieces(row)
            except RowError as exc:
                results[i] = exc
                continue
            good.append(i)
            batch.append(pieces)
            plain.append(is_plain)
        encoded = encode_many(batch, self.tokenizer, self.end_ids,
                              add_bos=[p and self.add_bos_to_plain for p in plain], add_eos=plain)
        for i, ex in zip(good, encoded):
            results[i] = ex
        return results


@dataclass
class ChatRenderer:
    """The ``render`` of a ``RowEncoder``: a conversation rendered with a chat template (picklable)."""

    tokenizer: Any
    chat_template: str
    template_kwargs: dict = field(default_factory=dict)

    def __call__(self, messages):
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=False,
            chat_template=self.chat_template,
            **self.template_kwargs,
        )


def describe_row(path: str | None, index: int) -> str:
    """``lima.jsonl row 12 (line 13)``: how errors name a row of a data file."""
    import os

    where = f"{os.path.basename(str(path)) if path else '<dataset>'} row {index}"
    if path and str(path).endswith(".jsonl"):
        where += f" (line {index + 1})"
    return where
