"""Text generation for the open-ended benchmarks: batched HF ``generate``, or vLLM when installed on a GPU.

Chat prompts go through the model's own chat template (``tokenizer.apply_chat_template``), so a
model is scored in the format it was fine-tuned on; ``chat_template`` overrides it for a tokenizer
that has none (``eval_suite/templates/tulu.jinja`` is the paper's ``<|user|>``/``<|assistant|>`` format).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    stop: tuple[str, ...] = field(default_factory=tuple)  # cut the text before the first of these
    seed: int = 1234


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut ``text`` before the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = min((i for s in stop if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


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


class Generator:
    """A causal LM loaded once, generating for many prompts in batches.

    Args:
        model_dir: a local Hugging Face model directory (or hub id when online).
        chat_template: Jinja template replacing the tokenizer's own (see :func:`load_chat_template`).
        batch_size: prompts per ``generate`` call (HF backend).
        backend: ``hf``, ``vllm``, or ``auto`` (vLLM if importable and a GPU is present).
    """

    def __init__(self, model_dir: str, chat_template: str | None = None, batch_size: int = 8, backend: str = "auto"):
        import torch
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        if backend == "auto":
            backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
        self.backend = backend
        if backend == "vllm":
            import vllm

            self._llm = vllm.LLM(model=model_dir)
        else:
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            self._model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant's generation prompt."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template; pass --chat-template FILE "
                             f"(or a name from {TEMPLATES_DIR}, e.g. tulu)")
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def chat(self, conversations: list[list[dict[str, str]]], sampling: SamplingConfig, desc: str = "generating") -> list[str]:
        """One reply per conversation, generated after the model's chat template."""
        prompts = [self.render_chat(c) for c in conversations]
        return [samples[0] for samples in self.complete(prompts, sampling, desc, template_applied=True)]

    def complete(self, prompts: list[str], sampling: SamplingConfig, desc: str = "generating",
                 template_applied: bool = False) -> list[list[str]]:
        """``sampling.n`` continuations of each raw prompt, cut at the stop sequences."""
        if self.backend == "vllm":
            outputs = self._complete_vllm(prompts, sampling)
        else:
            outputs = self._complete_hf(prompts, sampling, desc, template_applied)
        return [[truncate_at_stop(t, sampling.stop) for t in samples] for samples in outputs]

    def _complete_hf(self, prompts: list[str], sampling: SamplingConfig, desc: str, template_applied: bool) -> list[list[str]]:
        import torch

        torch.manual_seed(sampling.seed)
        # Longest first, so similar lengths share a batch (less padding) and memory errors show up early.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[list[str]] = [[] for _ in prompts]
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                      pad_token_id=self.tokenizer.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc):
            # A chat template already holds the BOS token it wants; raw prompts get the tokenizer's default.
            enc = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=not template_applied).to(self._model.device)
            with torch.no_grad():
                out = self._model.generate(**enc, **kwargs)
            texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, i in enumerate(batch):
                outputs[i] = texts[j * sampling.n:(j + 1) * sampling.n]
        return outputs

    def _complete_vllm(self, prompts: list[str], sampling: SamplingConfig) -> list[list[str]]:
        import vllm

        params = vllm.SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                     max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
                                     seed=sampling.seed)
        return [[o.text for o in result.outputs] for result in self._llm.generate(prompts, params)]
