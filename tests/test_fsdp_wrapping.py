"""Which FSDP2 unit owns ``lm_head``, and when the hidden-state loss steps aside (``axolotl/fsdp.py``),
on real ``fully_shard`` units (one gloo process, in a subprocess so no process group leaks into
other tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("axolotl")

SCRIPT = r"""
import os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from instruction_modelling.axolotl import fsdp

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2)

def wrapped(head_unit):
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    return model

root = wrapped(head_unit=False)
assert fsdp.owning_unit(root, root.lm_head) is root
assert fsdp.owning_unit(root, root.model.layers[0].mlp) is root.model.layers[0]
assert fsdp.head_blocker(root, root.lm_head) is None
root.reshard()
assert type(root.lm_head.weight).__name__ == "DTensor"
assert fsdp.gather(root, root.lm_head) == [root]
assert type(root.lm_head.weight).__name__ != "DTensor"  # the loss can use it as a plain tensor

split = wrapped(head_unit=True)
assert fsdp.owning_unit(split, split.lm_head) is split.lm_head
print("BLOCKER", fsdp.head_blocker(split, split.lm_head))
dist.destroy_process_group()
"""


def test_lm_head_owner_and_when_the_hidden_state_loss_steps_aside():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "BLOCKER lm_head is its own FSDP unit" in proc.stdout
