"""The loss from hidden states (``losses.HiddenStates``, chunked) against the logits path and a
float64 brute force: values and gradients w.r.t. the hidden states and every head parameter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instruction_modelling.core.kl import kl_mask
from instruction_modelling.core.losses import (
    HiddenStates,
    LogitTransform,
    ReferenceHidden,
    loss_normaliser,
    segment_weighted_loss,
    target_coefficients,
)
from test_losses import TABLES, make_examples

V, D = 23, 6


def batch(layout: str, seed: int = 0):
    """(input_ids, segment_ids, position_ids or None) of random examples, padded or packed."""
    examples = make_examples(seed, n=5)
    rows = len(examples) if layout == "padded" else 2
    buckets = [[] for _ in range(rows)]
    for i, ex in enumerate(examples):
        buckets[i % rows].append(ex)
    length = max(sum(len(x) for x, _ in b) for b in buckets) + 2
    ids = torch.zeros(rows, length, dtype=torch.long)
    segs = torch.zeros(rows, length, dtype=torch.long)
    pos = torch.zeros(rows, length, dtype=torch.long)
    for r, bucket in enumerate(buckets):
        o = 0
        for x, s in bucket:
            ids[r, o:o + len(x)] = torch.tensor(x) % V
            segs[r, o:o + len(x)] = torch.tensor(s)
            pos[r, o:o + len(x)] = torch.arange(len(x))
            o += len(x)
        pos[r, o:] = torch.arange(length - o)
    return ids, segs, (pos if layout == "packed" else None)


def make_head(kind: str, dtype=torch.float64):
    """An output layer of the given kind, and the transform of the logits."""
    torch.manual_seed(3)
    transform = LogitTransform()
    if kind == "tied":
        emb = torch.nn.Embedding(V, D).to(dtype)
        head = torch.nn.Linear(D, V, bias=False).to(dtype)
        head.weight = emb.weight
    else:
        head = torch.nn.Linear(D, V, bias=(kind == "bias")).to(dtype)
    if kind == "softcap":
        transform = LogitTransform(softcap=0.7)  # small cap: most logits are in tanh's curved range
    if kind == "scaled":
        transform = LogitTransform(multiplier=0.3, divisor=1.7)
    return head, transform


def brute_force(hidden, head, transform, ids, segs, pos, table, normalisation, ref_logits=None, kl_type="full",
                kl_lambda=0.0, kl_segments="output"):
    """Σ ce_coef·CE (+ λ Σ mask·kl_coef·KL) in float64 from whole logits, with plain autograd."""
    logits = transform(head(hidden.double())).double()[:, :-1]
    coef = target_coefficients(ids, segs, table, pos, normalisation)
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids[:, 1:].shape)
    loss = (ce * coef.ce_coef.double()).sum()
    if ref_logits is not None:
        logp = logits.log_softmax(-1)
        logq = ref_logits.double()[:, :-1].log_softmax(-1)
        if kl_type == "full":
            kl = (logp.exp() * (logp - logq)).sum(-1)
        else:
            t = ids[:, 1:].unsqueeze(-1)
            kl = (logp.gather(-1, t) - logq.gather(-1, t)).squeeze(-1)
        mask = kl_mask(segs, pos, kl_segments)
        loss = loss + kl_lambda * (kl * mask * coef.kl_coef.double()).sum()
    return loss


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


CASES = [
    # (table, normalisation, layout, head, kl, chunk)
    ("im", "token", "padded", "plain", None, 7),
    ("it", "token", "packed", "plain", None, 1),
    ("weighted", "sequence", "packed", "bias", None, 7),
    ("role_overrides", "token", "padded", "tied", None, 4096),
    ("im", "sequence", "padded", "softcap", None, 7),
    ("weighted", "token", "packed", "scaled", None, 1),
    ("it", "token", "packed", "plain", "full", 7),
    ("im", "sequence", "padded", "tied", "target_token", 4096),
    ("weighted", "token", "padded", "softcap", "full", 1),
    ("im", "token", "packed", "bias", "target_token", 7),
]


@pytest.mark.parametrize("table_name,normalisation,layout,head_kind,kl_type,chunk", CASES)
def test_hidden_path_equals_logits_path_and_float64_brute_force(table_name, normalisation, layout, head_kind,
                                                                 kl_type, chunk):
    table = TABLES[table_name]
    ids, segs, pos = batch(layout, seed=len(table_name) + chunk)
    head, transform = make_head(head_kind)
    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(*ids.shape, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref_logits = reference = mask = None
    kl_lambda = 0.0
    if kl_type is not None:
        # The reference as AdapterReference / CopyReference give it (its hidden states and output
        # layer; the KL rows' logits only), and as plain rows of logits for the logits path.
        ref_head = torch.nn.Linear(D, V, bias=head_kind == "bias").to(torch.float64)
        ref_hidden = torch.randn(ids.numel(), D, generator=g, dtype=torch.float64)
        ref_logits = ref_head(ref_hidden).detach().view(*ids.shape, V)
        flat = ref_logits.flatten(0, 1)
        reference = lambda s, e: flat[s:e]  # noqa: E731
        mask = kl_mask(segs, pos, "output")
        kl_lambda = 0.4
    params = [hidden] + [p for p in head.parameters()]
    # an uneven window normaliser, as from several micro-batches
    normaliser = loss_normaliser(ids, segs, table, pos, normalisation) * 2  # exact in fp32

    def run(scores):
        return segment_weighted_loss(scores, ids, segs, table, pos, normalisation, normaliser=normaliser,
                                     kl_reference=reference, kl_mask=mask, kl_coef=kl_lambda,
                                     kl_type=kl_type or "full", chunk_size=chunk)

    hidden_out = run(HiddenStates(hidden, head, transform))
    logits_out = run(transform(head(hidden)))
    if kl_type is not None:  # the hidden path with either form of reference
        rows_out = hidden_out
        reference = ReferenceHidden(ref_hidden, ref_head)
        hidden_out = run(HiddenStates(hidden, head, transform))
        torch.testing.assert_close(hidden_out.loss, rows_out.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hidden_out.kl_sum, rows_out.kl_sum, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads(run(HiddenStates(hidden, head, transform)).loss, params), grads(rows_out.loss, params)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    brute = brute_force(hidden, head, transform, ids, segs, pos, table, normalisation, ref_logits,
                        kl_type or "full", kl_lambda) / 2

    torch.testing.assert_close(hidden_out.loss, logits_out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden_out.loss, brute, rtol=1e-10, atol=1e-12)
    for a, b, c in zip(grads(hidden_out.loss, params), grads(logits_out.loss, params), grads(brute, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
    for key in ("instruction_sum", "output_sum", "kl_sum"):
        if getattr(logits_out, key) is not None:
            torch.testing.assert_close(getattr(hidden_out, key), getattr(logits_out, key))


def test_tied_head_gradient_reaches_the_shared_weight_once():
    ids, segs, pos = batch("padded")
    head, transform = make_head("tied")
    hidden = torch.randn(*ids.shape, D, dtype=torch.float64)
    segment_weighted_loss(HiddenStates(hidden, head, transform), ids, segs, TABLES["im"], chunk_size=3).loss.backward()
    got = head.weight.grad.clone()
    head.weight.grad = None
    segment_weighted_loss(head(hidden), ids, segs, TABLES["im"]).loss.backward()
    torch.testing.assert_close(got, head.weight.grad, rtol=1e-12, atol=1e-12)


def _tiny_lora(dropout: float, save_head: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).double()
    cfg = dict(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM", init_lora_weights=False)
    if save_head:
        cfg.update(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    else:
        cfg.update(target_modules=["q_proj", "v_proj", "lm_head"])
    return get_peft_model(model, LoraConfig(**cfg))


@pytest.mark.parametrize("save_head", [False, True], ids=["lora_lm_head", "modules_to_save_lm_head"])
def test_peft_adapted_head_gradients_match_the_logits_path(save_head):
    model = _tiny_lora(0.0, save_head)
    ids, segs, pos = batch("packed")
    head = model.get_base_model().get_output_embeddings()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)

    def loss(from_hidden):
        hidden = model.get_base_model().get_decoder()(input_ids=ids, position_ids=pos).last_hidden_state
        scores = HiddenStates(hidden, head) if from_hidden else head(hidden)
        return segment_weighted_loss(scores, ids, segs, TABLES["weighted"], pos, chunk_size=7).loss

    a, b = loss(True), loss(False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(grads(a, trained), grads(b, trained)):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_dropout_in_an_adapted_head_gets_the_gradient_of_the_masks_drawn():
    model = _tiny_lora(0.5, save_head=False)
    model.train()
    ids, segs, _ = batch("padded")
    head = model.get_base_model().get_output_embeddings()
    hidden = torch.randn(*ids.shape, D * 0 + 16, dtype=torch.float64, requires_grad=True)
    trained = [hidden] + [p for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    chunk = 7
    torch.manual_seed(11)
    a = segment_weighted_loss(HiddenStates(hidden, head), ids, segs, TABLES["im"], chunk_size=chunk).loss
    ga = grads(a, trained)
    # The same chunks in the same order with the same seed, differentiated by plain autograd.
    torch.manual_seed(11)
    flat = hidden.flatten(0, 1)
    logits = torch.cat([head(flat[s:s + chunk]) for s in range(0, flat.shape[0], chunk)]).view(*ids.shape, V)
    b = segment_weighted_loss(logits, ids, segs, TABLES["im"]).loss
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, grads(b, trained)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


class _RowsPerVocabTensor(torch.overrides.TorchFunctionMode):
    """Records the row count of every tensor an op returns with the vocabulary as its last dim,
    except views of (and ``out=`` writes into) a tensor it was given: those allocate nothing."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, tuple) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V
                    and t.untyped_storage().data_ptr() not in given):
                self.rows.append(t.numel() // V)
        return out


@pytest.mark.parametrize("head_kind", ["plain", "softcap", "lora"])
def test_no_full_logits_are_built(head_kind):
    """No tensor with the vocabulary as last dim has more rows than a chunk (forward and backward)."""
    ids, segs, _ = batch("padded")
    if head_kind == "lora":
        head, transform = _tiny_lora(0.0, save_head=False).get_base_model().get_output_embeddings(), LogitTransform()
        hidden = torch.randn(*ids.shape, 16, dtype=torch.float64, requires_grad=True)
    else:
        head, transform = make_head(head_kind)
        hidden = torch.randn(*ids.shape, D, dtype=torch.float64, requires_grad=True)
    with _RowsPerVocabTensor() as mode:
        loss = segment_weighted_loss(HiddenStates(hidden, head, transform), ids, segs, TABLES["im"], chunk_size=4).loss
        loss.backward()
    assert mode.rows and max(mode.rows) <= 4, sorted(set(mode.rows))
    with _RowsPerVocabTensor() as mode:  # the check can fail: the logits path has them
        segment_weighted_loss(transform(head(hidden)), ids, segs, TABLES["im"], chunk_size=4).loss.backward()
    assert max(mode.rows) == ids.numel()


# --- impl: cce ------------------------------------------------------------------------------------
# Cut Cross Entropy's CUDA kernel cannot run on this CPU machine. Its own reference implementation,
# `impl="torch_compile"` (same function, same arguments, same per-token result), stands in for it
# here, run eagerly, so that everything of ours around the call is tested: the flattening, the
# targets, the softcap, the per-token coefficients, the returned CE and every gradient.
@pytest.fixture
def cce_on_cpu(monkeypatch):
    cce = pytest.importorskip("cut_cross_entropy")
    import cut_cross_entropy.torch_compile as compiled
    real = cce.linear_cross_entropy

    def on_cpu(*args, **kwargs):
        assert "impl" not in kwargs, "the plugin leaves the kernel choice to Cut Cross Entropy"
        return real(*args, impl="torch_compile", **kwargs)

    monkeypatch.setattr(cce, "linear_cross_entropy", on_cpu)
    # eagerly: the function under its torch.compile wrapper (no C++ compile in a unit test)
    monkeypatch.setattr(compiled, "torch_compile_linear_cross_entropy_apply",
                        compiled.torch_compile_linear_cross_entropy_apply.__wrapped__)


@pytest.mark.parametrize("head_kind,table_name,normalisation,layout", [
    ("plain", "im", "token", "padded"),
    ("tied", "weighted", "sequence", "packed"),
    ("softcap", "role_overrides", "token", "packed"),
])
def test_cce_impl_equals_the_chunked_path(cce_on_cpu, head_kind, table_name, normalisation, layout):
    table = TABLES[table_name]
    ids, segs, pos = batch(layout, seed=11)
    head, transform = make_head(head_kind, dtype=torch.float32)
    hidden = (torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    params = [hidden] + list(head.parameters())

    def run(impl):
        return segment_weighted_loss(HiddenStates(hidden, head, transform, impl=impl), ids, segs, table, pos,
                                     normalisation, chunk_size=7)

    cce, chunked = run("cce"), run("chunked")
    assert cce.loss.item() > 0
    torch.testing.assert_close(cce.loss, chunked.loss, rtol=1e-5, atol=1e-6)
    for key in ("instruction_sum", "output_sum"):
        torch.testing.assert_close(getattr(cce, key), getattr(chunked, key), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(cce.loss, params), grads(chunked.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_kind", ["bias", "scaled"])
def test_cce_impl_refuses_what_its_kernel_cannot_compute(cce_on_cpu, head_kind):
    ids, segs, _ = batch("padded")
    head, transform = make_head(head_kind, dtype=torch.float32)
    hidden = torch.randn(*ids.shape, D, requires_grad=True)
    with pytest.raises(ValueError, match="bias-free lm_head with at most a softcap"):
        segment_weighted_loss(HiddenStates(hidden, head, transform, impl="cce"), ids, segs, TABLES["im"])
