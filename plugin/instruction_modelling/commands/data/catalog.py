"""Every dataset the paper trained or analysed on: where its raw file comes from and Table 5.

Each ``DatasetSpec`` says how to build the messages JSONL the recipes read
(``data/prepared/<name>.jsonl`` by default) from a local raw file, or, online, from a hub id
or URL. Table 5 numbers use the paper's convention (one word more per message than
``len(text.split())``, see ``instruction_modelling.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_RAW_DIR = "data/raw"
DEFAULT_PREPARED_DIR = "data/prepared"


@dataclass(frozen=True)
class Table5:
    """A row of the paper's Table 5: example count, mean words, instruction/output ratio."""

    n: int
    instruction_words: float
    output_words: float
    ratio: float


@dataclass(frozen=True)
class DatasetSpec:
    """How one prepared dataset is built.

    Attributes:
        name: file stem of the prepared data and of the recipes.
        title: the paper's name for it.
        kind: converter: ``lima`` (GAIR/lima conversations), ``triples`` (instruction/input/output
            wrapped in the paper's random templates), ``messages`` (already chat rows: LESS,
            Tulu V2), ``tulu_percent`` / ``tulu_ratio`` (subsets of Tulu V2).
        raw: default raw file, relative to the raw directory.
        member: file name inside a ``.zip`` raw file (LESS).
        online: ``hub:<dataset id>``, ``hub-file:<dataset id>/<file>`` or an ``https://`` URL.
        table5: the paper's Table 5 row, when it has one.
        params: converter parameters (dataset/id naming, template stream offset, subset sizes).
    """

    name: str
    title: str
    kind: str
    raw: str = ""
    member: str | None = None
    online: str | None = None
    table5: Table5 | None = None
    params: dict = field(default_factory=dict)
    note: str = ""


ALPAGASUS_URL = "https://raw.githubusercontent.com/gpt4life/alpagasus/main/data/filtered/{}"
LESS_ONLINE = "hub-file:princeton-nlp/less_data/less-data.zip"
LESS_MEMBER = "{}_adam_sim_trainp0.05_seed3_p0.05.jsonl"
TULU_ONLINE = "hub:allenai/tulu-v2-sft-mixture"

# Figure 2 (right): Tulu V2 subsets with instruction/output ratio ~10, by size (digitised).
TULU_SIZE_SUBSETS = (1000, 2000, 3000, 4000, 5000, 7500, 10000, 12500, 15000, 17500, 20000, 22500, 25000,
                     27500, 35000)
# Figure 2 (left): 3,000-example Tulu V2 subsets selected by per-example ratio.
TULU_RATIO_SUBSETS = (5, 10, 15)

_SPECS = [
    DatasetSpec("lima", "LIMA", "lima", raw="lima/train.jsonl", online="hub-file:GAIR/lima/train.jsonl",
                table5=Table5(1030, 41.72, 442.75, 0.0942),
                note="GAIR/lima is gated: accept its terms on the hub and log in (or download train.jsonl)"),
    DatasetSpec("less_tydiqa", "Less Tydiqa", "messages", raw="less/less-data.zip",
                member=LESS_MEMBER.format("tydiqa"), online=LESS_ONLINE,
                table5=Table5(13533, 147.31, 25.13, 5.862)),
    DatasetSpec("less_mmlu_chat", "Less MMLU Chat", "messages", raw="less/less-data.zip",
                member=LESS_MEMBER.format("mmlu-chat"), online=LESS_ONLINE,
                table5=Table5(13533, 216.95, 8.24, 26.33)),
    DatasetSpec("less_bbh_icl", "Less BBH ICL", "messages", raw="less/less-data.zip",
                member=LESS_MEMBER.format("bbh-icl"), online=LESS_ONLINE,
                table5=Table5(13533, 200.60, 61.44, 3.265)),
    DatasetSpec("alpagasus_dolly_3k", "Alpagasus Dolly 3k", "triples", raw="alpagasus/dolly_3k.json",
                online=ALPAGASUS_URL.format("dolly_3k.json"), table5=Table5(2996, 43.83, 68.08, 0.6439),
                params={"dataset": "alpagasus_3k_dolly", "id": "alpagasus_3k_{}"}),
    DatasetSpec("alpagasus_dolly_9k", "Alpagasus Dolly 9k", "triples", raw="alpagasus/chatgpt_9k.json",
                online=ALPAGASUS_URL.format("chatgpt_9k.json"), table5=Table5(9229, 16.79, 56.62, 0.2965),
                params={"dataset": "alpagasus_9k_dolly", "id": "alpagasus_9k_{}"}),
    DatasetSpec("alpagasus_alpaca_5k", "Alpagasus Alpaca 5k", "triples", raw="alpagasus/claude_t45.json",
                online=ALPAGASUS_URL.format("claude_t45.json"), table5=Table5(5305, 17.48, 30.81, 0.5672),
                params={"dataset": "alpagasus_claude_t45_alpaca", "id": "alpagasus_{}"},
                note="4 triples of the release have an empty output; --on-bad-rows skip drops and counts them"),
    DatasetSpec("code_alpaca", "Code Alpaca", "triples", raw="code_alpaca/code_alpaca_20k.json",
                online="https://raw.githubusercontent.com/sahil280114/codealpaca/master/data/code_alpaca_20k.json",
                table5=Table5(20022, 22.34, 27.40, 0.8156),
                params={"dataset": "code_alpaca", "id": "code_alpaca_{}"},
                note="template stream starts at offset 0 (the paper's open-instruct script shares one stream "
                     "across all datasets it converts, so its exact offset is unknown)"),
    DatasetSpec("tulu_v2", "Tulu V2", "messages", raw="tulu_v2/tulu_v2_data.jsonl", online=TULU_ONLINE,
                table5=Table5(326181, 197.60, 343.56, 0.5751),
                note="the hub mixture has slightly fewer rows than the paper's own build (326,181)"),
]
for pct, t5 in ((10, Table5(32618, 178.49, 338.96, 0.5266)), (20, Table5(65236, 167.68, 336.89, 0.4977)),
                (50, Table5(163090, 174.97, 340.67, 0.5136))):
    _SPECS.append(DatasetSpec(f"tulu_v2_{pct}pct", f"Tulu V2 {pct}%", "tulu_percent", table5=t5,
                              params={"parent": "tulu_v2", "fraction": pct / 100}))
for alpha in TULU_RATIO_SUBSETS:
    _SPECS.append(DatasetSpec(f"tulu_v2_ratio{alpha}", f"Tulu V2 ratio≈{alpha} (3k)", "tulu_ratio",
                              params={"parent": "tulu_v2", "alpha": float(alpha), "count": 3000}))
for size in TULU_SIZE_SUBSETS:
    _SPECS.append(DatasetSpec(f"tulu_v2_ratio10_n{size}", f"Tulu V2 ratio≈10, {size:,} examples", "tulu_ratio",
                              params={"parent": "tulu_v2", "alpha": 10.0, "count": size}))

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}

# The seven datasets of Table 1 (the recipes), in the paper's order.
MAIN_DATASETS = ("lima", "alpagasus_dolly_3k", "alpagasus_dolly_9k", "alpagasus_alpaca_5k",
                 "less_tydiqa", "less_mmlu_chat", "less_bbh_icl")


def get(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}") from None
