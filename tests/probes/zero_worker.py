"""One rank of the 2-process DeepSpeed check (tests/test_deepspeed.py): a tiny causal LM under
``deepspeed.initialize`` (ZeRO-2 or ZeRO-3, CPU, gloo), the IM loss and KL computed the way IMTrainer
computes them, and what the test compares against its float64 brute force written to a JSON file.

Usage: python -m torch.distributed.run --nproc_per_node 2 zero_worker.py OUT_DIR STAGE-KL-IMPL...
  STAGE: 2 | 3;  KL: none | adapter | copy;  IMPL: chunked | logits
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

V, D, CHUNK = 96, 16, 16


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)

    def decoder(self, ids, delta=0.0):
        return torch.tanh(self.mix(self.embed(ids)) + delta)

    def forward(self, ids):
        return self.lm_head(self.decoder(ids))


def make_batch(seed):
    """Rows of mixed segments (template 0, user 2, output 3), different per rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 40), generator=g)
    segs = torch.randint(0, 4, (2, 40), generator=g)
    segs[segs == 1] = 2
    return ids, segs


class Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op creates (to show no [tokens x vocab] tensor is built)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def run_case(stage, kl, impl, out_path):
    import deepspeed
    import deepspeed.comm as ds_comm
    import deepspeed.comm.comm as ds_comm_impl
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from instruction_modelling.axolotl.deepspeed import gather_reference_head, is_zero3_module, zero3_through_head
    from instruction_modelling.core.kl import kl_mask
    from instruction_modelling.core.losses import (
        HiddenStates,
        ReferenceHidden,
        loss_normaliser,
        segment_weighted_loss,
        weight_table,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    policy = TinyLM()
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        # Small buckets: ZeRO-2's default reduce bucket (5e8 elements) would hide the loss's own tensors.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 4096, "allgather_bucket_size": 4096},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(), config=config)
    module = engine.module
    zero3 = is_zero3_module(module.lm_head)

    ref_engine = None
    if kl == "copy":  # sharded like the policy under ZeRO-3, a replica otherwise (as TRL's prepare_deepspeed)
        ref = TinyLM()
        ref.load_state_dict(initial)
        with torch.no_grad():
            ref.mix.bias.add_(0.3)
        ref.requires_grad_(False)
        ref_config = {k: v for k, v in config.items() if k != "optimizer"}
        ref_config["zero_optimization"] = {"stage": 3 if stage == 3 else 0, "stage3_param_persistence_threshold": 0}
        ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_config)
        ref_engine.eval()

    table = weight_table(0.5, 1.0)
    ids, segs = make_batch(seed=rank)
    normaliser = loss_normaliser(ids, segs, table)
    dist.all_reduce(normaliser)  # the window's normaliser, summed over ranks as IMTrainer does
    hidden = module.decoder(ids)

    reference = None
    if kl == "adapter":  # the policy's own head on other hidden states (its adapters disabled)
        with torch.no_grad():
            ref_hidden = module.decoder(ids, delta=0.3)
        reference = ReferenceHidden(ref_hidden.reshape(-1, D), module.lm_head)
    elif kl == "copy":
        with torch.no_grad():
            ref_hidden = ref_engine.module.decoder(ids)
        reference = ReferenceHidden(ref_hidden.reshape(-1, D), ref_engine.module.lm_head)
    mask = kl_mask(segs, None, "output") if reference is not None else None
    kl_coef = 0.7 if reference is not None else 0.0

    # All-gathers of at least a head's size during the loss's forward.
    gathers = []
    patched = [(mod, name, getattr(mod, name)) for mod in (ds_comm, ds_comm_impl)
               for name in ("all_gather_into_tensor", "all_gather")]

    def counting(fn):
        def call(output, *args, **kwargs):
            numel = output.numel() if torch.is_tensor(output) else sum(t.numel() for t in output)
            if numel >= V * D:
                gathers.append(numel)
            return fn(output, *args, **kwargs)
        return call

    largest = Largest()
    for mod, name, fn in patched:
        setattr(mod, name, counting(fn))
    try:
        with largest:
            if impl == "chunked":
                through = zero3_through_head(module.lm_head, reference) if zero3 else None
                out = segment_weighted_loss(HiddenStates(hidden, module.lm_head, through_head=through), ids, segs,
                                            table, normaliser=normaliser, kl_reference=reference, kl_mask=mask,
                                            kl_coef=kl_coef, chunk_size=CHUNK)
            else:
                logits = module.lm_head(hidden)
                gather_reference_head(reference)
                out = segment_weighted_loss(logits, ids, segs, table, normaliser=normaliser, kl_reference=reference,
                                            kl_mask=mask, kl_coef=kl_coef, chunk_size=CHUNK)
            forward_gathers = len(gathers)
            # DeepSpeed averages gradients over ranks: each rank's loss is scaled by their number (as IMTrainer does).
            engine.backward(out.loss * world)
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)
    grads = {name: safe_get_full_grad(p).double().tolist() for name, p in module.named_parameters()}
    loss = out.loss.detach().double().clone()
    dist.all_reduce(loss)
    kl_sum = out.kl_sum.detach().double().clone() if out.kl_sum is not None else torch.zeros((), dtype=torch.float64)
    dist.all_reduce(kl_sum)
    result = {
        "rank": rank, "world": world, "zero3": zero3, "loss": float(loss), "kl_sum": float(kl_sum),
        "grads": grads, "largest": largest.largest, "tokens": ids.numel(), "forward_gathers": forward_gathers,
        "initial": {k: v.double().tolist() for k, v in initial.items()},
    }
    with open(f"{out_path}/{stage}-{kl}-{impl}.{rank}.json", "w") as f:
        json.dump(result, f)
    engine.destroy()
    if ref_engine is not None:
        ref_engine.destroy()
    dist.barrier()


def main():
    out_path, cases = sys.argv[1], sys.argv[2:]
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (a minute of g++) at
    # init_distributed; ZeRO's gathers and reductions go through torch.distributed (gloo) either way.
    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="gloo")
    for case in cases:  # STAGE-KL-IMPL
        stage, kl, impl = case.split("-")
        run_case(int(stage), kl, impl, out_path)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
