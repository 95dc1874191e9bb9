"""`python -m instruction_modelling.diagnose`: length statistics, the Table 5 ratios, the recommendation, bad files.

Expected word counts in these tests are counted by hand from the fixture files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instruction_modelling.commands.diagnose import (
    diagnose,
    main,
    predicted_gain_from_ratio,
    predicted_gain_from_size,
    recommend,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = REPO.parent / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the paper's data files live in ../shared/data beside the repo")
    return path


# -- The paper's Table 5 ---------------------------------------------------------------------


@pytest.mark.parametrize("name, paper_ratio, paper_instr, paper_out, paper_out_sd, rows", [
    ("lima.jsonl", 0.0942, 41.72, 442.75, 491.34, 1030),
    ("alpagasus_dolly_3k.jsonl", 0.6439, 43.83, 68.08, 106.38, 2996),
])
def test_table5_ratio_within_3_percent(name, paper_ratio, paper_instr, paper_out, paper_out_sd, rows):
    rep = diagnose(_shared(name))
    assert rep["examples"] == rows
    assert abs(rep["ratio"] / paper_ratio - 1) < 0.03
    # The paper counted one extra word per message (its role tag, it seems): that convention
    # reproduces Table 5's means and standard deviation to its rounding.
    t5 = rep["table5_convention"]
    assert t5["ratio"] == pytest.approx(paper_ratio, abs=5e-5)
    assert t5["instruction_mean"] == pytest.approx(paper_instr, abs=0.005)
    assert t5["output_mean"] == pytest.approx(paper_out, abs=0.005)
    assert t5["output_std"] == pytest.approx(paper_out_sd, abs=0.005)
    # All assistant turns of multi-turn rows count as output: plain words are exactly one per message lower.
    assert rep["words"]["output"]["mean"] < t5["output_mean"] - 0.99


# -- Every input format ------------------------------------------------------------------------


def test_messages_jsonl_all_turns():
    rep = diagnose(FIXTURES / "diag_messages.jsonl")
    assert rep["examples"] == 3 and rep["formats"] == {"messages": 3} and rep["multi_turn"] == 1
    # instruction words 4, 2+5+4, 4 (system and both user turns); output words 4, 1+7, 1
    assert rep["words"]["instruction"]["mean"] == pytest.approx(19 / 3)
    assert rep["words"]["output"]["mean"] == pytest.approx(13 / 3)
    assert rep["words"]["output"]["max"] == 8 and rep["words"]["output"]["min"] == 1
    assert rep["ratio"] == pytest.approx(19 / 13)
    assert list(rep)[-1] == "ratio"


def test_alpaca_json_instruction_plus_input():
    rep = diagnose(FIXTURES / "diag_alpaca.json")
    assert rep["formats"] == {"alpaca": 2}
    # instruction 6 + input 9, and 5 + empty input; outputs 2 and 6
    assert rep["words"]["instruction"]["mean"] == pytest.approx(10)
    assert rep["words"]["output"]["mean"] == pytest.approx(4)
    assert rep["ratio"] == pytest.approx(2.5)


def test_prompt_completion_jsonl():
    rep = diagnose(FIXTURES / "diag_prompt_completion.jsonl")
    assert rep["formats"] == {"prompt_completion": 2}
    assert rep["ratio"] == pytest.approx((11 + 6) / (1 + 3))
    assert rep["per_example_ratio"]["max"] == pytest.approx(11.0)


def test_axolotl_yaml_lists_every_dataset_and_pools_the_training_ones():
    rep = diagnose(FIXTURES / "diag_axolotl.yml")
    roles = [(d["role"], Path(d["path"]).name) for d in rep["datasets"]]
    assert roles == [("train", "diag_messages.jsonl"), ("train", "diag_prompt_completion.jsonl"),
                     ("eval", "diag_alpaca.json")]
    assert rep["examples"] == 5  # the two training datasets, concatenated as Axolotl does
    assert rep["ratio"] == pytest.approx((19 + 17) / (13 + 4))
    assert rep["datasets"][2]["ratio"] == pytest.approx(2.5)
    assert list(rep)[-1] == "ratio"


def test_json_flag_prints_one_json_line_with_ratio(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "instruction_modelling.diagnose", str(FIXTURES / "diag_alpaca.json"),
                           "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert json.loads(last)["ratio"] == pytest.approx(2.5)
    help_proc = subprocess.run([sys.executable, "-m", "instruction_modelling.diagnose", "--help"],
                               capture_output=True, text=True, env=env, timeout=120)
    assert help_proc.returncode == 0 and "--tokenizer" in help_proc.stdout


def test_text_report_and_plot(tmp_path, capsys):
    png = tmp_path / "lengths.png"
    assert main([str(FIXTURES / "diag_axolotl.yml"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Recommendation (heuristic)" in out and "Caveats" in out and "instruction/output ratio" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


# -- Token counts with a tokenizer ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from instruction_modelling.quickstart.tiny import build_tokenizer

    texts = [line for f in FIXTURES.glob("diag_*") for line in f.read_text(encoding="utf-8").splitlines()]
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(texts * 5, out, vocab_size=400)
    return out


def test_token_counts_match_the_tokenizer(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Prompts end with a newline, so no joining space is added and prompt and completion
    # tokenise on their own exactly as in the joined text.
    rows = [{"prompt": "Question: what colour is the sky?\n", "completion": "Blue, on a clear day."},
            {"prompt": "Complete the sequence 1, 2, 3,\n", "completion": "4, 5, 6"}]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = diagnose(path, tokenizer=str(tokenizer_dir))
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert rep["tokens"]["instruction"]["mean"] == pytest.approx(sum(n(r["prompt"]) for r in rows) / 2)
    # completion tokens + the EOS that closes the output; a BOS (only if the tokenizer adds one itself,
    # as in training) is a template token
    from instruction_modelling.core.segments import tokenizer_adds_bos

    assert rep["tokens"]["output"]["mean"] == pytest.approx(sum(n(r["completion"]) + 1 for r in rows) / 2)
    assert rep["tokens"]["template_mean"] == pytest.approx(1.0 if tokenizer_adds_bos(tok) else 0.0)
    share = rep["tokens"]["output"]["mean"] / (rep["tokens"]["output"]["mean"] + rep["tokens"]["instruction"]["mean"])
    assert rep["tokens"]["im_output_share_token"] == pytest.approx(share)
    chat = diagnose(FIXTURES / "diag_messages.jsonl", tokenizer=str(tokenizer_dir))
    assert chat["tokens"]["template_mean"] > 0 and 0 < chat["tokens"]["im_output_share_sequence"] < 1
    assert chat["ratio"] == pytest.approx(19 / 13)  # words are unchanged by the tokenizer


# -- Bad files ------------------------------------------------------------------------------


GOOD = {"messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("name, content, expected", [
    ("empty_content.jsonl", [GOOD, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}],
     "empty_content.jsonl row 1 (line 2): field 'messages[1].content': is empty"),
    ("unknown_role.jsonl", [{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     "unknown_role.jsonl row 0 (line 1): field 'messages[0].role': unknown role 'narrator'"),
    ("ends_with_user.jsonl", [GOOD, GOOD, {"messages": [{"role": "user", "content": "Hi"}]}],
     "ends_with_user.jsonl row 2 (line 3): field 'messages[0].role'"),
    ("no_fields.jsonl", [GOOD, {"text": "plain"}], "no_fields.jsonl row 1 (line 2): field 'messages': missing"),
    ("alpaca_no_output.json", [{"instruction": "Do it.", "input": ""}], "alpaca_no_output.json row 0: field 'output': missing"),
    ("wrong_type.jsonl", [{"prompt": "Say hi", "completion": 3}], "field 'completion': must be a string, got int"),
    ("not_object.json", [GOOD, ["a", "list"]], "not_object.json row 1: field '<row>': must be a JSON object, got list"),
    ("empty.jsonl", [], "empty.jsonl: no rows (the file is empty or blank)"),
    ("bare_string.jsonl", [GOOD, "just a string"], "bare_string.jsonl row 1 (line 2): field '<row>': must be a JSON object, got str"),
    ("bare_number.jsonl", [GOOD, 42], "bare_number.jsonl row 1 (line 2): field '<row>': must be a JSON object, got int"),
])
def test_bad_rows_are_named(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if path.suffix == ".json":
        path.write_text(json.dumps(content))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    good = sum(r == GOOD for r in content)
    # By default a bad row is part of the diagnosis; only a file without one usable row fails.
    assert main([str(path)]) == (0 if good else 2)
    captured = capsys.readouterr()
    assert expected in (captured.out if good else captured.err)
    if good:
        assert f"examples {good} " in captured.out and "im_on_bad_rows: skip" in captured.out
    # --on-bad-rows error stops at the first bad row, naming it.
    assert main([str(path), "--on-bad-rows", "error"]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("name, text, expected", [
    ("broken.json", '[{"messages": [}', "broken.json line 1: not valid JSON"),
    ("dict.json", json.dumps({"rows": [GOOD]}), "dict.json: expected a JSON list of rows, got dict"),
    ("bad.yml", "datasets: [path: x.jsonl", "bad.yml: not valid YAML"),
    ("nodata.yml", "base_model: x\n", "nodata.yml: no `datasets:` entries"),
    ("hub.yml", "datasets:\n  - path: some-org/some-hub-dataset\n", "datasets[0].path 'some-org/some-hub-dataset' is not a local file"),
])
def test_bad_files_are_named(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert main([str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_unreadable_rows_are_named_or_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(GOOD).encode(), b'{"prompt": "caf\xe9", "completion": "x"}', b'"bare"',
             json.dumps({"prompt": "p" * 5000, "completion": "c"}).encode(), json.dumps(GOOD).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    # Unreadable rows are part of the diagnosis (issue 11): counted and named, exit 0 ...
    assert main([str(path)]) == 0
    assert "raw.jsonl row 1 (line 2): not UTF-8 text" in capsys.readouterr().out
    # ... and stop it at the first one only when asked to behave like training's default.
    assert main([str(path), "--on-bad-rows", "error"]) == 2
    assert "raw.jsonl row 1 (line 2): not UTF-8 text" in capsys.readouterr().err
    from instruction_modelling.core import read

    rep = diagnose(path, on_bad_rows="skip")
    assert rep["examples"] == 3 and rep["bad_rows"]["count"] == 2  # the long row is under the default cap (8 MiB)
    assert rep["bad_rows"]["first"] == ["raw.jsonl row 1 (line 2): not UTF-8 text (byte 16 of the line: invalid continuation byte)",
                                   "raw.jsonl row 2 (line 3): field '<row>': must be a JSON object, got str"]
    rows = read.read_local(path, max_row_bytes=4096, on_bad_rows="skip")
    assert rows.unreadable == ["raw.jsonl row 1 (line 2): not UTF-8 text (byte 16 of the line: invalid continuation byte)",
                               "raw.jsonl row 3 (line 4): longer than 4096 bytes"]
    assert rows.where(2) == "raw.jsonl row 4 (line 5)"  # rows keep their numbers in the file


def test_a_broken_json_line_is_a_bad_row_of_the_diagnosis(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["examples"] == 1 and rep["bad_rows"]["count"] == 1 and rep["ratio"] is not None
    assert rep["bad_rows"]["first"][0].startswith("broken.jsonl row 1 (line 2): not valid JSON")
    assert main([str(path), "--on-bad-rows", "error"]) == 2
    assert "broken.jsonl row 1 (line 2): not valid JSON" in capsys.readouterr().err


def test_skip_counts_bad_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, bad, GOOD, bad)))
    rep = diagnose(path)
    assert rep["examples"] == 2 and rep["bad_rows"]["count"] == 2
    assert rep["bad_rows"]["first"][0].startswith("mixed.jsonl row 1 (line 2)")
    assert rep["ratio"] == pytest.approx(2 / 1)  # good rows only: "Hi there." / "Hello."


def test_four_empty_outputs_among_5000_rows_are_diagnosed_not_refused(tmp_path):
    """The issue's case: a full diagnosis over the 4,996 good rows, the 4 bad ones reported, exit 0."""
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}, please."},
                          {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(5000)]
    empty_at = (7, 1234, 2500, 4999)
    for i in empty_at:
        rows[i]["messages"][1]["content"] = ""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "instruction_modelling.diagnose", str(path), *extra],
        capture_output=True, text=True, env=env, timeout=300)
    text = run()
    assert text.returncode == 0, text.stderr
    assert "examples 4996 " in text.stdout and "4 bad rows, left out of the statistics" in text.stdout
    for i in empty_at:
        assert f"big.jsonl row {i} (line {i + 1}): field 'messages[1].content': is empty" in text.stdout
    assert "im_on_bad_rows: skip" in text.stdout
    assert "Recommendation (heuristic)" in text.stdout and "instruction/output ratio" in text.stdout
    as_json = run("--json")
    assert as_json.returncode == 0, as_json.stderr
    rep = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert rep["examples"] == 4996 and rep["bad_rows"]["count"] == 4 and len(rep["bad_rows"]["first"]) == 4
    assert rep["words"]["instruction"]["mean"] == pytest.approx(5)  # "Add i and i+1, please." = 5 words
    assert rep["ratio"] == pytest.approx(5.0) and list(rep)[-1] == "ratio"


