"""The quickstart's sample data: small synthetic instruction tasks, written by this project.

Every row is generated here from a fixed seed (no third-party text), so the files are covered by
the project's Apache-2.0 licence. The tasks have long instructions and short outputs, the regime
where the paper found IM helps most. Chat ``messages`` format, some rows with a system prompt,
some with two turns.

Regenerate the shipped files with ``python -m instruction_modelling.quickstart.sample_data``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import resources

DATA_DIR = resources.ROOT / "quickstart"  # written by `python -m instruction_modelling.quickstart.sample_data`
TRAIN_FILE = DATA_DIR / "tiny_tasks_train.jsonl"
HELDOUT_FILE = DATA_DIR / "tiny_tasks_heldout.jsonl"

WORDS = (
    "apple river stone cloud garden window silver forest candle mirror basket planet orange "
    "pencil ladder bridge rabbit meadow lantern harbor violet thunder marble kettle anchor "
    "blanket compass feather island jacket lemon needle pepper saddle tunnel walnut yellow"
).split()
SYSTEM_PROMPTS = (
    "You are a careful assistant. Answer with the result only.",
    "You are a helpful tutor who gives short, exact answers.",
    "Reply briefly and precisely.",
)


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        words = rng.sample(WORDS, rng.randint(4, 7))
        return (
            "Here is a list of words: " + ", ".join(words) + ". Read the whole list carefully and "
            "tell me which of these words comes first in alphabetical order.",
            sorted(words)[0],
        )
    if kind == 1:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return (
            f"A shop had {a} boxes of tea in the morning and received another {b} boxes at noon. "
            "Nothing was sold during the day. How many boxes of tea did the shop have in the evening?",
            str(a + b),
        )
    if kind == 2:
        word = rng.choice(WORDS)
        return (
            f"Write the word '{word}' backwards, letter by letter, without adding any spaces "
            "or punctuation to the answer.",
            word[::-1],
        )
    if kind == 3:
        word = rng.choice(WORDS)
        return (
            f"Count how many vowels (a, e, i, o, u) appear in the word '{word}'. "
            "Give the number only.",
            str(sum(ch in "aeiou" for ch in word)),
        )
    if kind == 4:
        words = rng.sample(WORDS, 5)
        longest = max(words, key=lambda w: (len(w), w))
        return (
            "Consider these five words: " + ", ".join(words) + ". Which word has the most letters? "
            "If two words are equally long, choose the one that comes last alphabetically.",
            longest,
        )
    n = rng.randint(2, 9)
    word = rng.choice(WORDS)
    return (
        f"Repeat the word '{word}' exactly {n} times, separated by single spaces, and say nothing else.",
        " ".join([word] * n),
    )


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            q, a = _task(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"id": f"tiny-{seed}-{i}", "messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    write_jsonl(make_rows(240, seed=1), TRAIN_FILE)
    write_jsonl(make_rows(60, seed=2), HELDOUT_FILE)
    print(f"wrote {TRAIN_FILE} and {HELDOUT_FILE}")


if __name__ == "__main__":
    main()
