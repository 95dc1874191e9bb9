"""Text generation for the open-ended benchmarks: HF ``generate`` batched by tokens, or vLLM.

Chat prompts go through the model's own chat template (``tokenizer.apply_chat_template``), so a
model is scored in the format it was fine-tuned on; ``chat_template`` overrides it for a tokenizer
that has none (``eval_suite/templates/tulu.jinja`` is the paper's ``<|user|>``/``<|assistant|>`` format).

Both backends are fed the same token ids (:meth:`Generator.prompt_ids`): the prompt text tokenised
without special tokens, then exactly one BOS in front when the model uses one. vLLM gets those ids as
``prompt_token_ids``, so it neither re-tokenises nor adds a second BOS after a template's own. Both
return the text the new tokens add to the prompt: the HF path decodes prompt + continuation and cuts
the prompt's text (:func:`decode_continuations`), as vLLM's incremental detokeniser does, so a
SentencePiece tokenizer keeps the first space of a completion.

Generation is resumable: with a :class:`eval_suite.records.SampleStore`, every batch's samples are
appended to a JSONL file as soon as the batch is done, and a rerun generates only the rows that are
missing. Each batch is seeded from the keys of its rows, and batches are planned over all rows, so
a resumed run samples the same text as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"
# Tokens of KV cache one generate call may hold on CPU (no free-memory reading there): small enough
# for a laptop, large enough that a 7B-shaped model still batches a few rows.
CPU_TOKEN_BUDGET = 16_384
# Share of free GPU memory (after loading the model) that the KV cache of one batch may take; the
# rest covers activations, logits and the allocator's fragmentation.
GPU_MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None = off (the authors' vLLM default); HF's default of 50 is never used
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = field(default_factory=tuple)  # cut the text before the first of these
    seed: int = 1234
    # Stop each sample once prompt + new tokens reach this many (the model's context length), as
    # vLLM does; None: only max_new_tokens limits it.
    context_length: int | None = None

    def protocol(self) -> dict[str, Any]:
        """The settings a results file records."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "n": self.n, "stop": list(self.stop), "seed": self.seed,
                "context_length": self.context_length}

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens a sample of a ``prompt_length``-token prompt may generate (0: the prompt fills the context)."""
        if self.context_length is None:
            return self.max_new_tokens
        return max(0, min(self.max_new_tokens, self.context_length - prompt_length))


@dataclass(frozen=True)
class BackendOptions:
    """How the model is loaded (the vLLM options are ignored by the HF backend, except ``dtype``)."""

    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA when available
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` before the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = min((i for s in stop if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


def decode_continuations(tokenizer, prompts: Sequence[list[int]], continuations: Sequence[list[int]]) -> list[str]:
    """The text each continuation adds to its prompt: decode prompt + continuation, cut the prompt's text.

    Decoding the new tokens on their own is wrong for SentencePiece tokenizers (LLaMA-1/2, Mistral):
    their decoder drops the leading space of the first piece ("▁▁▁▁return" -> "   return"), so a
    HumanEval body loses one space of indentation and every program fails. lm-eval and vLLM's
    incremental detokeniser decode with the prompt in front for the same reason. When the prompt's
    text is not a prefix of the whole (a character split across the boundary, or a decoder clean-up
    that looks across it), the cut is at the longest common prefix.
    """
    whole = tokenizer.batch_decode([list(p) + list(c) for p, c in zip(prompts, continuations)], skip_special_tokens=True)
    heads = tokenizer.batch_decode([list(p) for p in prompts], skip_special_tokens=True)
    out = []
    for head, text in zip(heads, whole):
        cut = len(head) if text.startswith(head) else len(os.path.commonprefix([head, text]))
        out.append(text[cut:])
    return out


def load_chat_template(path_or_name: str | None) -> str | None:
    """A Jinja chat template from a file, or by name from ``eval_suite/templates`` (e.g. ``tulu``)."""
    if path_or_name is None:
        return None
    path = Path(path_or_name)
    if not path.is_file():
        path = TEMPLATES_DIR / f"{path_or_name}.jinja"
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path_or_name!r}: no such file, and no {path.name} in {TEMPLATES_DIR}")
    return path.read_text()


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (logged); ``cuda`` without CUDA is an error."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        log.info("no CUDA device: generating on CPU (slow for a 7B model; pass --device cuda on a GPU machine)")
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no usable CUDA device; pass --device cpu (or auto)")
    return device


VLLM_MISSING = "--backend vllm: vLLM is not installed; pip install '.[vllm]' (on a CUDA machine), or pass --backend hf"


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``vllm`` when vLLM is importable and CUDA is present, else ``hf`` (logged); ``vllm``
    without vLLM is a ValueError naming the install. One answer for generation and the NLP suite alike."""
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        backend = "vllm" if has_vllm and torch.cuda.is_available() else "hf"
        log.info("backend: %s%s", backend, "" if backend == "vllm" else
                 " (vLLM is used when installed and a GPU is present: pip install '.[vllm]')")
    elif backend == "vllm" and not has_vllm:
        raise ValueError(VLLM_MISSING)
    return backend


