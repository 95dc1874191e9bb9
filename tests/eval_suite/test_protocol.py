"""--protocol default|paper: what each preset changes, checked through the real lm-eval, FastChat and generation code."""

from __future__ import annotations

import string

import pytest
from conftest import CORPUS, TULU_TEMPLATE, save_tiny_llama

from eval_suite import protocol as protocols
from eval_suite.generation import BackendOptions, Generator, SamplingConfig, token_budget_batches
from eval_suite.mtbench import bench as mt_bench
from eval_suite.nlp import bench as nlp_bench
from eval_suite.protocol import DEFAULT, PAPER


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer behaves like LLaMA-2's: SentencePiece-style "▁" word pieces (decode
    drops the leading space), a BOS added to every encoding, 512 positions of context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("sentencepiece_model")
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # Every printable ASCII character is a piece (LLaMA's byte fallback covers the rest), so stop strings
    # such as FastChat's "###" can be matched.
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=sorted(set(string.printable))))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    return save_tiny_llama(tok, out, max_position_embeddings=512, seed=1)  # no chat template: paper supplies tulu


def test_presets_are_data_and_paper_names_the_authors_choices():
    assert set(protocols.PROTOCOLS) == {"default", "paper"} and protocols.get(None) is DEFAULT
    assert (PAPER.lower_is_better, PAPER.lm_eval_add_bos_token, PAPER.mt_bench_format, PAPER.mt_bench_fastchat_template,
            PAPER.mt_bench_top_k, PAPER.alpaca_eval_chat_template, PAPER.cap_at_context_length) == \
        ("as-is", False, "fastchat", "one_shot", 50, "tulu", True)
    assert (DEFAULT.lower_is_better, DEFAULT.lm_eval_add_bos_token, DEFAULT.mt_bench_format, DEFAULT.mt_bench_top_k,
            DEFAULT.alpaca_eval_chat_template, DEFAULT.cap_at_context_length) == \
        ("flip", None, "chat-template", None, None, False)
    assert PAPER.record()["name"] == "paper"
    with pytest.raises(ValueError, match="--protocol 'exact': choose one of default, paper"):
        protocols.get("exact")


def test_lm_eval_adds_no_bos_under_the_paper_protocol(sentencepiece_model_dir):
    """The model arguments reach lm-eval 0.4.11's own HFLM: it then encodes requests without LLaMA's BOS,
    as the authors' lm-eval did, and with it under the default protocol."""
    from lm_eval.api.registry import get_model

    bos = 1
    encodings = {}
    for preset in (DEFAULT, PAPER):
        args = nlp_bench.lm_eval_model_args(sentencepiece_model_dir, {}, preset)
        lm = get_model("hf").create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})
        encodings[preset.name] = lm.tok_encode("Question: What is two plus two? Answer:")
        context, continuation = lm._encode_pair("Question: What is two plus two? Answer:", " four")
        assert (context[0] == bos) == (preset is DEFAULT) and bos not in continuation
    assert "add_bos_token=False" in nlp_bench.lm_eval_model_args("m", {}, PAPER)
    assert "add_bos_token" not in nlp_bench.lm_eval_model_args("m", {"dtype": "bfloat16"}, DEFAULT)
    assert encodings["default"][0] == bos and encodings["paper"][0] != bos
    assert encodings["default"][1:] == encodings["paper"]


def test_paper_mt_bench_template_is_one_shot_whatever_the_folder_is_called():
    for path in ("models/tulu_im", "meta-llama/Llama-2-7b-hf", "runs/lima_data_llama2_7b_bs128_lr2e-5_ml2048_ep2_bf16_im"):
        conv = mt_bench.fastchat_template(path, PAPER.mt_bench_fastchat_template)
        assert conv.name == "one_shot" and mt_bench.fastchat_stops(path, "one_shot") == ("###",)
    # Picked by path (--protocol default with --mt-bench-format fastchat), these two get other templates.
    assert mt_bench.fastchat_template("models/tulu_im").name == "tulu"
    assert mt_bench.fastchat_template("meta-llama/Llama-2-7b-hf").name == "llama-2"


def test_generation_stops_at_the_context_length_per_row(sentencepiece_model_dir, caplog):
    """Each row may generate up to context length - its own prompt length (vLLM's cap), also when rows of
    different lengths share one HF generate call; a prompt that fills the context gets an empty sample."""
    import torch

    gen = Generator(str(sentencepiece_model_dir), backend="hf", options=BackendOptions(device="cpu"))
    assert gen.context_length() == 512
    prompts = ["The answer is", "Paris is the capital of France. The quick brown fox jumps over the lazy dog. def add(a, b):"]
    lengths = [len(gen.prompt_ids(p)) for p in prompts]
    context = lengths[1] + 3  # the long prompt has room for 3 tokens, the short one for more
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0, context_length=context)
    capped = [s[0] for s in gen.complete(prompts, sampling)]
    assert all(capped)  # the random model does not stop by itself before its cap
    for prompt, length, text in zip(prompts, lengths, capped):
        ids = torch.tensor([gen.prompt_ids(prompt)])
        with torch.no_grad():
            want = gen._model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=min(12, context - length), pad_token_id=gen.tokenizer.pad_token_id)
        assert text == gen.tokenizer.decode(want[0, length:], skip_special_tokens=True)
    assert sampling.new_tokens(lengths[0]) == 12 and sampling.new_tokens(lengths[1]) == 3
    with caplog.at_level("WARNING"):
        full = gen.complete([prompts[1]], SamplingConfig(max_new_tokens=12, context_length=lengths[1]))
    assert full == [[""]] and "take the whole context of" in caplog.text
    assert SamplingConfig(max_new_tokens=12).new_tokens(10_000) == 12  # no cap: max_new_tokens alone


def test_batches_plan_with_each_rows_capped_new_tokens():
    # Two long prompts near a 100-token context: 10 new tokens each, so both fit a 220-token budget together.
    assert token_budget_batches([90, 90], [10, 10], 220) == [[0, 1]]
    assert token_budget_batches([90, 90], 200, 400) == [[0], [1]]  # uncapped they would not
    # The batch generates as many tokens as its shortest prompt may: 80 + 20 for 3 rows > 250.
    assert token_budget_batches([10, 80, 80], [90, 20, 20], 250) == [[0], [1, 2]]


def test_options_contradicting_the_paper_protocol_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    from eval_suite.__main__ import main

    base = ["all", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--protocol", "paper"]
    for extra, message in ((["--mt-bench-format", "chat-template"], "--mt-bench-format chat-template (the paper's is fastchat)"),
                           (["--top-k", "40"], "--top-k 40 (the paper's top-k is FastChat's 50 for MT-Bench and none elsewhere)"),
                           (["--chat-template", "zephyr"], "--chat-template zephyr (the paper's AlpacaEval prompt is the tulu format)")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert str(e.value).startswith("eval-suite all: --protocol paper fixes what these change: ")
        assert message in str(e.value) and str(e.value).endswith("drop them, or use --protocol default")
    assert not (tmp_path / "run").exists()


def test_tulu_template_is_the_papers_alpaca_eval_prompt(sentencepiece_model_dir):
    """The paper preset's AlpacaEval prompt: open-instruct's tulu format, one BOS (theirs: add_bos=False, vLLM's BOS)."""
    from eval_suite.generation import load_chat_template

    gen = Generator(str(sentencepiece_model_dir), chat_template=load_chat_template(PAPER.alpaca_eval_chat_template),
                    load_model=False)
    text = gen.render_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    assert text == "<|user|>\nWrite a short poem about the sea.\n<|assistant|>\n" and gen.tokenizer.chat_template == TULU_TEMPLATE
    ids = gen.prompt_ids(text)
    assert ids[0] == gen.tokenizer.bos_token_id and ids.count(gen.tokenizer.bos_token_id) == 1


def test_smoke_all_with_the_paper_protocol_on_two_tiny_models(tiny_model_dir, sentencepiece_model_dir, tmp_path, capsys):
    """`eval-suite all --protocol paper` end to end on CPU for an IT and an IM model (every benchmark, the NLP
    suite on local tasks): the paper's settings reach every stage, AlpacaEval is generated once for both
    annotators, and the report names the protocol and marks the smoke cells with why."""
    import json

    from conftest import benchmarks_dir
    from test_nlp import write_local_tasks

    from eval_suite.__main__ import main
    from eval_suite.judge.server import JudgeServer

    tasks = write_local_tasks(tmp_path)
    ae1 = benchmarks_dir() / "alpaca_eval" / "text_davinci_003_outputs.json"
    rows = json.loads(ae1.read_text())[:3]
    ae2 = tmp_path / "gpt4_turbo_outputs.json"  # the same instructions in another order, by another generator
    ae2.write_text(json.dumps([{**r, "generator": "gpt4_turbo"} for r in (rows[1], rows[0], rows[2])]))
    runs = {"it": tmp_path / "it", "im": tmp_path / "im"}
    with JudgeServer() as judge:
        for label, model in (("it", tiny_model_dir), ("im", sentencepiece_model_dir)):
            main(["all", str(model), "--run-dir", str(runs[label]), "--protocol", "paper", "--allow-code-execution",
                  "--judge-base-url", judge.url, "--alpaca-eval-1-reference", str(ae1),
                  "--alpaca-eval-2-reference", str(ae2), "--limit", "2", "--n", "1", "--max-new-tokens", "8",
                  "--tasks", "tiny_group", "--include-path", str(tasks), "--no-builtin-tasks", "--nlp-batch-size", "2",
                  "--device", "cpu", "--workers", "1", *(["--baseline-run", str(runs["it"])] if label == "im" else [])])
            out = capsys.readouterr().out
            assert "alpaca_eval_1: generated 2 samples, 0 already in" in out, out
            assert "alpaca_eval_2: generated 0 samples, 2 already in" in out, out  # judged twice, generated once
    results = {b: json.loads((runs["im"] / "results" / f"{b}.json").read_text())
               for b in ("humaneval", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", "nlp")}
    assert {r["provenance"]["protocol"] for r in results.values()} == {"paper"}
    assert results["mt_bench"]["provenance"]["template"]["name"] == "fastchat:one_shot"
    assert results["mt_bench"]["provenance"]["sampling"]["top_k"] == 50
    assert results["alpaca_eval_2"]["provenance"]["template"]["name"] == "tulu"
    assert results["alpaca_eval_2"]["provenance"]["sampling"]["context_length"] == 512
    assert results["humaneval"]["provenance"]["sampling"]["context_length"] == 512
    assert results["humaneval"]["provenance"]["deviations"] == ["--max-new-tokens 8", "--n 1"]
    assert "add_bos_token=False" in results["nlp"]["config"]["lm_eval_model_args"]
    assert list((runs["im"] / "nlp" / "lm_eval_cache_paper").glob("*_rank0.db"))  # its own cache, keyed
    md = (runs["im"] / "report" / "report.md").read_text()
    page = (runs["im"] / "report" / "report.html").read_text()
    assert "Protocol: paper (the authors' scripts" in md and "<b>Protocol:</b> paper (the authors&#x27; scripts" in page
    assert "| im [smoke] |" in md and "| it (baseline) [smoke] |" in md
    flagged = md.split("Not comparable with the paper's Table 1:")[1]
    assert "- im: HumanEval: smoke --limit 2; --max-new-tokens 8 changes the protocol; --n 1 changes the protocol" in flagged
    assert ("- im: MT-Bench, AlpacaEval 1.0, AlpacaEval 2.0: smoke --limit 2; judge eval-suite-rule-judge, not GPT-4; "
            "--max-new-tokens 8 changes the protocol\n") in flagged
    assert "M&C partial: no score for GSM8K" in flagged  # HumanEval alone fills Math & Coding
    assert "title='not comparable with the paper: smoke --limit 2" in page


def nlp_result(run_dir, protocol_name: str, raw: dict, limit=None):
    """An NLP result computed from raw lm-eval scores, and the HumanEval result that fills Math & Coding."""
    from eval_suite.nlp.bench import Suite, table1
    from eval_suite.results import BenchmarkResult

    suite = Suite.load()
    result = table1(raw, suite, protocol=protocols.get(protocol_name))
    result.model, result.config["suite"] = run_dir.name, suite.model_dump()
    result.provenance = {"protocol": protocol_name, "model": {"path": str(run_dir)}, "limit": limit, "n_shot": {},
                         "tasks": ["im_sft_eval"]}
    result.write(run_dir)
    BenchmarkResult(benchmark="humaneval", model=run_dir.name, headline=100 * raw["HumanEval"],
                    metrics={"pass@1": raw["HumanEval"]}, provenance={**result.provenance, "tasks": None}).write(run_dir)


def test_report_scores_wmt_as_the_runs_protocol_did_and_refuses_mixing_protocols(tmp_path):
    """The report re-aggregates each run from its raw lm-eval scores: a paper-protocol run shows Table 1's
    Multi (TER as it is), a default one 100 - TER; putting them in one table needs --allow-mixed."""
    from test_nlp import table1_base_row_raw

    from eval_suite.nlp.bench import Suite
    from eval_suite.report import build_sections

    raw = table1_base_row_raw(Suite.load())
    nlp_result(tmp_path / "paper", "paper", raw)
    nlp_result(tmp_path / "default", "default", raw)
    (paper,), _ = build_sections([tmp_path / "paper"], None)
    (default,), _ = build_sections([tmp_path / "default"], None)
    paper_row, default_row = paper.rows[0], default.rows[0]
    assert round(paper_row.values["Multi"], 2) == 61.99 and round(paper_row.values["Mean"], 2) == 49.32
    assert round(default_row.values["Multi"], 2) == 40.01 and round(default_row.values["Mean"], 2) == 45.66
    assert paper_row.flags == {}  # paper protocol, full run, every task scored: Table 1's numbers
    assert default_row.flags["Multi"] == ["protocol default, not paper"]
    with pytest.raises(ValueError, match=r"runs with different protocols in one report \(humaneval: .* nlp: .* differ in protocol\)"):
        build_sections([tmp_path / "paper"], tmp_path / "default")
    sections, mixed = build_sections([tmp_path / "paper"], tmp_path / "default", allow_mixed=True)
    assert mixed and "protocol" in mixed[0]


def test_results_of_another_protocol_are_not_reused(tmp_path, tiny_model_dir):
    """`eval-suite all --protocol paper` in a run folder holding default-protocol results runs the benchmark again."""
    import argparse

    from eval_suite.freshness import digest
    from eval_suite.pipeline import Run, already_done
    from eval_suite.results import BenchmarkResult

    def args(name):
        return argparse.Namespace(model=str(tiny_model_dir), limit=None, protocol=name)

    # Reuse is decided by the result's key (eval_suite.freshness), which holds the protocol and its settings.
    key = digest(Run(args("default"), tmp_path).result_inputs("mt_bench"))
    BenchmarkResult(benchmark="mt_bench", model="m", headline=5.0,
                    provenance={"protocol": "default", "key": key, "limit": None}).write(tmp_path)
    for name, reused in (("default", True), ("paper", False)):
        assert (already_done(Run(args(name), tmp_path), "mt_bench") is not None) == reused
