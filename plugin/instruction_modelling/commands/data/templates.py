"""The paper's random text templates for instruction/input/output triples (AlpaGasus, Code Alpaca).

The paper turns each triple into one user message and one assistant message by filling a
randomly chosen text template (Shi et al. 2024, code: ``src/instruction_encode_templates.py``,
itself taken from open-instruct, Apache-2.0). The template words become part of the
instruction, so they get loss under IM and count in the instruction lengths of Table 5.

How the choice is made, and why it is reproducible here:

* one template list for triples with a non-blank input and one for triples without; each
  template has a weight; ``random.choices(templates, weights)`` picks one per triple;
* the paper seeds Python's global ``random`` once (seed 42) and then converts Alpaca 5k,
  Dolly 9k and Dolly 3k *in that order from the same stream*. Each triple consumes exactly one
  ``random()`` draw whichever list it uses, so the stream position of a dataset's first triple is
  the number of triples converted before it (``STREAM_OFFSET``).

Checked against the released files: with offset 0 every one of the 5,305 rows of the paper's
Alpaca 5k file, and with offset 5,305 + 9,229 every one of the 2,996 rows of its Dolly 3k file,
is the template this module picks, filled with that row's fields (``tests/test_data_prep.py``
checks Dolly 3k on ``../shared/data``). Dolly 9k's offset follows from the same script but could
not be checked: its file is missing from the paper's repository.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

# (prompt template, completion template, weight). Verbatim from the paper's code, typos included
# ("Plase"): a corrected word would change the instruction text the paper trained on.
TEMPLATES_WITH_INPUT: tuple[tuple[str, str, float], ...] = (
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    ("Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request.\n\n"
     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:", "{output}", 0.1),
)

TEMPLATES_WITHOUT_INPUT: tuple[tuple[str, str, float], ...] = (
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05),
    ("Can you help with this?\n\n{instruction}\n", "{output}", 0.05),
    ("Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05),
    ("Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05),
    ("Write a response that appropriately completes the request.\n\n"
     "### Instruction:\n{instruction}\n\n### Response:", "{output}", 0.1),
)

SEED = 42

# Triples converted before each dataset in the paper's single random stream
# (``src/reformat_alpagasus_data.py``: claude_t45.json, then chatgpt_9k.json, then dolly_3k.json).
ALPACA_5K_SIZE, DOLLY_9K_SIZE = 5305, 9229
STREAM_OFFSET = {
    "alpagasus_alpaca_5k": 0,
    "alpagasus_dolly_9k": ALPACA_5K_SIZE,
    "alpagasus_dolly_3k": ALPACA_5K_SIZE + DOLLY_9K_SIZE,
}


@dataclass(frozen=True)
class Wrapped:
    prompt: str
    completion: str
    template_index: int  # index in TEMPLATES_WITH_INPUT or TEMPLATES_WITHOUT_INPUT
    with_input: bool


def has_input(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def fill(instruction: str, input: str | None, output: str, template_index: int) -> Wrapped:
    """Fill one template; fields are stripped first, as the paper does."""
    with_input = has_input(input)
    table = TEMPLATES_WITH_INPUT if with_input else TEMPLATES_WITHOUT_INPUT
    prompt_t, completion_t, _ = table[template_index]
    values = {"instruction": instruction.strip(), "input": (input or "").strip()}
    return Wrapped(prompt_t.format(**values), completion_t.format(output=output.strip()), template_index, with_input)


class TemplateStream:
    """Picks templates exactly as the paper's seeded ``random.choices`` calls did.

    Args:
        seed: the paper's seed (42).
        offset: draws to skip first (``STREAM_OFFSET[name]`` to reproduce a paper file).

    Example:
        >>> stream = TemplateStream(offset=STREAM_OFFSET["alpagasus_dolly_3k"])
        >>> stream.wrap("How do I start running?", "", "Get comfortable shoes.").prompt
        'Plase answer the following request: How do I start running?\\nAnswer:'
    """

    def __init__(self, seed: int = SEED, offset: int = 0):
        self._rng = random.Random(seed)
        self._indices = {
            True: list(range(len(TEMPLATES_WITH_INPUT))),
            False: list(range(len(TEMPLATES_WITHOUT_INPUT))),
        }
        self._weights = {
            True: [w for *_, w in TEMPLATES_WITH_INPUT],
            False: [w for *_, w in TEMPLATES_WITHOUT_INPUT],
        }
        for _ in range(offset):
            self._rng.random()  # random.choices(k=1) consumes exactly one random() per call

    def next_index(self, with_input: bool) -> int:
        return self._rng.choices(self._indices[with_input], weights=self._weights[with_input])[0]

    def wrap(self, instruction: str, input: str | None, output: str) -> Wrapped:
        return fill(instruction, input, output, self.next_index(has_input(input)))


def wrap_all(triples: Iterable[tuple[str, str | None, str]], seed: int = SEED, offset: int = 0) -> Iterator[Wrapped]:
    stream = TemplateStream(seed, offset)
    for instruction, input, output in triples:
        yield stream.wrap(instruction, input, output)
