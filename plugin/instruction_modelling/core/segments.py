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
   token and carries no loss (``EncodedExample.straddled`` counts them). The exceptions: whitespace
   glue, a token made of content plus template *whitespace* only (" 4", "▁Yes", "?\n"), joins that
   content, since the tokenizer attaches the space to the word the model must produce; a token
   made of output-side content only (".\n" ending a reasoning trace before "\n</think>") is
   trained; ``train_detail`` spans widen to tokens they partly cover, as Axolotl's do
   (``_widens``); and an added token (``<|START_THINKING|>``) that a located turn's edge cuts joins
   that turn, since the tokenizer never splits it.
4. The end token that closes an assistant turn (the tokenizer's EOS or one of Axolotl's
   ``eot_tokens``: the first one within 3 tokens after the turn, Axolotl's rule) joins the output
   segment, so the model learns to stop. End tokens after system, user and tool turns stay template
   tokens (Axolotl's ``train_on_eos`` chooses otherwise: ``last``, ``all``, ``none``).

Rows with tools, tool calls, reasoning or other message properties (or empty contents) take a
second path: each message is located as Axolotl's ``chat_template`` type locates a turn, by
diffing the real render against one where that message is only ``{role, content: sentinel}``.
What differs is everything the message's fields render to: for an assistant turn its text, the
tool-call JSON and the template's wrapper around it (all output), with the reasoning trace
located by a further diff (``Segment.REASONING``). The row's tool schemas are found as the JSON
the template writes, or their names and descriptions as written (system content); the template's
text around them stays template. An empty system/user/tool content renders nothing of its own
(template text its emptiness brings stays template), and a row whose tool schemas or tool calls
the template does not render is refused rather than trained without them.
Per-message training flags (``trained``, ``train_detail``) mask what they exclude.

Alpaca-style and prompt/completion rows are turned into the same ``Piece`` list by their own
renderers, so one function (``encode_pieces``) assigns segments for every format.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Mapping, Sequence


class Segment(IntEnum):
    """Segment id of a token, stored per token in the ``segment_ids`` column (the collators pad with ``PAD``)."""

    TEMPLATE = 0  # role tags, separators, BOS, template text: no loss unless `template` is given a weight
    SYSTEM = 1  # system prompt content (instruction side)
    USER = 2  # user content; Alpaca instruction and input; prompt (instruction side)
    OUTPUT = 3  # assistant text, tool calls and the end-of-turn token closing the turn; completion
    TOOL = 4  # tool / function results fed back to the model (instruction side)
    REASONING = 5  # an assistant turn's reasoning trace (reasoning_content): output side, own weight
    PAD = 6  # padding added by the collators: never a token of an example, never carries loss


INSTRUCTION_SEGMENTS = (Segment.SYSTEM, Segment.USER, Segment.TOOL)
OUTPUT_SEGMENTS = (Segment.OUTPUT, Segment.REASONING)

ROLE_SEGMENT = {
    "system": Segment.SYSTEM,
    "user": Segment.USER,
    "assistant": Segment.OUTPUT,
    "tool": Segment.TOOL,
}
CANONICAL_ROLES = tuple(ROLE_SEGMENT)
# Keys of ``im_role_weights``: the roles, plus ``reasoning`` (an assistant's reasoning trace) and
# ``template`` (BOS, role tags, separators: weight 0 by default, as Eq. 4 requires; PLW and WIT as
# their authors ran them weight the template like the prompt).
WEIGHT_KEY_SEGMENT = {**ROLE_SEGMENT, "reasoning": Segment.REASONING, "template": Segment.TEMPLATE}
WEIGHT_KEYS = tuple(WEIGHT_KEY_SEGMENT)

# How Axolotl's chat_template type renames roles before rendering when no `roles:` option is given;
# other roles reach the template as they are (Llama-3.1's ``ipython`` stays ``ipython``).
AXOLOTL_TEMPLATE_ROLES = {
    "human": "user",
    "user": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
    "tool": "tool",
}

TRAIN_ON_EOS = ("turn", "last", "all", "none")

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

# End-of-turn markers of common chat templates. Only the tokenizer's EOS and the configured
# ``eot_tokens`` are trained (as in Axolotl); these are named in a warning when a template uses one
# that is not configured (``unconfigured_end_markers``).
KNOWN_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)

# How many tokens after a turn its end token may come (Axolotl's chat_template allows 3).
END_OF_TURN_WINDOW = 3

_SENTINEL_OPEN, _SENTINEL_CLOSE = "\ue000", "\ue001"  # private-use chars: never trimmed


class RowError(ValueError):
    """A row that cannot be encoded. ``field`` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Piece:
    """A run of text that belongs to one segment.

    Attributes:
        glue: a TEMPLATE piece whose whitespace may glue to a neighbouring content token; False for
            content masked by a training flag (its characters never carry loss).
        end_of_turn: segment that the end-of-turn token right after this piece joins (None: it stays
            template).
        widen_into: content that a ``train_detail`` span leaves untrained (a TEMPLATE piece): a token
            that also covers trained content of the turn is trained, as Axolotl widens a span to the
            tokens it partly covers.
    """

    text: str
    segment: Segment
    glue: bool = True
    end_of_turn: Segment | None = None
    widen_into: bool = False


@dataclass(frozen=True)
class Message:
    """One turn. ``turn`` is what the chat template receives (Axolotl's turn dict: mapped role,
    content, tool_calls, reasoning, name, ...); ``trained``/``train_detail`` are the per-message
    training flags (``message_field_training`` / ``message_field_training_detail``)."""

    role: str  # canonical: system | user | assistant | tool
    content: str
    turn: Mapping[str, Any] | None = None
    trained: bool | None = None
    train_detail: tuple | None = None

    def template_turn(self) -> dict:
        return dict(self.turn) if self.turn is not None else {"role": self.role, "content": self.content}


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
    # Chat rows as Axolotl's chat_template type reads them:
    template_roles: Mapping[str, str] = field(default_factory=lambda: dict(AXOLOTL_TEMPLATE_ROLES))
    property_mappings: Mapping[str, str] | None = None  # template key -> message key (role/content above)
    tools: str = "tools"
    thinking: str = "reasoning_content"  # message field with the reasoning trace
    template_thinking_key: str = "reasoning_content"  # the name the template reads it under
    training: str | None = None  # message_field_training
    training_detail: str | None = None  # message_field_training_detail


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


def without_nulls(obj):
    """Drop ``None`` values recursively: Arrow fills fields another row has with nulls (Axolotl does the same)."""
    if isinstance(obj, Mapping):
        return {k: without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [without_nulls(v) for v in obj]
    return obj


def _json_field(value, where: str):
    """A JSON-encoded string field (``tools``, tool-call ``arguments``) decoded, as Axolotl does."""

    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(where, f"is a string that is not valid JSON ({exc})") from exc
    except RecursionError:
        raise RowError(where, "is JSON nested too deeply to read") from None


def row_tools(row: Mapping[str, Any], fields: RowFields) -> list | None:
    """The row's tool schemas (``tools``), decoded like Axolotl's chat_template type; None if absent."""
    tools = without_nulls(row.get(fields.tools))
    if tools is None:
        return None
    tools = _json_field(tools, fields.tools)
    if not isinstance(tools, list):
        raise RowError(fields.tools, f"must be a list of tool schemas, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and "parameters" in tool["function"]:
            tool["function"]["parameters"] = _json_field(
                tool["function"]["parameters"], f"{fields.tools}[{i}].function.parameters")
    return tools or None


def _training_detail(value, where: str, content: str) -> tuple:
    """The checked ``training_detail`` spans of one content, as ``(begin, end_inclusive, train)``.

    Each span needs integer offsets (not booleans) with ``0 <= begin_offset <= end_offset <
    len(content)`` and a boolean ``train``; anything else is a bad row naming the span, since a
    string ``"false"`` or an offset past the end would otherwise train the wrong characters.
    Overlapping spans are resolved by one rule, whatever their order: a character any span marks
    ``train: false`` is not trained. (The spans are returned with the untrained ones last, so that
    marking them in order applies the rule.)
    """
    if not isinstance(value, (list, tuple)):
        raise RowError(where, f"must be a list of {{begin_offset, end_offset, train}}, got {type(value).__name__}")
    spans = []
    for j, d in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(d, Mapping):
            raise RowError(here, f"must be {{begin_offset: int, end_offset: int (inclusive), train: bool}}, "
                                 f"got {type(d).__name__}")
        for key in ("begin_offset", "end_offset"):
            if type(d.get(key)) is not int:  # bool is an int subclass: `true` must not read as 1
                got = "missing" if key not in d else f"got {d[key]!r}"
                raise RowError(f"{here}.{key}", f"must be an integer character offset, {got}")
        if not isinstance(d.get("train"), bool):
            got = "missing" if "train" not in d else f"got {d['train']!r}"
            raise RowError(f"{here}.train", f"must be true or false, {got}")
        begin, end = d["begin_offset"], d["end_offset"]
        if not 0 <= begin <= end < len(content):
            raise RowError(here, f"offsets {begin}..{end} (end inclusive) are not inside the content "
                                 f"(characters 0..{len(content) - 1})" if content else
                                 f"offsets {begin}..{end} point into an empty content")
        spans.append((begin, end, d["train"]))
    return tuple(sorted(spans, key=lambda sp: not sp[2]))


def _check_tool_calls(calls, where: str) -> None:
    """Each tool call names its function with a non-empty string (``{"function": {"name": ...}}``, or
    ``{"name": ...}`` as some templates also accept): a call without one would be trained as
    ``{"name": ""...}`` or ``"42"``."""
    if calls is None:
        return
    if not isinstance(calls, (list, tuple)):
        raise RowError(where, f"must be a list of tool calls, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise RowError(f"{where}[{k}]", f"must be an object, got {type(call).__name__}")
        function, path = (call["function"], f"{where}[{k}].function") if "function" in call else (call, f"{where}[{k}]")
        if not isinstance(function, Mapping):
            raise RowError(path, f"must be an object with a name, got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            got = "missing" if name is None else f"got {name!r}"
            raise RowError(f"{path}.name", f"must be the function's name (a non-empty string), {got}")


def _template_turn(msg: Mapping[str, Any], fields: RowFields, where: str) -> dict:
    """What Axolotl's chat_template type passes to the template for one message: the mapped
    properties, every other property the message has (tool_calls, name, ...), the role renamed
    as Axolotl renames it, tool-call arguments decoded from JSON strings."""
    if len(msg) == 2 and fields.role in msg and fields.content in msg and set(fields.property_mappings or ()) <= {
            "role", "content"}:  # the common plain message: no mapping work
        return {"role": fields.template_roles.get(msg[fields.role], msg[fields.role]), "content": msg[fields.content]}
    mappings = dict(fields.property_mappings or {})
    mappings.setdefault("role", fields.role)
    mappings.setdefault("content", fields.content)
    mappings.setdefault(fields.template_thinking_key, fields.thinking)
    turn = {key: msg[src] for key, src in mappings.items() if msg.get(src) is not None}
    skip = set(mappings.values()) | {fields.training, fields.training_detail}
    for key, value in msg.items():
        if key not in skip and key not in turn and value is not None:
            turn[key] = value
    turn["role"] = fields.template_roles.get(turn["role"], turn["role"])
    _check_tool_calls(turn.get("tool_calls"), f"{where}.tool_calls")
    for k, call in enumerate(turn.get("tool_calls") or []):
        if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping) and "arguments" in call["function"]:
            call["function"] = dict(call["function"])
            call["function"]["arguments"] = _json_field(
                call["function"]["arguments"], f"{where}.tool_calls[{k}].function.arguments")
    return turn


def normalize_messages(row: Mapping[str, Any], fields: RowFields, *, drop_system: bool = False) -> list[Message]:
    """Validate a chat row and map its roles to canonical ones.

    Every message needs a string content; it may be empty (an empty system prompt renders no
    content), except an assistant turn, which needs content or ``tool_calls``. The conversation
    must end with an assistant turn: a trailing instruction has no output to learn and signals a
    truncated or malformed row. A top-level ``system`` field becomes the system turn when the
    conversation has none (as in Axolotl).
    """
    raw = without_nulls(row.get(fields.messages))
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
        tool_calls = msg.get("tool_calls")
        if content is None and not (canonical == "assistant" and tool_calls):
            raise RowError(f"{where}.{fields.content}", "missing")
        if isinstance(content, list):
            raise RowError(f"{where}.{fields.content}",
                           "a list of content parts is not supported by type instruction_modelling; use a string "
                           "(and message_field_training_detail for partial training)")
        if content is not None and not isinstance(content, str):
            raise RowError(f"{where}.{fields.content}", f"must be a string, got {type(content).__name__}")
        content = content or ""
        if canonical == "assistant" and not content.strip() and not tool_calls:
            raise RowError(f"{where}.{fields.content}", "is empty (an assistant turn needs content or tool_calls)")
        reasoning = msg.get(fields.thinking)
        if reasoning is not None and not isinstance(reasoning, str):
            raise RowError(f"{where}.{fields.thinking}", f"must be a string, got {type(reasoning).__name__}")
        trained = msg.get(fields.training) if fields.training else None
        if trained is not None and not isinstance(trained, bool):
            raise RowError(f"{where}.{fields.training}", f"must be true or false, got {trained!r}")
        detail = msg.get(fields.training_detail) if fields.training_detail else None
        if detail is not None:
            detail = _training_detail(detail, f"{where}.{fields.training_detail}", content)
        turn = _template_turn(msg, fields, where)
        messages.append(Message(canonical, content, turn, trained, detail))
    system = row.get(fields.system)
    if messages[0].role != "system" and isinstance(system, str):
        messages.insert(0, Message("system", system, {"role": "system", "content": system}))
    if drop_system and messages[0].role == "system":
        messages = messages[1:]
    if not messages or messages[-1].role != "assistant":
        last = messages[-1].role if messages else "nothing"
        raise RowError(
            f"{name}[{len(raw) - 1}].{fields.role}",
            f"the conversation ends with a '{last}' turn; it must end with an assistant turn",
        )
    return messages


# ----------------------------------------------------------------------------------------
# Renderers: rows -> pieces of (text, segment).
# ----------------------------------------------------------------------------------------

RenderFn = Callable[..., str]  # render(turns) or render(turns, tools) -> text, no generation prompt


class TemplateError(RowError):
    """The chat template does not render a message's content verbatim (or at all)."""


def _sentinel(i: int) -> str:
    return f"{_SENTINEL_OPEN}{i}{_SENTINEL_CLOSE}"


def _render(render: RenderFn, turns: list[dict], tools, messages_field: str) -> str:
    try:
        return render(turns, tools) if tools else render(turns)
    except Exception as exc:  # jinja raise_exception(), bad role order, ...
        raise TemplateError(messages_field, f"the chat template rejected the conversation: {exc}") from exc


@dataclass
class _TurnSpan:
    """Where one message sits in the real render: ``region`` is everything the message's own fields
    render to (content, tool calls, reasoning); ``content``/``reasoning`` are sub-spans of it."""

    index: int
    region: tuple[int, int]
    content: tuple[int, int] | None = None
    reasoning: tuple[int, int] | None = None


def _is_plain(messages: Sequence[Message]) -> bool:
    return all(
        m.content.strip() and (m.turn is None or set(m.turn) <= {"role", "content"}) for m in messages
    )


def chat_pieces(
    messages: Sequence[Message],
    render: RenderFn,
    messages_field: str = "messages",
    *,
    tools: list | None = None,
    train_on_eos: str = "turn",
    thinking_key: str = "reasoning_content",
    tools_field: str = "tools",
    stats: dict | None = None,
) -> list[Piece]:
    """Split a rendered conversation into template and content pieces.

    Args:
        messages: canonical messages (see ``normalize_messages``).
        render: renders turns (``[{"role", "content", ...}]``, plus ``tools`` when given) to text with
            the chat template, without a generation prompt.
        messages_field: name used in error messages.
        tools: the row's tool schemas (``row_tools``); their JSON becomes system (instruction) content,
            the template's text around them stays template.
        train_on_eos: which end-of-turn tokens join the output: ``turn`` (after each trained assistant
            turn), ``last`` (the last one only), ``all`` (after every turn), ``none``.
        tools_field: the row's field with the tool schemas (named in errors).
        stats: if given, receives ``unweighted_schema_chars``: characters of the tool schemas' names and
            descriptions found nowhere in the render (a template that rewrites them; no loss).

    Returns:
        Pieces whose texts concatenate to the real render exactly.

    Raises:
        TemplateError: the template drops, rewrites or interleaves a content, or renders none of the
            row's tool schemas or of a turn's tool calls (they would be silently left out of training).
    """
    turns = [m.template_turn() for m in messages]
    real = _render(render, turns, tools, messages_field)
    if not tools and _is_plain(messages):
        spans = _plain_spans(messages, turns, real, render, messages_field)
    else:
        if tools:
            _check_tools_rendered(tools, turns, real, render, messages_field, tools_field)
        spans = _diff_spans(messages, turns, tools, real, render, messages_field, thinking_key)
    return _pieces_from_spans(messages, spans, real, tools, train_on_eos, messages_field, stats)


def _plain_spans(messages, turns, real, render, messages_field) -> list[_TurnSpan]:
    """Contents of role/content-only conversations, from one render with every content replaced by a
    sentinel (two renders in all, the fast path)."""
    skeleton = _render(render, [{**t, "content": _sentinel(i)} for i, t in enumerate(turns)], None, messages_field)
    # Where each message's content sits in the skeleton. Templates may move a content (Mistral v3
    # puts the system prompt into the last user turn), so spans follow render order.
    located = []
    for i in range(len(messages)):
        s = _sentinel(i)
        j = skeleton.find(s)
        if j < 0:
            raise TemplateError(f"{messages_field}[{i}].content", _not_rendered(messages[i]))
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

    spans = []
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
        spans.append(_TurnSpan(i, (pos, end), content=(pos, end)))
        pos = end
    return spans


def _not_rendered(msg: Message) -> str:
    hint = (" (some templates, e.g. Mistral v3's, place the system prompt only before a final user "
            "turn); set the dataset's drop_system_message: true to train without it"
            if msg.role == "system" else "")
    return f"the chat template does not render this message's content{hint}; refusing to guess its segment"


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` (at most ``limit``), by bisection on C compares."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _diff_span(real: str, other: str) -> tuple[int, int]:
    """The span of ``real`` that differs from ``other`` (common prefix and suffix removed)."""
    limit = min(len(real), len(other))
    start = _common_prefix(real, other, limit)
    suffix = _common_prefix(real[::-1], other[::-1], limit - start)
    return start, len(real) - suffix


def _template_named(render) -> str:
    name = getattr(render, "name", "")
    return f"the chat template ({name})" if name else "the chat template"


def _check_tools_rendered(tools, turns, real, render, messages_field, tools_field) -> None:
    """Refuse a row whose tool schemas the template leaves out of the render (chatml, llama3 and
    command_a without documents write no ``tools``): training on it would teach calls to tools the
    model was never shown. One render without ``tools``: the schemas are what differs."""
    try:
        start, end = _diff_span(real, _render(render, turns, None, messages_field))
    except TemplateError:  # a template that needs `tools` renders them
        return
    region = real[start:end]
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = (function or tool).get("name") if isinstance(function or tool, dict) else None
        if not region or (isinstance(name, str) and name and name not in region):
            what = "the row's tool schemas" if not region else f"the schema of tool {name!r}"
            raise TemplateError(tools_field if not region else f"{tools_field}[{k}]",
                                f"{_template_named(render)} does not render {what}, so training would leave them "
                                "out silently; use a chat template that renders `tools`, or remove the field")


def _diff_spans(messages, turns, tools, real, render, messages_field, thinking_key) -> list[_TurnSpan]:
    """Per message, diff the real render against one where that message is ``{role, content:
    sentinel}`` (its tool calls, reasoning, name... dropped), as Axolotl's chat_template type
    finds a turn: what differs is everything the message's fields render to, including the
    template's wrappers around tool calls. Position-dependent template logic (Qwen3 keeping
    reasoning only after the last user turn) is the same in both renders and cancels out."""

    def variant(i: int, turn: dict | None) -> str:
        return _render(render, turns[:i] + ([turn] if turn else []) + turns[i + 1:], tools, messages_field)

    spans = []
    for i, (msg, turn) in enumerate(zip(messages, turns)):
        where = f"{messages_field}[{i}]"
        empty = not msg.content.strip()
        if empty and set(turn) <= {"role", "content"}:
            # An empty content renders nothing of its own. Whatever the template writes for it (Command-A
            # opens a separate system turn when the system prompt is empty) is template text: a sentinel
            # in its place would take the template down another branch and make that text "content".
            continue
        if turn.get("tool_calls"):
            try:
                dropped = variant(i, {k: v for k, v in turn.items() if k != "tool_calls"}) == real
            except TemplateError:  # the template needs them (Mistral's role alternation): rendered
                dropped = False
            if dropped:
                raise TemplateError(f"{where}.tool_calls", f"{_template_named(render)} does not render tool calls, "
                                    "so training would leave them out silently; use a chat template that renders "
                                    "`tool_calls`")
        # Axolotl's dummy turn first. Templates that refuse it get, in turn: the turn with its other
        # fields kept (Mistral needs a tool result's tool_call_id), then the conversation without the
        # turn (Mistral's role-alternation check counts an assistant turn without tool_calls; such
        # templates have no role header, so the difference is exactly what the turn renders). An empty
        # system/user/tool content stays empty in the dummy, so the diff is what the turn's other fields
        # render; assistant turns keep Axolotl's sentinel, so that IT trains the tokens Axolotl trains.
        filler = msg.content if empty and msg.role != "assistant" else _sentinel(i)
        dummies = ({"role": turn["role"], "content": filler},
                   {**{k: v for k, v in turn.items() if k not in ("tool_calls", thinking_key)}, "content": filler},
                   None)
        for dummy in dummies:
            try:
                other = variant(i, dummy)
                break
            except TemplateError:
                if dummy is None:
                    raise
        start, end = _diff_span(real, other)
        if dummy is None:
            # A pure insertion can slide: "[TOOL_CALLS]...</s>" before "[TOOL_RESULTS]" diffs as
            # "CALLS]...</s>[TOOL_". The turn starts where it starts earliest.
            while start > 0 and real[start - 1] == real[end - 1]:
                start, end = start - 1, end - 1
        if end <= start:
            if msg.content.strip():
                raise TemplateError(f"{where}.content", _not_rendered(msg))
            continue  # nothing rendered for this message (empty content, no tool calls)
        span = _TurnSpan(i, (start, end))
        region = real[start:end]
        # Verbatim, or JSON-encoded (Llama 3.1 writes tool results with ``tojson``).
        if msg.content.strip() and msg.content.strip() not in region and json.dumps(msg.content, ensure_ascii=False)[1:-1] not in region:
            raise TemplateError(f"{where}.content", "the chat template rewrites this message's content; "
                                "cannot tell content from template")
        if msg.train_detail is not None and msg.content:
            cs, ce = _diff_span(real, variant(i, {**turn, "content": _sentinel(i)}))
            if not (start <= cs and ce <= end and real[cs:ce] in (msg.content, msg.content.strip(),
                                                                   msg.content.lstrip(), msg.content.rstrip())):
                raise TemplateError(f"{where}.content", "the chat template rewrites this message's content, so "
                                    "its training_detail offsets cannot be placed")
            span.content = (cs, ce)
        thinking = thinking_key if turn.get(thinking_key) else None
        if msg.role == "assistant" and thinking:
            rs, re_ = _diff_span(real, variant(i, {**turn, thinking: _sentinel(i)}))
            if re_ > rs:
                if not (start <= rs and re_ <= end):
                    raise TemplateError(f"{where}.{thinking}", "the chat template renders the reasoning outside "
                                        "its turn; cannot segment it")
                span.reasoning = (rs, re_)
        spans.append(span)
    return spans


def _tool_schema_spans(tools, real: str, taken: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """Where the row's tool schemas appear in the render: as the JSON the template's ``tojson`` writes,
    or, for templates that write a schema key by key, its values as JSON or, failing that, its names
    and descriptions as written (gemma4's ``description:<|"|>…<|"|>``, Mistral's descriptions with
    unescaped quotes). Text around them is template.

    Returns:
        ``(spans, unlocated)``: the spans, and how many characters of the schemas' names and
        descriptions were found nowhere (a template that rewrites them): those carry no loss.
    """

    def free(a, b):
        return all(b <= s or a >= e for s, e in taken + found)

    def locate(value) -> bool:
        for indent in (None, 4, 2):
            text = json.dumps(value, ensure_ascii=False, indent=indent)
            j = real.find(text)
            while j >= 0 and not free(j, j + len(text)):
                j = real.find(text, j + 1)
            if j >= 0:
                found.append((j, j + len(text)))
                return True
        return False

    def word_at(j: int, text: str) -> bool:  # not inside a longer identifier ("add" in "additional")
        before, after = real[j - 1:j], real[j + len(text):j + len(text) + 1]
        return not (before.isalnum() or before == "_" or after.isalnum() or after == "_")

    def locate_as_written(text: str) -> bool:
        j = real.find(text)
        while j >= 0 and not (free(j, j + len(text)) and word_at(j, text)):
            j = real.find(text, j + 1)
        if j >= 0:
            found.append((j, j + len(text)))
        return j >= 0

    found: list[tuple[int, int]] = []
    written: list[str] = []  # names and descriptions of schemas not written as JSON
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if locate(tool) or (isinstance(function, dict) and locate(function)):
            continue
        for key, value in (function or tool).items() if isinstance(function or tool, dict) else ():
            if not locate(value):
                written += _names_and_descriptions(key, value)
    # Longest first, so that a name inside a description does not take the description's place.
    unlocated = sum(len(text) for text in sorted(written, key=len, reverse=True)
                    if text.strip() and not locate_as_written(text))
    return found, unlocated


def _names_and_descriptions(key, value) -> list[str]:
    """The free text of a schema part: a tool's name, and every ``description`` in it."""
    if isinstance(value, str):
        return [value] if key in ("name", "description") else []
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _names_and_descriptions(k, v)]
    if isinstance(value, list):
        return [t for v in value for t in _names_and_descriptions(key, v)]
    return []


def _detail_pieces(text: str, offset: int, detail, segment: Segment) -> list[Piece]:
    """Split a content's text by training_detail ranges (char offsets into the content, end inclusive)."""
    trained = [False] * len(text)
    for begin, end_incl, train in detail:
        for c in range(max(begin - offset, 0), min(end_incl + 1 - offset, len(text))):
            trained[c] = train
    pieces: list[Piece] = []
    start = 0
    for c in range(1, len(text) + 1):
        if c == len(text) or trained[c] != trained[start]:
            seg = segment if trained[start] else Segment.TEMPLATE
            pieces.append(Piece(text[start:c], seg, glue=trained[start], widen_into=not trained[start]))
            start = c
    return pieces


def _pieces_from_spans(messages, spans, real, tools, train_on_eos, messages_field, stats=None) -> list[Piece]:
    spans = sorted(spans, key=lambda sp: sp.region)
    for a, b in zip(spans, spans[1:]):
        if b.region[0] < a.region[1]:
            raise TemplateError(f"{messages_field}[{b.index}]", "the chat template interleaves this message with "
                                f"message {a.index}; cannot tell their tokens apart")
    schemas, unlocated = _tool_schema_spans(tools, real, [sp.region for sp in spans]) if tools else ([], 0)
    if stats is not None and unlocated:
        stats["unweighted_schema_chars"] = unlocated
    # ``last`` trains the end token of the last *trained* assistant turn, as Axolotl does.
    last_assistant = max((sp.index for sp in spans
                          if messages[sp.index].role == "assistant" and messages[sp.index].trained is not False),
                         default=-1)

    # Every labelled stretch of the render in order: (start, end, pieces of that stretch).
    stretches = [(s, e, [Piece(real[s:e], Segment.SYSTEM)]) for s, e in schemas]
    for sp in spans:
        msg = messages[sp.index]
        segment = ROLE_SEGMENT[msg.role]
        trained = msg.trained is not False
        s, e = sp.region
        if not trained:
            parts = [Piece(real[s:e], Segment.TEMPLATE, glue=False)]
        elif msg.train_detail is not None:
            # Only the detailed ranges of the content carry loss (Axolotl's rule), nothing else of the turn.
            cs, ce = sp.content or (s, s)
            offset = msg.content.find(real[cs:ce]) if ce > cs else 0
            parts = ([Piece(real[s:cs], Segment.TEMPLATE, glue=False)] if cs > s else []) \
                + (_detail_pieces(real[cs:ce], offset, msg.train_detail, segment) if ce > cs else []) \
                + ([Piece(real[ce:e], Segment.TEMPLATE, glue=False)] if e > ce else [])
        elif sp.reasoning is not None:
            rs, re_ = sp.reasoning
            parts = [p for p in (Piece(real[s:rs], segment), Piece(real[rs:re_], Segment.REASONING),
                                 Piece(real[re_:e], segment)) if p.text]
        else:
            parts = [Piece(real[s:e], segment)]
        eot = (train_on_eos == "all"
               or (msg.role == "assistant" and trained
                   and (train_on_eos == "turn" or (train_on_eos == "last" and sp.index == last_assistant))))
        if eot:
            parts[-1] = dataclasses.replace(parts[-1], end_of_turn=Segment.OUTPUT)
        stretches.append((s, e, parts))
    stretches.sort(key=lambda st: st[0])

    pieces: list[Piece] = []
    pos = 0
    for s, e, parts in stretches:
        if s > pos:
            pieces.append(Piece(real[pos:s], Segment.TEMPLATE))
        pieces += parts
        pos = e
    if pos < len(real):
        pieces.append(Piece(real[pos:], Segment.TEMPLATE))
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


def added_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's added tokens (special or not): matched whole, never split by BPE."""
    return frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))


def end_of_turn_ids(tokenizer: Any, extra_tokens: Sequence[str] = ()) -> frozenset[int]:
    """Ids that close an assistant turn: EOS and ``extra_tokens`` (Axolotl's ``eot_tokens``), as
    Axolotl's chat_template type trains them; nothing is guessed from the template."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in extra_tokens:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return frozenset(ids)


def unconfigured_end_markers(chat_template: str, tokenizer: Any, extra_tokens: Sequence[str] = ()) -> list[str]:
    """Known end-of-turn markers (``<|im_end|>``, ``<|eot_id|>``, ...) that the template writes and the
    vocabulary has as one token, but that are neither EOS nor in ``extra_tokens``: they carry no loss."""
    vocab = tokenizer.get_vocab()
    return [tok for tok in KNOWN_END_OF_TURN_TOKENS
            if tok in chat_template and tok in vocab and tok != tokenizer.eos_token and tok not in extra_tokens]


def assign_segments(
    text: str,
    pieces: Sequence[Piece],
    offsets: Sequence[tuple[int, int]],
    input_ids: Sequence[int],
    end_ids: frozenset[int],
    atomic_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], int]:
    """Segment id per token, from character offsets.

    Args:
        text: the concatenated piece texts (what was tokenised).
        pieces: the pieces, in order.
        offsets: ``(start, end)`` character offsets per token (a fast tokenizer's offset mapping).
        input_ids: token ids (to recognise end-of-turn tokens).
        end_ids: ids that close an assistant turn.
        atomic_ids: the tokenizer's added tokens (``<|START_THINKING|>``): one such token across a
            template/content boundary joins the content it touches (see below).

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
        # Merged across a boundary. Whitespace glue (" 4", "▁Yes", "?\n") joins the content it
        # touches; so does a token covering only output-side content (".\n" ending a reasoning trace
        # before "</think>": the model generates all of it; it takes the segment it starts in), and
        # text a train_detail span leaves untrained where Axolotl widens the span over the token
        # (``_widens``). Any other template text keeps the token loss-free.
        glue_ok = (len(content) == 1 or all(segs[j] in OUTPUT_SEGMENTS for j in content)) and all(
            pieces[j].widen_into or (pieces[j].glue and not text[max(s, starts[j]):min(e, ends[j])].strip())
            for j in covered if segs[j] == Segment.TEMPLATE
        ) and (not any(pieces[j].widen_into for j in covered)
               or any(_widens(s, e, starts[j], ends[j]) for j in content))
        # An added token is never split, so a boundary inside it is an artefact of the diff that located
        # the turn (Command-A's "<|START_" is common to <|START_THINKING|> and the dummy's
        # <|START_RESPONSE|>): the token differs as a whole and belongs to the turn, as in Axolotl.
        glue_ok = glue_ok or (len(content) == 1 and input_ids[t] in atomic_ids
                              and all(pieces[j].glue for j in covered if j != content[0]))
        if glue_ok:
            segment_ids[t] = segs[content[0]]
            piece_of_token[t] = content[0]
        else:
            straddled += 1

    # End-of-turn after each piece that closes a turn (``Piece.end_of_turn``): Axolotl's rule, the
    # first end token among the 4 tokens from the first one that starts after the turn (templates
    # put "</tool_response>" or "\n" between a tool result and its <|im_end|>).
    for k, p in enumerate(pieces):
        if p.end_of_turn is None:
            continue
        t0 = _first_token_at(offsets, ends[k])
        for t in range(t0, min(t0 + END_OF_TURN_WINDOW + 1, len(offsets))):
            if input_ids[t] in end_ids:
                if segment_ids[t] == Segment.TEMPLATE:
                    segment_ids[t] = p.end_of_turn
                break
    return [int(x) for x in segment_ids], straddled


def _widens(s: int, e: int, begin: int, end: int) -> bool:
    """Whether Axolotl's ``adjust_train_details`` widens the trained span ``[begin, end)`` over the token
    ``[s, e)`` that it partly covers: a span widens to the token it starts in unless it starts on that
    token's last character, and to the token it ends in unless it ends on that token's first one."""
    last = end - 1
    return (s >= begin or e > begin + 1) and (e - 1 <= last or s < last)


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
    return _encoded(text, pieces, enc["input_ids"], enc["offset_mapping"], tokenizer, end_ids, add_bos, add_eos,
                    atomic_ids=added_token_ids(tokenizer))


TOKENIZER_CALL_CHARS = 4 * 2**20  # characters of text per batched tokenizer call (a longer row goes alone)


def encode_many(
    batch: Sequence[Sequence[Piece]],
    tokenizer: Any,
    end_ids: frozenset[int],
    *,
    add_bos: Sequence[bool] | bool = False,
    add_eos: Sequence[bool] | bool = False,
    eos_segment: Segment = Segment.OUTPUT,
    atomic_ids: frozenset[int] = frozenset(),
) -> list[EncodedExample]:
    """``encode_pieces`` for many examples with one batched tokenizer call (faster); an added EOS
    gets ``eos_segment``; ``atomic_ids``: ``added_token_ids(tokenizer)``."""
    texts = ["".join(p.text for p in pieces) for pieces in batch]
    if not texts:
        return []
    n = len(texts)
    bos = [add_bos] * n if isinstance(add_bos, bool) else list(add_bos)
    eos = [add_eos] * n if isinstance(add_eos, bool) else list(add_eos)
    out: list[EncodedExample] = []
    # One tokenizer call per TOKENIZER_CALL_CHARS of text: its offsets as Python tuples take ~250 bytes
    # per byte of text, so a batch of long rows in one call would hold them all at once.
    start = 0
    while start < n:
        end, chars = start + 1, len(texts[start])
        while end < n and chars + len(texts[end]) <= TOKENIZER_CALL_CHARS:
            chars += len(texts[end])
            end += 1
        enc = tokenizer(texts[start:end], add_special_tokens=False, return_offsets_mapping=True)
        out += [_encoded(texts[i], batch[i], enc["input_ids"][i - start], enc["offset_mapping"][i - start], tokenizer,
                         end_ids, bos[i], eos[i], eos_segment, atomic_ids) for i in range(start, end)]
        del enc
        start = end
    return out


def _encoded(text, pieces, input_ids, offsets, tokenizer, end_ids, add_bos, add_eos,
             eos_segment=Segment.OUTPUT, atomic_ids=frozenset()) -> EncodedExample:
    segment_ids, straddled = assign_segments(text, pieces, offsets, input_ids, end_ids, atomic_ids)
    input_ids = list(input_ids)
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.insert(0, int(tokenizer.bos_token_id))
        segment_ids.insert(0, int(Segment.TEMPLATE))
    if add_eos and tokenizer.eos_token_id is not None:
        input_ids.append(int(tokenizer.eos_token_id))
        segment_ids.append(int(eos_segment))
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
        add_bos_to_plain: prepend BOS to Alpaca and prompt/completion rows; None (default): exactly
            when the tokenizer itself adds one (``tokenizer(text)`` with special tokens).
        train_on_eos: which end-of-turn tokens join the output (``turn``, ``last``, ``all``, ``none``;
            Axolotl's option of that name); for Alpaca and prompt/completion rows the appended EOS
            joins the output unless ``none``.
        drop_system_message: drop a leading system turn (Axolotl's option of that name).
    """

    tokenizer: Any
    render: RenderFn | None
    fields: RowFields = field(default_factory=RowFields)
    end_tokens: Sequence[str] = ()
    add_bos_to_plain: bool | None = None
    train_on_eos: str = "turn"
    drop_system_message: bool = False

    def __post_init__(self):
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "instruction_modelling needs a fast (Rust) tokenizer for character offsets; "
                f"{type(self.tokenizer).__name__} is a slow one (load it with use_fast=True)"
            )
        self.end_ids = end_of_turn_ids(self.tokenizer, self.end_tokens)
        self.atomic_ids = added_token_ids(self.tokenizer)
        if self.train_on_eos not in TRAIN_ON_EOS:
            raise ValueError(f"train_on_eos must be one of {', '.join(TRAIN_ON_EOS)}, got {self.train_on_eos!r}")
        if self.add_bos_to_plain is None:
            self.add_bos_to_plain = tokenizer_adds_bos(self.tokenizer)

    def pieces(self, row: Mapping[str, Any], stats: dict | None = None) -> tuple[list[Piece], bool]:
        """``(pieces, plain)``: plain formats get BOS/EOS ids added around them; ``stats`` as in
        ``chat_pieces``."""
        fmt = detect_format(row, self.fields)
        if fmt == "messages":
            if self.render is None:
                raise RowError(self.fields.messages, "chat rows need a chat template (set `chat_template:`)")
            f = self.fields
            messages = normalize_messages(row, f, drop_system=self.drop_system_message)
            return chat_pieces(messages, self.render, f.messages, tools=row_tools(row, f),
                               train_on_eos=self.train_on_eos, thinking_key=f.template_thinking_key,
                               tools_field=f.tools, stats=stats), False
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
        good, batch, plain, stats = [], [], [], []
        for i, row in enumerate(rows):
            row_stats: dict = {}
            try:
                pieces, is_plain = self.pieces(row, row_stats)
            except RowError as exc:
                results[i] = exc
                continue
            except RecursionError:
                results[i] = RowError("<row>", "is nested too deeply to read (a value inside a value ... "
                                               f"over {sys.getrecursionlimit()} levels)")
                continue
            good.append(i)
            batch.append(pieces)
            plain.append(is_plain)
            stats.append(row_stats)
        try:
            encoded = encode_many(batch, self.tokenizer, self.end_ids,
                                  add_bos=[p and self.add_bos_to_plain for p in plain], add_eos=plain,
                                  eos_segment=Segment.TEMPLATE if self.train_on_eos == "none" else Segment.OUTPUT,
                                  atomic_ids=self.atomic_ids)
        except (TypeError, UnicodeEncodeError):
            # The tokenizer takes only valid Unicode: a lone surrogate ("\ud800" in JSON) fails the
            # whole batch. Name the rows that hold one and encode the rest (no cost when none does).
            bad = {i: field for i in good if (field := surrogate_field(rows[i])) is not None}
            if not bad:
                raise
            for i, field in bad.items():
                results[i] = RowError(field, "holds a lone surrogate code point (e.g. \"\\ud800\"), which is not "
                                             "text the tokenizer can read")
            keep = [k for k, i in enumerate(good) if i not in bad]
            rest = self.encode_rows([rows[good[k]] for k in keep]) if keep else []
            for k, ex in zip(keep, rest):
                results[good[k]] = ex
            return results
        for i, ex, row_stats in zip(good, encoded, stats):
            ex.meta.update(row_stats)
            results[i] = ex
        return results


def surrogate_field(value, where: str = "") -> str | None:
    """The dotted path of the first string in ``value`` holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "<row>"
        return None
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        path = f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else str(key))
        if isinstance(key, str) and surrogate_field(key) is not None:
            return path
        if (found := surrogate_field(item, path)) is not None:
            return found
    return None


@dataclass
class ChatRenderer:
    """The ``render`` of a ``RowEncoder``: a conversation rendered with a chat template (picklable)."""

    tokenizer: Any
    chat_template: str
    template_kwargs: dict = field(default_factory=dict)
    name: str = ""  # how errors name the template (the config's `chat_template`, e.g. ``falcon_h1``)

    def __call__(self, messages, tools=None):
        # Same inputs as Axolotl's chat_template type: its template kwargs, then ``tools`` when given.
        kwargs = {**self.template_kwargs, **({"tools": tools} if tools else {})}
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=False,
            chat_template=self.chat_template,
            **kwargs,
        )


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of text on its own (Llama: yes, Qwen: no)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def describe_row(path: str | None, index: int) -> str:
    """``lima.jsonl row 12 (line 13)``: how errors name a row of a data file."""
    import os

    where = f"{os.path.basename(str(path)) if path else '<dataset>'} row {index}"
    if path and str(path).endswith(".jsonl"):
        where += f" (line {index + 1})"
    return where
