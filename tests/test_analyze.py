"""`python -m instruction_modelling.analyze losses|memorisation|gains` on tiny local models.

Expected values are computed here independently of the code under test: losses with the chat
template, the tokenizer and ``torch.nn.functional.cross_entropy``; generations with a plain
argmax loop; BLEU with sacrebleu itself; gains from the paper's published numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instruction_modelling.commands.analyze import (
    bleu,
    log_fit,
    main,
    read_results_table,
    run_gains,
    run_losses,
    run_memorisation,
    sentence_bleu,
)
from instruction_modelling.quickstart.sample_data import HELDOUT_FILE, TRAIN_FILE

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two randomly initialised tiny Llamas (different seeds) with the tulu chat template."""
    from instruction_modelling.quickstart.tiny import build_tiny_llama, corpus_from_jsonl

    root = tmp_path_factory.mktemp("models")
    texts = corpus_from_jsonl(TRAIN_FILE, HELDOUT_FILE)
    return [("A", build_tiny_llama(root / "a", texts, seed=0)), ("B", build_tiny_llama(root / "b", texts, seed=1))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Chat rows (one multi-turn, some with a system prompt) and prompt/completion rows."""
    root = tmp_path_factory.mktemp("data")
    train = _rows(TRAIN_FILE, 40)
    chat = [r for r in train if len(r["messages"]) > 3][:1] + train[:5]
    assert sum(m["role"] == "assistant" for m in chat[0]["messages"]) == 2
    pc = [{"prompt": "Add 2 and 3.\n", "completion": "5"}, {"prompt": "Name a colour.\n", "completion": "Blue, like the sky."}]
    return {"train": _write(root / "train.jsonl", chat), "heldout": _write(root / "heldout.jsonl", _rows(HELDOUT_FILE, 4)),
            "pc": _write(root / "pc.jsonl", pc)}


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _direct_output_loss_chat(model, tok, messages) -> float:
    """Mean CE over every assistant turn's tokens and the EOS closing it, from chat-template renders."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    full = ids(tok.apply_chat_template(messages, tokenize=False))
    positions = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = ids(tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
        upto = ids(tok.apply_chat_template(messages[:k + 1], tokenize=False))
        assert full[:len(upto)] == upto and upto[:len(before)] == before  # renders tokenise as prefixes
        positions += range(len(before), len(upto))
    return _mean_ce(model, full, positions)


def _mean_ce(model, ids, positions) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    pos = torch.tensor(positions)
    return F.cross_entropy(logits[pos - 1], torch.tensor(ids)[pos]).item()


# -- losses ---------------------------------------------------------------------------------


def test_losses_equal_a_direct_computation(models, data, tmp_path):
    res = run_losses(models, data["train"], data["heldout"], tmp_path, batch_size=4, device="cpu")
    saved = json.loads((tmp_path / "losses.json").read_text())
    for name, path in models:
        model, tok = _load(path)
        for split in ("train", "heldout"):
            rows = _rows(data[split], 100)
            expected = [_direct_output_loss_chat(model, tok, r["messages"]) for r in rows]
            assert saved["models"][name][split]["output_loss"] == pytest.approx(expected, abs=1e-4)
            assert saved["models"][name][split]["mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert res["models"]["A"]["train"]["output_loss"] != res["models"]["B"]["train"]["output_loss"]
    png = tmp_path / "losses.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_losses_prompt_completion_rows(models, data, tmp_path):
    from instruction_modelling.core.segments import tokenizer_adds_bos

    name, path = models[0]
    res = run_losses([models[0]], data["pc"], None, tmp_path, device="cpu")
    model, tok = _load(path)
    expected = []
    for r in _rows(data["pc"], 10):
        prompt, completion = tok(r["prompt"], add_special_tokens=False)["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tokenizer_adds_bos(tok) else []  # as training: the tokenizer's own BOS
        ids = [*bos, *prompt, *completion, tok.eos_token_id]
        expected.append(_mean_ce(model, ids, range(len(bos) + len(prompt), len(ids))))
    assert res["models"][name]["train"]["output_loss"] == pytest.approx(expected, abs=1e-4)


def test_losses_cli(models, data, tmp_path, capsys):
    args = ["losses", "--train", str(data["train"]), "--heldout", str(data["heldout"]), "--out", str(tmp_path),
            "--device", "cpu", "--max-length", "24"]
    for name, path in models:
        args += ["--model", f"{name}={path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train mean" in out and out.count("\n") >= 3
    saved = json.loads((tmp_path / "losses.json").read_text())
    # 24 tokens cut some outputs away entirely: those rows are counted, not scored.
    assert saved["models"]["A"]["train"]["no_output_tokens"] > 0
    assert None in saved["models"]["A"]["train"]["output_loss"]


def test_losses_bad_row_is_named(models, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                                          {"messages": [{"role": "user", "content": "Hi"}]}])
    assert main(["losses", "--model", f"A={models[0][1]}", "--train", str(bad), "--heldout", str(bad),
                 "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "bad.jsonl: row 1: field 'messages[0].role'" in capsys.readouterr().err


# -- memorisation -----------------------------------------------------------------------------


def test_bleu_equals_sacrebleu_on_known_strings():
    import sacrebleu

    hyps = ["the cat is on the mat", "a quick brown fox jumps over the dog", "nothing in common"]
    refs = ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog", "completely different words"]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < bleu(hyps, refs) < 100
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert sentence_bleu(hyps[1], refs[1]) == pytest.approx(sacrebleu.sentence_bleu(hyps[1], [refs[1]]).score)


def test_memorisation_greedy_generations_and_bleu(models, data, tmp_path):
    res = run_memorisation(models, data["train"], tmp_path, max_new_tokens=8, batch_size=1, device="cpu")
    rows = _rows(data["train"], 100)
    model, tok = _load(models[0][1])
    gens = res["models"]["A"]["generations"]
    for g, row in zip(gens, rows):
        assert g["reference"] == row["messages"][-1]["content"]  # the last assistant turn
    for g, row in list(zip(gens, rows))[:2]:
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert g["generation"] == tok.decode(new, skip_special_tokens=True).strip()
    import sacrebleu

    for name, m in res["models"].items():
        hyps = [g["generation"] for g in m["generations"]]
        refs = [g["reference"] for g in m["generations"]]
        assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    saved = json.loads((tmp_path / "memorisation.json").read_text())
    assert saved["models"]["B"]["bleu"] == res["models"]["B"]["bleu"] and saved["examples"] == len(rows)
    png = tmp_path / "memorisation.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000


def test_memorisation_batched_matches_unbatched(models, data, tmp_path):
    one = run_memorisation(models[:1], data["train"], tmp_path / "one", max_new_tokens=6, batch_size=1, device="cpu")
    four = run_memorisation(models[:1], data["train"], tmp_path / "four", max_new_tokens=6, batch_size=4, device="cpu")
    assert [g["generation"] for g in one["models"]["A"]["generations"]] == \
           [g["generation"] for g in four["models"]["A"]["generations"]]


# -- gains ------------------------------------------------------------------------------------


def test_gains_refit_reproduces_the_paper_fits(tmp_path):
    """The digitised Figure 2 points (../shared/research/paper.md §5.2) give back the printed fits."""
    res = run_gains(FIXTURES / "figure2_points.csv", tmp_path)
    assert res["fits"]["ratio"]["slope"] == pytest.approx(18.85, abs=0.05)
    assert res["fits"]["ratio"]["intercept"] == pytest.approx(25.83, abs=0.1)
    assert res["fits"]["size"]["slope"] == pytest.approx(-39.37, abs=0.05)
    assert res["fits"]["size"]["intercept"] == pytest.approx(431.74, abs=0.5)
    assert res["fits"]["ratio"]["n"] == 19 and res["fits"]["size"]["n"] == 15
    png = tmp_path / "gains.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_gains_from_scores_match_table1():
    """Relative AlpacaEval 1.0 gains of IM over IT from the paper's Table 1 scores."""
    gains = {p["dataset"]: p["gain_pct"] for p in read_results_table(FIXTURES / "table1_alpacaeval1.csv")}
    assert gains["Less MMLU Chat"] == pytest.approx(121.3, abs=0.05)  # 4.42 -> 9.78, "more than doubles"
    assert gains["Less Tydiqa"] == pytest.approx(97.3, abs=0.05)
    assert gains["LIMA"] == pytest.approx(-0.4, abs=0.05)


def test_log_fit_exact_line():
    import math

    fit = log_fit([1, math.e, math.e ** 2], [3.0, 5.0, 7.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(3.0) and fit["r2"] == pytest.approx(1.0)
    assert log_fit([2.0, 2.0], [1.0, 3.0]) is None


@pytest.mark.parametrize("text, expected", [
    ("dataset,ratio,size,it_score,im_score\nA,0.5,,10,\n", "t.csv row 0 (line 2): column 'im_score' is empty"),
    ("dataset,ratio,size,it_score,im_score\nA,0.5,1000,10,11\nB,x,,10,11\n", "t.csv row 1 (line 3): column 'ratio' is not a number: 'x'"),
    ("dataset,ratio,size,it_score,im_score\nA,0.5,,0,11\n", "column 'it_score' must be a positive finite number"),
    ("dataset,ratio,size,gain_pct\nA,,,5\n", "row 0 (line 2): needs a 'ratio' or a 'size'"),
    ("dataset,ratio,score\nA,0.5,3\n", "unknown column(s) ['score']"),
    ("dataset,ratio,gain_pct\n,0.5,3\n", "column 'dataset' is empty"),
])
def test_gains_bad_table_names_row_and_column(tmp_path, capsys, text, expected):
    path = tmp_path / "t.csv"
    path.write_text(text)
    assert main(["gains", str(path), "--out", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err


def test_gains_cli_and_help(tmp_path, capsys):
    assert main(["gains", str(FIXTURES / "table1_alpacaeval1.csv"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gain vs ratio" in out and "paper: 18.85" in out
    assert json.loads((tmp_path / "gains.json").read_text())["fits"]["ratio"]["n"] == 7
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    for sub in ([], ["losses"], ["memorisation"], ["gains"]):
        proc = subprocess.run([sys.executable, "-m", "instruction_modelling.analyze", *sub, "--help"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr
