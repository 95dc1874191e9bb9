"""Generated text is exactly what the model's tokens spell, on every tokenizer family.

A model that emits HumanEval's canonical solutions must pass them all, whatever its tokenizer: a
SentencePiece/LLaMA-2-style one (its decoder drops the leading "▁" of a sequence, so decoding the new
tokens on their own loses one space of indentation) and a byte-level BPE whose merges cross line
boundaries. The model is a LlamaForCausalLM whose forward emits given token ids (no weights involved);
everything else is the real path: Generator.complete/chat, HF ``generate`` with stop strings, decoding,
the benchmarks' own generate functions and HumanEval's sandboxed scoring.
"""

from __future__ import annotations

import pytest
from conftest import TULU_TEMPLATE

from eval_suite.generation import Generator, SamplingConfig
from eval_suite.humaneval import bench as humaneval

SPECIALS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(kind: str, corpus: list[str], out):
    """A tokenizer trained in memory: ``sentencepiece`` is LLaMA-2's fast-tokenizer pipeline (Prepend "▁",
    spaces as "▁", a decoder that strips one leading space; the corpus covers every character, so no byte
    fallback is needed); ``bytelevel`` is a GPT-2-style BPE
    without the regex split, so merges such as ".\\n" and "\\n    return" cross line boundaries."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=1500, max_token_length=16, special_tokens=SPECIALS)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1500, max_token_length=16, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = TULU_TEMPLATE
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def emitted_ids(tokenizer, kind: str, text: str) -> list[int]:
    """The ids a model emits to continue a prompt with ``text``: its pieces mid-sequence (no "▁" prefix)."""
    backend = tokenizer.backend_tokenizer
    if kind == "sentencepiece":
        return [t.id for t in backend.model.tokenize(text.replace(" ", "▁"))]
    return backend.encode(text, add_special_tokens=False).ids


class ForcedModel:
    """Builds a LlamaForCausalLM whose next token is the next one of the target for the prompt it continues."""

    @staticmethod
    def build(tokenizer, targets: dict[tuple[int, ...], list[int]]):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_outputs import CausalLMOutputWithPast

        eos = tokenizer.eos_token_id

        class Forced(LlamaForCausalLM):
            def generate(self, input_ids=None, attention_mask=None, **kwargs):
                # The prompt of each row, as the caller passed it; forward sees it plus what came since.
                self.prompts = [targets[tuple(i for i, m in zip(ids, mask) if m)]  # KeyError: an unplanned prompt
                                for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
                self.width = input_ids.shape[1]
                return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

            def forward(self, input_ids=None, attention_mask=None, **kwargs):
                done = input_ids.shape[1] - self.width
                logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
                for row, target in enumerate(self.prompts):
                    logits[row, 0, target[done] if done < len(target) else eos] = 0.0
                return CausalLMOutputWithPast(logits=logits)

        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=1, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        model = Forced(config).eval()
        model.generation_config.use_cache = False  # forward sees the whole sequence and looks its prompt up
        return model


def forced_generator(model_dir, kind: str, prompts: list[str], completions: list[str]) -> Generator:
    """The real Generator (HF backend) over a model that emits ``completions[i]`` after ``prompts[i]``."""
    gen = Generator(str(model_dir), backend="hf", load_model=False)
    targets = {tuple(gen.prompt_ids(p)): emitted_ids(gen.tokenizer, kind, c) for p, c in zip(prompts, completions)}
    gen._model, gen.device, gen.batch_tokens = ForcedModel.build(gen.tokenizer, targets), "cpu", 200_000
    return gen


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def tokenizer_dir(request, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    corpus = [p["prompt"] + p["canonical_solution"] for p in problems.values()] + list(CHAT_REPLIES) + \
        [TULU_TEMPLATE, "<|user|>\n<|assistant|>\n"] + [t for turn in MT_TURNS for t in turn]
    tok = train_tokenizer(request.param, corpus, out)
    if request.param == "sentencepiece":  # the hard case this test is for: decoding alone drops a space
        ids = emitted_ids(tok, "sentencepiece", "    return x")
        assert tok.decode(ids) == "   return x"
    else:
        vocab = tok.get_vocab()  # byte-level pieces: "Ċ" is "\n", "Ġ" a space
        assert any(0 < t.find("Ċ") < len(t) - 1 for t in vocab), "no merge across a line break (e.g. '.ĊĠĠĠĠ')"
    return request.param, out


def test_humaneval_canonical_solutions_through_generation_pass_them_all(tokenizer_dir, problems, tmp_path):
    """All 164 with the SentencePiece tokenizer (0 of 164 before the fix: IndentationError), the first 40 with
    the byte-level one (which was right before too; it guards the cut at the prompt's text). Greedy: sampling
    at a temperature takes the same decoding path and only costs time here."""
    kind, model_dir = tokenizer_dir
    task_ids = list(problems)[: 164 if kind == "sentencepiece" else 40]
    gen = forced_generator(model_dir, kind, [problems[t]["prompt"] for t in task_ids],
                           [problems[t]["canonical_solution"] for t in task_ids])
    samples = humaneval.sample(gen, problems, temperatures=(0.0,), n=1, limit=len(task_ids), max_new_tokens=400)
    result, executed = humaneval.score(samples, {t: problems[t] for t in task_ids}, allow_code_execution=True,
                                       ks=(1,), workers=2)
    assert (sum(r["passed"] for r in executed), result.headline) == (len(task_ids), pytest.approx(100.0))
    assert [s["completion"] for s in samples] == [problems[t]["canonical_solution"] for t in task_ids]


CHAT_REPLIES = ["  Two leading spaces, then a line.\n\nAnd a paragraph.", "\n\n    indented code block\n",
                " Sure. Here is a list:\n- one\n- two\n", "No space first.\n"]
MT_TURNS = [("Write a haiku.", "   Falling leaves.\n  Quiet pond.\n"), ("Now in French.", "\n  Feuilles.\n")]


def test_alpaca_eval_outputs_keep_leading_spaces_and_newlines(tokenizer_dir, tmp_path):
    import json

    from eval_suite.alpacaeval import bench as alpaca_eval

    kind, model_dir = tokenizer_dir
    instructions = [f"Instruction {i}: answer." for i in range(len(CHAT_REPLIES))]
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps([{"instruction": x, "output": "ref", "generator": "ref", "dataset": "d"}
                                     for x in instructions]))
    probe = Generator(str(model_dir), load_model=False)
    prompts = [probe.render_chat([{"role": "user", "content": x}]) for x in instructions]
    gen = forced_generator(model_dir, kind, prompts, CHAT_REPLIES)
    outputs = alpaca_eval.generate(gen, reference, "forced", SamplingConfig(max_new_tokens=64))
    assert [o["output"] for o in outputs] == CHAT_REPLIES


def test_mt_bench_second_turn_continues_the_exact_first_answer(tokenizer_dir):
    from eval_suite.mtbench import bench as mt_bench

    kind, model_dir = tokenizer_dir
    (q1, a1), (q2, a2) = MT_TURNS
    probe = Generator(str(model_dir), load_model=False)
    # FastChat strips each answer before it goes into the next turn's prompt and the answer file.
    turn1 = probe.render_chat([{"role": "user", "content": q1}])
    turn2 = probe.render_chat([{"role": "user", "content": q1}, {"role": "assistant", "content": a1.strip()},
                               {"role": "user", "content": q2}])
    gen = forced_generator(model_dir, kind, [turn1, turn2], [a1, a2])
    rows = mt_bench.generate(gen, [{"question_id": 1, "category": "writing", "turns": [q1, q2]}], "forced", 64)
    assert rows[0]["choices"][0]["turns"] == [a1.strip(), a2.strip()]
    assert gen.complete([turn1, turn2], SamplingConfig(max_new_tokens=64)) == [[a1], [a2]]


def test_a_character_split_across_the_prompt_boundary_is_kept_whole(tiny_model_dir):
    """Byte-level BPE: "é" is two byte tokens here; a prompt ending with the first decodes to "...\ufffd", which is
    no prefix of the whole text, so the cut falls at the common prefix and the continuation holds the "é"."""
    from transformers import AutoTokenizer

    from eval_suite.generation import decode_continuations

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("Paris é", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the fixture's tokenizer never saw "é": two byte tokens
    assert decode_continuations(tok, [ids[:-1]], [ids[-1:] + ids[:1]]) == ["é" + tok.decode(ids[:1])]
