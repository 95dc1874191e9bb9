"""A test-only Axolotl plugin for FSDP runs on CPU (gloo), on top of ``cpu_ddp.CpuDdpPlugin``.

Two things keep Axolotl's FSDP path GPU-only, neither of them about FSDP itself:

* Axolotl builds its device mesh with a hard-coded ``"cuda"`` (``utils/distributed.py``,
  ``build_parallelism_config``): on a machine without CUDA the mesh is built on ``"cpu"``.
* accelerate attaches the FSDP plugin only to GPU-like distributed states
  (``AcceleratorState.__init__``): a ``MULTI_CPU`` state (``ACCELERATE_USE_CPU=true``) with
  ``ACCELERATE_USE_FSDP=true`` (which Axolotl sets for ``fsdp_config``) is turned into the
  ``FSDP`` state it would be on GPUs, with the same plugin.

For the tests it also seeds torch before the LoRA adapters are created (Axolotl seeds only later,
so their random initialisation differs between runs otherwise) and, with ``CPU_FSDP_PROBE`` set
to a file, appends one line per rank at the start of training: ``<rank> <world size>
<distributed type> <FSDP2 units>``, what that rank believes it runs.

Everything else (wrapping, ``fully_shard`` / ``FullyShardedDataParallel``, the optimizer, the
gradient reduction, saving) is Axolotl's and accelerate's own code.
"""

from __future__ import annotations

import os

from cpu_ddp import CpuDdpPlugin


def _patch_device_mesh():
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.build_device_mesh
    if getattr(original, "_cpu_fsdp", False):
        return

    def build_device_mesh(self, device_type):
        return original(self, "cpu" if device_type == "cuda" else device_type)

    build_device_mesh._cpu_fsdp = True
    ParallelismConfig.build_device_mesh = build_device_mesh


def _patch_accelerator_state():
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = AcceleratorState.__init__
    if getattr(original, "_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin if fsdp_plugin is not None else FullyShardedDataParallelPlugin()

    init._cpu_fsdp = True
    AcceleratorState.__init__ = init


class _EngineProbe:
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        wrapped = self.trainer.model_wrapped if self.trainer.model_wrapped is not None else self.trainer.model
        units = sum(isinstance(m, FSDPModule) for m in wrapped.modules())
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.environ["CPU_FSDP_PROBE"], "a", encoding="utf-8") as f:
            f.write(f"{self.trainer.accelerator.process_index} {world} "
                    f"{self.trainer.accelerator.distributed_type.value} {units}\n")

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class CpuFsdpPlugin(CpuDdpPlugin):
    def register(self, cfg):
        super().register(cfg)
        import torch

        if not torch.cuda.is_available():
            _patch_device_mesh()
            _patch_accelerator_state()

    def pre_lora_load(self, cfg, model):
        import torch

        torch.manual_seed(cfg.seed)

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_EngineProbe(trainer)] if os.environ.get("CPU_FSDP_PROBE") else []
