"""A test-only Axolotl plugin for DeepSpeed runs on CPU (with ``cpu_ddp.CpuDdpPlugin``): see tests/test_deepspeed.py."""

from __future__ import annotations

import os

from axolotl.integrations.base import BasePlugin


class CpuZeroPlugin(BasePlugin):
    def register(self, cfg):
        import deepspeed.ops
        import torch
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        if not torch.cuda.is_available() and not getattr(PartialState._prepare_backend, "_cpu_zero", False):
            original = PartialState._prepare_backend

            def prepare_backend(state, cpu=False, sagemaker_dp=False, backend=None):
                if os.environ.get("LOCAL_RANK") is not None and not cpu:
                    return "gloo", DistributedType.MULTI_CPU
                return original(state, cpu, sagemaker_dp, backend)

            prepare_backend._cpu_zero = True
            PartialState._prepare_backend = prepare_backend

        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (a minute of g++) when the
        # process group starts; ZeRO's gathers and reductions go through torch.distributed either way.
        deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}

    def post_trainer_create(self, cfg, trainer):
        state = trainer.accelerator.state
        plugin = getattr(state, "deepspeed_plugin", None)
        print(f"[cpu_zero] rank {os.environ.get('RANK')} world_size {trainer.accelerator.num_processes} "
              f"distributed_type {state.distributed_type} zero_stage {getattr(plugin, 'zero_stage', None)} "
              f"deepspeed {trainer.is_deepspeed_enabled}", flush=True)