def test_json_on_undiagnosable_input_still_has_ratio_and_bad_rows(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    assert main([str(path), "--json"]) == 2
    captured = capsys.readouterr()
    rep = json.loads(captured.out.strip().splitlines()[-1])
    assert rep["ratio"] is None and "bad_rows" in rep and "not valid JSON" in rep["error"]
    assert "not valid JSON" in captured.err


# -- Forecast and recommendation -------------------------------------------------------------


def test_figure2_fits_use_natural_logs():
    assert predicted_gain_from_ratio(1.0) == pytest.approx(25.83)
    assert predicted_gain_from_ratio(math.e) == pytest.approx(25.83 + 18.85)
    assert predicted_gain_from_size(1) == pytest.approx(431.74)
    assert predicted_gain_from_size(math.exp(10)) == pytest.approx(431.74 - 393.7)


@pytest.mark.parametrize("ratio, size, choice, weight", [
    (0.6439, 2996, "IM", 1.0),       # Alpagasus Dolly 3k: both fits predict a gain (paper: +12.6%)
    (26.33, 13533, "IM", 1.0),       # Less MMLU Chat (paper: +121%)
    # LIMA: ratio says IT, size says IM (paper: -0.4%): vote 0.5 mapped onto WIT's region 0-0.5
    (0.0942, 1030, "weighted", 0.25),
    (0.05, 200_000, "IT", 0.0),      # long outputs and many examples: both predict a loss
])
def test_recommendation(ratio, size, choice, weight):
    rec = recommend(ratio, size)
    assert (rec["choice"], rec["instruction_weight"]) == (choice, weight)
    low, high = rec["recommended_range"]
    assert 0 <= low <= weight <= high <= 1
    assert rec["heuristic"] and any("LLaMA-2-7B" in c for c in rec["caveats"])
    if choice == "weighted":
        assert f"im_instruction_weight: {weight}" in rec["config"]
    if size > 35_000:
        assert any("extrapolated" in n for n in rec["extrapolation"])


def test_axolotl_yaml_field_mappings(tmp_path):
    """ShareGPT-style rows read through the YAML's `field_messages` / `message_property_mappings`."""
    rows = [{"conversations": [{"from": "human", "value": "Say one two three."}, {"from": "gpt", "value": "One two."}]}]
    (tmp_path / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yml").write_text(
        "datasets:\n  - path: sharegpt.jsonl\n    type: instruction_modelling\n    field_messages: conversations\n"
        "    message_property_mappings: {role: from, content: value}\n")
    rep = diagnose(tmp_path / "cfg.yml")
    assert rep["examples"] == 1 and rep["ratio"] == pytest.approx(4 / 2)


def test_generation_ratio_arithmetic_and_geometric():
    from instruction_modelling.commands.diagnose import generation_ratio

    rg = generation_ratio([10, 10, 5], [20, 5, 20])  # per-example ratios 2, 0.5, 4
    assert rg["arithmetic"] == pytest.approx(6.5 / 3)
    assert rg["geometric"] == pytest.approx((2 * 0.5 * 4) ** (1 / 3))


@pytest.mark.parametrize("rg, span", [
    ({"arithmetic": 0.5, "geometric": 0.4, "examples": 10}, [0.01, 1.0]),  # PLW short completions: 0.01-0.5 or about 1
    ({"arithmetic": 8.0, "geometric": 3.0, "examples": 10}, [0.17, 0.48]),  # PLW: no effect; WIT's averages
])
def test_weak_paper_signal_range_follows_plw_regime(rg, span):
    rec = recommend(0.0942, 1030, rg)
    assert rec["choice"] == "weighted" and rec["recommended_range"] == span
    assert any("[PLW]" in r for r in rec["reasons"]) and any("[WIT]" in r for r in rec["reasons"])


@pytest.mark.parametrize("name, weight, span", [
    ("lima.jsonl", 0.25, [0.17, 0.48]),
    ("alpagasus_dolly_3k.jsonl", 1.0, [0.5, 1.0]),
])
def test_continuous_recommendation_on_paper_data(name, weight, span, capsys):
    path = _shared(name)
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recommended_instruction_weight"] == weight and rep["recommended_range"] == span
    assert all(0 <= v <= 1 for v in [weight, *span])
    assert rep["rg"]["arithmetic"] > rep["rg"]["geometric"] > 1  # long completions on both (PLW's Rg)
    assert list(rep)[-1] == "ratio"
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    for tag in ("[Shi et al. 2024, Fig. 2]", "[PLW]", "[WIT]", "arXiv 2401.13586", "arXiv 2507.07817"):
        assert tag in text


# -- Issue 21: the recommendation with its uncertainty ---------------------------------------


def _weights(ratios, sizes):
    return [[recommend(float(r), int(n))["instruction_weight"] for n in sizes] for r in ratios]


def test_weight_is_continuous_and_monotone_over_ratio_and_size():
    """Continuity everywhere; non-decreasing in the ratio (the ratio fit's slope is positive: longer
    instructions, more gain from IM); non-increasing in N from the size fit's lower end up (its slope is
    negative inside its range, and beyond 35k it fades out, leaving the ratio fit). Below 1k no
    monotonicity in N is asserted: the size fit's evidence fades there too, towards the ratio fit alone."""
    import numpy as np

    ratios, sizes = np.geomspace(0.01, 100, 120), np.geomspace(100, 1_000_000, 120).round()
    w = np.array(_weights(ratios, sizes))
    assert (np.diff(w, axis=0) >= 0).all(), "weight decreases somewhere as the ratio grows"
    from_1k = sizes >= 1000
    assert (np.diff(w[:, from_1k], axis=1) <= 0).all(), "weight grows somewhere with N above 1k examples"
    # Continuity: on fine lines across the steepest places, neighbours differ by little, and by less on a finer grid.
    for step in (400, 4000):
        across_ratio = np.array(_weights(np.geomspace(0.2, 0.4, step), [2000]))[:, 0]
        across_size = np.array(_weights([10.0, 0.1, 0.3], np.geomspace(500, 200_000, step).round()))
        jump = max(np.abs(np.diff(across_ratio)).max(), np.abs(np.diff(across_size, axis=1)).max())
        assert jump <= (0.03 if step == 400 else 0.011), f"weight jumps by {jump} on a {step}-point line"
    # The cliff of the parent commit: ratio 10, 50k rows gave 1.0, 58k rows 0.25.
    assert recommend(10, 50_000)["instruction_weight"] == recommend(10, 58_000)["instruction_weight"] == 1.0


@pytest.mark.parametrize("ratio, size, weight", [
    (10.0, 200_000, 1.0),   # the size fit extrapolates to -49% (IT); unmeasured there: the ratio fit decides
    (0.05, 100, 0.0),       # the size fit extrapolates to +250% (IM); unmeasured there: the ratio fit decides
    (0.05, 1_030, 0.25),    # inside the range it counts fully: the two fits disagree
])
def test_size_fit_decides_only_inside_its_measured_range(ratio, size, weight):
    rec = recommend(ratio, size)
    assert rec["instruction_weight"] == weight
    inside = 1_000 <= size <= 35_000
    assert rec["size_fit_reliance"] == (1.0 if inside else 0.0)
    assert any("not used" in r for r in rec["reasons"]) == (not inside)


def test_intervals_and_minimum_size_warning_in_json_and_text(capsys):
    path = FIXTURES / "alpagasus_triples.json"  # 12 Alpaca rows: long prompts with the template, short answers
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    low, high = rep["intervals"]["ratio"]
    assert low < rep["ratio"] < high and rep["intervals"]["level"] == 0.95
    for key in ("rg", "rg_with_template"):
        for mean in ("arithmetic", "geometric"):
            lo, hi = rep[key]["interval"][mean]
            assert lo <= rep[key][mean] <= hi
    assert any("fewer than 200" in w for w in rep["warnings"])
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "95% interval (percentile bootstrap)" in text and "WARNING: only 12 examples" in text
    assert "PLW's Rg (output/prompt per example), words with template:" in text


def test_alpaca_template_moves_rg_below_1_and_the_range_takes_plw_small_weights(capsys):
    """PLW counts Rg with the template: the Alpaca preamble turns these rows' Rg (geometric mean about
    0.65 in plain words) into about 0.16, PLW's short-completion regime, and the range then reaches
    PLW's small weights although both seed-paper fits favour IM."""
    from instruction_modelling.core.segments import ALPACA_PROMPT_NO_INPUT

    rows = [{"instruction": "Name the largest planet of the solar system, please.", "input": "", "output": "Jupiter."}]
    path = FIXTURES / "alpagasus_triples.json"
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rg_with_template"]["geometric"] < 0.5 < rep["rg"]["geometric"]
    assert rep["recommendation"]["plw_regime"] == "short" and rep["recommended_instruction_weight"] == 1.0
    assert rep["recommended_range"][0] == 0.01
    # The template's words are those of the Alpaca preamble and section tags.
    from instruction_modelling.commands.diagnose import _prompt_template_words
    from instruction_modelling.core.segments import RowFields

    expected = len(ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "").replace("{input}", "").split())
    assert _prompt_template_words(rows[0], "alpaca", RowFields(), 2) == expected


