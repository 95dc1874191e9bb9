"""A test-only Axolotl plugin: records how many positions every lm_head call sees.

List it in ``plugins:`` with ``tests/probes`` on ``PYTHONPATH`` and set ``LM_HEAD_PROBE`` to a file;
each call appends ``<positions> <training>`` as one line. Lets a CLI test assert that the full
``[N, V]`` logits are never built.
"""

from __future__ import annotations

import math
import os

from axolotl.integrations.base import BasePlugin


class LmHeadProbePlugin(BasePlugin):
    def post_model_load(self, cfg, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        path = os.environ["LM_HEAD_PROBE"]

        def record(module, args, output):
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{math.prod(output.shape[:-1])} {int(module.training)}\n")

        head.register_forward_hook(record)