def token_budget_batches(lengths: Sequence[int], max_new_tokens: int | Sequence[int], budget: int,
                         max_rows: int | None = None) -> list[list[int]]:
    """Plan generate calls whose padded KV cache stays within ``budget`` tokens.

    A batch of rows costs ``rows * (longest prompt in it + max_new_tokens)`` tokens, the size of its
    KV cache at the last step. Rows go shortest first, so a batch's padding is small and the batch
    size shrinks as prompts grow instead of the longest prompts all landing in one batch.

    Args:
        lengths: prompt length in tokens of every row (a row is one sample of one prompt).
        max_new_tokens: generation length, or one per row (rows capped at the context length).
        budget: most KV-cache tokens one call may hold.
        max_rows: also at most this many rows per call (``--batch-size N``).

    Returns:
        Batches of row indices. A row that alone exceeds the budget raises a ValueError.
    """
    new = [max_new_tokens] * len(lengths) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    current_new = 0  # the most new tokens a row of the current batch may take (the call generates that many)
    for i in order:
        cost_alone = lengths[i] + new[i]
        if cost_alone > budget:
            raise ValueError(f"a prompt of {lengths[i]} tokens plus {new[i]} new tokens does not fit the "
                             f"generation budget of {budget} tokens; raise --batch-tokens or lower --max-new-tokens")
        # Shortest first: the new row is the longest so far, so it sets the padded length.
        cost = (len(current) + 1) * (lengths[i] + max(current_new, new[i]))
        if current and (cost > budget or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current, current_new = [], 0
        current.append(i)
        current_new = max(current_new, new[i])
    if current:
        batches.append(current)
    return batches


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """A seed that depends only on the rows in a batch, so a resumed batch samples the same text."""
    return zlib.crc32(("\n".join(keys) + f"\n{seed}").encode())


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of KV cache one token takes in a decoder-only transformer with this config."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


class Generator:
    """A causal LM loaded once, generating for many prompts.

    Args:
        model_dir: a local Hugging Face model directory (or hub id when online).
        chat_template: Jinja template replacing the tokenizer's own (see :func:`load_chat_template`).
        batch_size: ``"auto"`` (rows limited only by the token budget) or the most rows per ``generate`` call.
        backend: ``hf``, ``vllm``, or ``auto`` (vLLM if importable and a GPU is present).
        batch_tokens: KV-cache tokens per ``generate`` call; default from free GPU memory, or
            :data:`CPU_TOKEN_BUDGET` on CPU.
        options: dtype, device and the vLLM engine settings.
        load_model: False builds only the tokenizer (prompt rendering and tests).
    """

    def __init__(self, model_dir: str, chat_template: str | None = None, batch_size: int | str = "auto",
                 backend: str = "auto", batch_tokens: int | None = None, options: BackendOptions = BackendOptions(),
                 load_model: bool = True):
        import torch
        from transformers import AutoTokenizer

        self.model_dir = str(model_dir)
        self.max_rows = None if batch_size in (None, "auto") else int(batch_size)
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.bos_id = self._bos_policy()
        self.backend = resolve_backend(backend)
        self.generated = 0  # rows generated, over all complete() calls
        self.reused = 0  # rows found in a store instead, over all complete() calls
        self.batch_tokens = batch_tokens
        self._context_length: int | None = options.max_model_len
        if not load_model:
            return
        if backend == "vllm":
            import vllm

            self._llm = vllm.LLM(model=self.model_dir, dtype=options.dtype, tensor_parallel_size=options.tensor_parallel_size,
                                 gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
                                 tokenizer=self.model_dir)
        else:
            from transformers import AutoModelForCausalLM

            self.device = resolve_device(options.device)
            dtype = (torch.bfloat16 if self.device.startswith("cuda") else torch.float32) if options.dtype == "auto" \
                else getattr(torch, options.dtype)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            if self.batch_tokens is None:
                self.batch_tokens = self._auto_batch_tokens(dtype)

    # ---- prompts ------------------------------------------------------------------------------

    def _bos_policy(self) -> int | None:
        """The BOS id when this model's prompts start with one, else None.

        A model uses a BOS when its tokenizer adds one by default (Llama) or its chat template writes one.
        """
        tok = self.tokenizer
        if tok.bos_token_id is None:
            return None
        adds_bos = tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        template_bos = isinstance(tok.chat_template, str) and "bos_token" in tok.chat_template
        return tok.bos_token_id if adds_bos or template_bos else None

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids both backends feed for ``text``: no special tokens added, then exactly one BOS."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.bos_id is not None:
            while ids and ids[0] == self.bos_id:  # a template's own BOS, possibly doubled by a careless one
                ids.pop(0)
            ids.insert(0, self.bos_id)
        return ids

    def vllm_prompts(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        """What the vLLM backend hands ``LLM.generate``: token ids (vLLM's ``TokensPrompt``), never text."""
        return [{"prompt_token_ids": self.prompt_ids(t)} for t in texts]

    def hf_batch(self, texts: Sequence[str]) -> dict[str, Any]:
        """Left-padded ``input_ids`` and ``attention_mask`` for HF ``generate`` (ids from :meth:`prompt_ids`)."""
        import torch

        ids = [self.prompt_ids(t) for t in texts]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask}

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant's generation prompt."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template; pass --chat-template FILE "
                             f"(or a name from {TEMPLATES_DIR}, e.g. tulu)")
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def context_length(self) -> int:
        """Prompt plus generated tokens the model takes: ``--max-model-len``, else its config's positions."""
        if self._context_length is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.model_dir)
            for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
                if isinstance(getattr(config, name, None), int):
                    self._context_length = getattr(config, name)
                    break
            else:
                raise ValueError(f"{self.model_dir}: config.json names no context length (max_position_embeddings); "
                                 "pass --max-model-len N")
        return self._context_length

    def template_hash(self) -> str | None:
        import hashlib

        template = self.tokenizer.chat_template
        return hashlib.sha256(template.encode()).hexdigest()[:16] if isinstance(template, str) else None

    # ---- generation ---------------------------------------------------------------------------

    def chat(self, conversations: list[list[dict[str, str]]], sampling: SamplingConfig, desc: str = "generating",
             store=None, keys: Sequence[str] | None = None) -> list[str]:
        """One reply per conversation, generated after the model's chat template."""
        prompts = [self.render_chat(c) for c in conversations]
        return [samples[0] for samples in self.complete(prompts, sampling, desc, store=store, keys=keys)]

    def complete(self, prompts: list[str], sampling: SamplingConfig, desc: str = "generating", store=None,
                 keys: Sequence[str] | None = None) -> list[list[str]]:
        """``sampling.n`` continuations of each prompt, cut at the stop sequences.

        Args:
            prompts: prompt texts (chat-rendered or raw; both get exactly one BOS, see :meth:`prompt_ids`).
            store: a :class:`eval_suite.records.SampleStore`; rows already in it are not generated again.
            keys: one key per prompt naming it in the store (default: its position).
        """
        keys = list(keys) if keys is not None else [str(i) for i in range(len(prompts))]
        row_keys = [(p, j, f"{keys[p]}#{j}") for p in range(len(prompts)) for j in range(sampling.n)]
        done = store.texts() if store is not None else {}
        if sampling.context_length is not None:  # a prompt that fills the context gets an empty sample, as in vLLM
            full = {p for p in range(len(prompts)) if sampling.new_tokens(len(self.prompt_ids(prompts[p]))) == 0}
            if full:
                log.warning("%d of %d prompts take the whole context of %d tokens: their samples are empty",
                            len(full), len(prompts), sampling.context_length)
                done.update({k: "" for p, _, k in row_keys if p in full and k not in done})
        todo = [r for r in row_keys if r[2] not in done]
        self.reused += len(row_keys) - len(todo)
        if todo:
            if self.backend == "vllm":
                self._complete_vllm(prompts, sampling, todo, done, store)
            else:
                self._complete_hf(prompts, sampling, row_keys, todo, done, store, desc)
        out = [[truncate_at_stop(done[k], sampling.stop) for (p2, _, k) in row_keys if p2 == p] for p in range(len(prompts))]
        return out

    def _auto_batch_tokens(self, dtype) -> int:
        import torch

        if not self.device.startswith("cuda"):
            return CPU_TOKEN_BUDGET
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        per_token = kv_bytes_per_token(self._model.config, torch.tensor([], dtype=dtype).element_size())
        budget = int(GPU_MEMORY_SHARE * free / per_token)
        log.info("--batch-tokens auto: %d tokens of KV cache per call (%.1f GiB free after loading, %.2f MiB per token)",
                 budget, free / 2**30, per_token / 2**20)
        return budget

    def _complete_hf(self, prompts, sampling: SamplingConfig, row_keys, todo, done: dict, store, desc: str) -> None:
        import torch

        # Plan over all rows (done or not), so a resumed run cuts the same batches and draws the same
        # seeds as an uninterrupted one; batches with nothing missing are skipped.
        all_rows = row_keys
        lengths = [len(self.prompt_ids(p)) for p in prompts]
        caps = [sampling.new_tokens(lengths[p]) for p in range(len(prompts))]  # per prompt: context length
        batches = token_budget_batches([lengths[p] for p, _, _ in all_rows], [caps[p] for p, _, _ in all_rows],
                                       self.batch_tokens or CPU_TOKEN_BUDGET, self.max_rows)
        kwargs = dict(pad_token_id=self.tokenizer.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or 0)  # 0 turns transformers' default top-k of 50 off
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        todo_keys = {r[2] for r in todo}
        batches = [b for b in batches if any(all_rows[i][2] in todo_keys for i in b)]
        for batch in tqdm(batches, desc=desc):
            rows = [all_rows[i] for i in batch]
            enc = {k: v.to(self._model.device) for k, v in self.hf_batch([prompts[p] for p, _, _ in rows]).items()}
            torch.manual_seed(batch_seed(sampling.seed, [k for _, _, k in rows]))
            with torch.no_grad():
                out = self._model.generate(**enc, max_new_tokens=max(caps[p] for p, _, _ in rows), **kwargs)
            # Each row keeps at most its own cap (a longer prompt has less room in the context); the text
            # is decoded with the prompt in front (decode_continuations: SentencePiece's first space).
            width = enc["input_ids"].shape[1]
            prompt_rows = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"].cpu(), enc["attention_mask"].cpu())]
            new_ids = out[:, width:].cpu()
            texts = decode_continuations(self.tokenizer, prompt_rows,
                                         [ids[:caps[p]].tolist() for ids, (p, _, _) in zip(new_ids, rows)])
            new = {k: t for (_, _, k), t in zip(rows, texts) if k in todo_keys}
            self._save(new, done, store)

    def _save(self, new: dict[str, str], done: dict, store) -> None:
        if store is not None:
            store.append(new)
        done.update(new)
        self.generated += len(new)

    def vllm_requests(self, prompts: Sequence[str], sampling: SamplingConfig, rows) -> tuple[list[dict[str, list[int]]], list]:
        """What ``LLM.generate`` gets for ``rows`` ((prompt index, sample index, key) each): token-id
        prompts (vLLM's ``TokensPrompt``) and one ``SamplingParams`` per row, seeded by its key, so a
        resumed run draws the same samples. vLLM's output text is decoded incrementally with the prompt
        in front, so it keeps a SentencePiece completion's first space like :func:`decode_continuations`."""
        import vllm

        params = [vllm.SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k or -1,
                                      max_tokens=sampling.new_tokens(len(self.prompt_ids(prompts[p]))),
                                      stop=list(sampling.stop) or None, seed=batch_seed(sampling.seed, [k]))
                  for p, _, k in rows]
        return self.vllm_prompts([prompts[p] for p, _, _ in rows]), params

    def _complete_vllm(self, prompts, sampling: SamplingConfig, todo, done: dict, store) -> None:
        chunk = 512  # rows per generate call: progress reaches the store at least this often
        for start in range(0, len(todo), chunk):
            rows = todo[start:start + chunk]
            results = self._llm.generate(*self.vllm_requests(prompts, sampling, rows), use_tqdm=True)
            self._save({k: r.outputs[0].text for (_, _, k), r in zip(rows, results)}, done, store)


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """Model path plus a hash of its config (and the hub revision when the directory records one)."""
    import hashlib

    path = Path(model_dir)
    info: dict[str, Any] = {"path": str(model_dir)}
    config = path / "config.json"
    if config.is_file():
        info["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        info["weights_bytes"] = sum(w.stat().st_size for w in weights)
    revision = path / ".git" / "HEAD"
    if revision.is_file():
        info["revision"] = revision.read_text().strip()
    return info

