"""A test-only Axolotl plugin for data-parallel runs on CPU.

Axolotl 0.19 sets ``device_map = {"": LOCAL_RANK}`` for every multi-process run
(``utils/config/__init__.py``), an accelerator index that does not exist on a CPU-only machine,
and copies it into the model's loading arguments before any plugin hook runs
(``ModelLoader._set_device_map_config``). This plugin clears it there, which is all a CPU run needs;
everything else is Axolotl's own multi-process path (accelerate, DDP over gloo).

Axolotl 0.21 also asks CUDA whether two ranks' devices can reach each other (``prepare_optim_env``
-> ``check_cuda_p2p_support``), which raises on a CUDA build of torch without a driver (the Python
3.12 stack's torch): on a machine without CUDA the answer is "no P2P", as Axolotl itself answers when
the check is inconclusive.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin


class CpuDdpPlugin(BasePlugin):
    def register(self, cfg):
        import torch

        if not torch.cuda.is_available():
            import axolotl.utils.trainer as axolotl_trainer

            if hasattr(axolotl_trainer, "check_cuda_p2p_ib_support"):
                axolotl_trainer.check_cuda_p2p_ib_support = lambda: False

        from axolotl.loaders.model import ModelLoader

        original = ModelLoader._set_device_map_config
        if getattr(original, "_cpu_ddp", False):
            return

        def set_device_map_config(loader):
            loader.cfg.device_map = None
            return original(loader)

        set_device_map_config._cpu_ddp = True
        ModelLoader._set_device_map_config = set_device_map_config