def test_tokens_rg_with_template_splits_every_token(tokenizer_dir):
    rep = diagnose(FIXTURES / "diag_alpaca.json", tokenizer=str(tokenizer_dir))
    t = rep["tokens"]
    assert t["rg_with_template"]["geometric"] < t["rg"]["geometric"]
    assert rep["recommendation"]["reasons"] and any("tokens with the template (PLW's count)" in r
                                                    for r in rep["recommendation"]["reasons"])


def test_intervals_flag_the_regime_flips_of_ten_row_samples():
    """On 10 random rows of Alpagasus Dolly 3k (Rg with the template), the point estimate gets PLW's
    regime wrong in a sizeable share of draws; with the intervals a wrong regime is never asserted:
    the draw says `uncertain` instead."""
    import random

    from instruction_modelling.commands import diagnose as d

    src = d.load_sources(_shared("alpagasus_dolly_3k.jsonl"))[0]
    c = d._count(src, "skip")
    prompts = [i + t for i, t in zip(c.instruction_words, c.template_words)]
    truth = d.plw_regime(d.generation_ratio(prompts, c.output_words))
    rng, flips, asserted_wrong, draws = random.Random(0), 0, 0, 100
    for k in range(draws):
        idx = rng.sample(range(len(prompts)), 10)
        p, o = [prompts[i] for i in idx], [c.output_words[i] for i in idx]
        rg = d.generation_ratio(p, o)
        ci = d.bootstrap_intervals(p, o, {"rg": p}, resamples=300, seed=k)["rg"]
        flips += d.plw_regime(rg) != truth
        asserted_wrong += d.plw_regime(rg, ci) not in ("uncertain", truth)
    assert truth == "long" and flips >= 5 and asserted_wrong == 0


