"""Backends: `--backend vllm` without vLLM is a preflight line; the vLLM requests are vLLM's own types."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import run_cli

from eval_suite.generation import Generator, SamplingConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: there is nothing missing to report")
def test_backend_vllm_without_vllm_is_a_preflight_line_naming_the_install(tiny_model_dir, tmp_path):
    proc = run_cli("all", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--backend", "vllm",
                   "--skip", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", "nlp")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "preflight failed (nothing was generated)" in proc.stderr
    assert "  - --backend vllm: vLLM is not installed; pip install '.[vllm]' (on a CUDA machine), or pass --backend hf" \
        in proc.stderr
    assert "--allow-code-execution" in proc.stderr  # every failure listed at once, not just the first
    proc = run_cli("nlp", "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--backend", "vllm")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("eval-suite nlp: --backend vllm: vLLM is not installed; "
                                                    "pip install '.[vllm]' (on a CUDA machine), or pass --backend hf")


def test_vllm_requests_are_vllms_own_token_prompts_and_sampling_params(tiny_model_dir):
    """The request building of the vLLM path, checked against the installed vLLM's classes (skipped without it:
    vLLM is large and needs CUDA, so CI's CPU stacks do not install it)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install '.[vllm]' on a CUDA machine runs this check)")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    gen = Generator(str(tiny_model_dir), backend="vllm", load_model=False)
    prompts = ["def add(a, b):", "The quick brown fox"]
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.7, top_p=0.95, n=2, stop=("\ndef", "\nclass"), seed=3)
    rows = [(p, j, f"k{p}#{j}") for p in range(2) for j in range(2)]
    requests, params = gen.vllm_requests(prompts, sampling, rows)
    assert len(requests) == len(params) == 4
    for (p, _, _), request, param in zip(rows, requests, params):
        assert set(request) <= set(TokensPrompt.__annotations__)
        assert TokensPrompt(**request)["prompt_token_ids"] == gen.prompt_ids(prompts[p])
        assert isinstance(param, SamplingParams)
        assert (param.n, param.temperature, param.top_p, param.max_tokens) == (1, 0.7, 0.95, 7)
        assert param.top_k in (-1, 0)  # off, whichever spelling this vLLM keeps
        assert list(param.stop) == ["\ndef", "\nclass"]
    assert len({param.seed for param in params}) == 4  # one seed per row key: a resumed row draws the same sample
    greedy = gen.vllm_requests(prompts, SamplingConfig(max_new_tokens=3, top_k=5), rows[:1])[1][0]
    assert (greedy.temperature, greedy.top_k, greedy.stop) == (0.0, 5, [])
