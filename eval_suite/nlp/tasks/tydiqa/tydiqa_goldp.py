"""TyDi QA GoldP (gold passage) for lm-eval: one task per language, SQuAD-style EM and F1.

lm-eval 0.4.11 has no TyDi QA task (0.4.13 added one). Documents are the hub's ``secondary_task``
rows (or a local copy with the same fields): ``id`` prefixed by the language name, ``context``,
``question`` and ``answers: {text: [...], answer_start: [...]}``.
"""

import re
import string
import unicodedata
from collections import Counter
from functools import partial

# task suffix -> the language name TyDi QA puts in front of each id
LANGUAGES = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
             "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
ARTICLES = {"en": re.compile(r"\b(a|an|the)\b"), "ar": re.compile(r"(?:^|\s)ال")}


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str, lang: str) -> list[str]:
    """Lower-case, drop punctuation (any script) and articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    if lang in ARTICLES:
        text = ARTICLES[lang].sub(" ", text)
    return text.split()


def f1(prediction: str, truth: str, lang: str) -> float:
    pred, gold = normalize(prediction, lang), normalize(truth, lang)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def process_docs(dataset, lang: str):
    prefix = LANGUAGES[lang] + "-"
    return dataset.filter(lambda doc: doc["id"].startswith(prefix)).map(
        lambda doc: {"answer_texts": list(doc["answers"]["text"])})


def process_results(doc, results, lang: str):
    prediction = results[0].strip()
    truths = doc["answer_texts"]
    return {"exact_match": max(float(normalize(prediction, lang) == normalize(t, lang)) for t in truths),
            "f1": max(f1(prediction, t, lang) for t in truths)}


for _lang in LANGUAGES:  # lm-eval's `!function` needs one module-level name per language
    globals()[f"process_docs_{_lang}"] = partial(process_docs, lang=_lang)
    globals()[f"process_results_{_lang}"] = partial(process_results, lang=_lang)