def test_each_rule_cites_a_paper_or_says_it_is_ours(capsys):
    assert main([str(FIXTURES / "alpagasus_triples.json")]) == 0
    text = capsys.readouterr().out
    assert "[our heuristic]" in text and "On the Effect of Instruction Tuning Loss on Generalization" in text
    rec = recommend(0.0942, 1030)
    for reason in rec["reasons"]:
        if "sweep" not in reason:
            assert any(f"[{tag}" in reason for tag in ("Shi et al.", "PLW", "WIT", "our heuristic")), reason


def test_large_data_intervals_use_the_delta_method_and_agree_with_the_bootstrap(monkeypatch):
    """Above BOOTSTRAP_MAX_ROWS resampling would cost seconds; the normal intervals must match it."""
    import numpy as np

    from instruction_modelling.commands import diagnose as d

    rng = np.random.default_rng(3)
    instr, out = rng.lognormal(3, 1, 5000), rng.lognormal(4, 1.2, 5000)
    boot = d.bootstrap_intervals(instr, out, {"rg": instr})
    monkeypatch.setattr(d, "BOOTSTRAP_MAX_ROWS", 1000)
    normal = d.bootstrap_intervals(instr, out, {"rg": instr})
    assert (boot["method"], normal["method"]) == ("percentile bootstrap", "normal (delta method)")
    for b, n in [(boot["ratio"], normal["ratio"]), (boot["rg"]["geometric"], normal["rg"]["geometric"])]:
        assert n == pytest.approx(b, rel=0.01)
