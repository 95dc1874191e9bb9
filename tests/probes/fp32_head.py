"""A test-only Axolotl plugin: the output layer in fp32 on a bf16 model, as QLoRA's
``prepare_model_for_kbit_training`` leaves it (it upcasts every non-quantised parameter; the decoder's
bf16 final norm then hands bf16 hidden states to an fp32 ``lm_head``, like Gemma-style norms).
It also sets HF's ``use_cpu``, which ``bf16: true`` needs on a CPU and Axolotl has no key for. List it
in ``plugins:`` with ``tests/probes`` on the path."""

from __future__ import annotations

import torch
from axolotl.integrations.base import BasePlugin


class Fp32HeadPlugin(BasePlugin):
    def get_training_args(self, cfg):
        return {"use_cpu": True}  # HF refuses bf16 without a GPU unless told it is a CPU run

    def post_model_load(self, cfg, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.get_output_embeddings().to(torch.float32)
