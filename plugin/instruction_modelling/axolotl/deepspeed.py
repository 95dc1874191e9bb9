"""DeepSpeed: what the IM loss and its KL need under ZeRO-2 and ZeRO-3, and what is refused at config load.

ZeRO-2 shards optimizer state and gradients only: every rank holds the whole ``lm_head``, so the
hidden-state loss runs as on one process.

ZeRO-3 shards the parameters themselves: outside a module's forward (and the backward of what it
returned) ``lm_head.weight`` is an empty placeholder. The chunked loss therefore runs **as the
``lm_head`` module's forward** (``run_as_forward``, the redirect Liger uses for FSDP units): ZeRO-3's
hooks on that module gather the weight before it, the loss computes the weight's gradient chunk by
chunk while the weight is there, and the gradient it returns in backward is accumulated into the
parameter, where ZeRO's hook reduce-scatters it. No ``[tokens × vocab]`` tensor exists, as without
ZeRO. The KL's reference head (the policy's own head with adapters disabled, or the sharded copy's
head) is gathered once per micro-batch (``reference_head_gathered``; ``gather_reference_head`` for
the logits path, which projects it again in backward) and used through a hook-free ``nn.Linear``
holding the gathered weights, so the per-chunk projections start no collective: per-chunk gathers
also differ in number between ranks whose micro-batches differ in length, on which gloo aborted
("collective mismatch") before this module.

Only a plain ``nn.Linear`` head can run that way (a PEFT-adapted head owns its weights in child
modules, each gathered and released by its own hooks): ``im_loss_impl: chunked`` with an adapted
``lm_head`` and ``im_loss_impl: cce`` are refused at config load under ZeRO-3; ``auto`` falls back to
the full logits, with a log line, for an adapted head.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch

HEAD_NAMES = ("lm_head", "embed_out", "output")  # what a PEFT target list calls the output layer


def config_zero_stage(cfg) -> int | None:
    """The ZeRO stage of the config's ``deepspeed:`` (a JSON path or a dict), None without DeepSpeed.

    Raises:
        ValueError: the file cannot be read or has no integer ``zero_optimization.stage``.
    """
    ds = cfg.get("deepspeed")
    if not ds:
        return None
    if hasattr(ds, "to_dict"):
        ds = ds.to_dict()
    if not isinstance(ds, dict):
        path = Path(str(ds))
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"deepspeed: cannot read the DeepSpeed config {path} ({err}); give an existing JSON "
                             "file (paths are relative to the directory you run from)") from None
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if not isinstance(stage, int):
        raise ValueError(f"deepspeed: zero_optimization.stage is {stage!r}; set 0, 1, 2 or 3")
    return stage


def _adapted_head(cfg) -> str | None:
    """The PEFT option that adapts the output layer, if any (``lora_target_modules`` / ``lora_modules_to_save``)."""
    if not cfg.get("adapter"):
        return None
    for key in ("lora_target_modules", "lora_modules_to_save"):
        value = cfg.get(key) or []
        names = [value] if isinstance(value, str) else list(value)
        if any(name in HEAD_NAMES for name in names):
            return key
    return None


def check_deepspeed_config(cfg, args) -> None:
    """Refuse, at config load, what the IM loss cannot run under the config's DeepSpeed ZeRO stage.

    Args:
        cfg: the raw Axolotl config.
        args: its ``IMArgs``.

    Raises:
        ValueError: one sentence naming the option and what to do.
    """
    if config_zero_stage(cfg) != 3:
        return
    loss_impl = args.im_loss_impl
    if loss_impl == "cce":
        raise ValueError(
            "im_loss_impl: cce cannot run under DeepSpeed ZeRO-3, whose sharded lm_head only the chunked loss "
            "gathers for itself; use im_loss_impl: chunked (or auto)"
        )
    adapted = _adapted_head(cfg)
    if loss_impl == "chunked" and adapted:
        raise ValueError(
            f"im_loss_impl: chunked needs a plain lm_head under DeepSpeed ZeRO-3, but {adapted} adapts it; remove "
            f"the output layer from {adapted}, or set im_loss_impl: logits"
        )


def is_zero3_module(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3-partitioned (DeepSpeed marks each with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def zero3_blocker(head: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot run as this ZeRO-3 head's forward (None when it can)."""
    if type(head) is not torch.nn.Linear:
        return (f"under DeepSpeed ZeRO-3 the chunked loss runs as the lm_head's forward, which needs a plain "
                f"nn.Linear lm_head, not {type(head).__name__} (a PEFT-adapted head)")
    return None


def run_as_forward(module: torch.nn.Module, fn: Callable, *args):
    """``fn(*args)`` run as ``module``'s forward: the hooks registered on ``module`` run around it as
    around its own forward (ZeRO-3: gather its parameters before, release them after, gather again
    for the backward of the outputs and release once the inputs' gradients are computed)."""
    own = module.__dict__.get("forward")  # accelerate and others may set an instance forward

    def forward(*inner):
        _restore()  # fn may call the real forward
        return fn(*inner)

    def _restore():
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    module.forward = forward
    try:
        return module(*args)
    finally:
        _restore()


def _hook_free_linear(head: torch.nn.Linear, copy: bool) -> torch.nn.Linear:
    """An ``nn.Linear`` sharing (or, with ``copy``, copying) ``head``'s present weights, with no hooks:
    calling it never triggers a gather or a release."""
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else None
    if copy:
        weight = weight.clone()
        bias = bias.clone() if bias is not None else None
    shell = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    shell.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        shell.bias = torch.nn.Parameter(bias, requires_grad=False)
    return shell


def _missing_reference_params(reference) -> list:
    """The reference head's ZeRO-3 parameters not gathered now (checked to be a plain ``nn.Linear``)."""
    head = getattr(reference, "head", None)
    if head is None or not is_zero3_module(head):
        return []
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"the KL reference's output layer is a {type(head).__name__}; under DeepSpeed ZeRO-3 it must "
                         "be a plain nn.Linear (no adapter on lm_head)")
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Parameters already present (the adapter reference's head inside the policy head's forward) are
    # neither gathered again nor released here.
    return [p for p in head.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]


@contextlib.contextmanager
def reference_head_gathered(reference):
    """For the chunked loss: the KL reference's ZeRO-3 output layer gathered once for the block, used
    through a hook-free ``nn.Linear`` sharing the gathered weights (``reference``: a
    ``losses.ReferenceHidden`` or None)."""
    head = getattr(reference, "head", None)
    if head is None or not is_zero3_module(head):
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    missing = _missing_reference_params(reference)
    with GatheredParameters(missing, enabled=bool(missing)):
        reference.head = _hook_free_linear(head, copy=False)
        try:
            yield
        finally:
            reference.head = head


def gather_reference_head(reference) -> None:
    """For the logits path, which projects the reference in its backward too: the KL reference's
    ZeRO-3 output layer gathered once and kept as a hook-free copy until the micro-batch's loss is
    done (one head's memory), instead of a gather per chunk in forward and in backward."""
    head = getattr(reference, "head", None)
    if head is None or not is_zero3_module(head):
        return
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    missing = _missing_reference_params(reference)
    with GatheredParameters(missing, enabled=bool(missing)):
        reference.head = _hook_free_linear(head, copy=True)


def zero3_through_head(head: torch.nn.Module, reference=None) -> Callable:
    """``HiddenStates.through_head`` for a ZeRO-3 model: the chunked loss runs as ``head``'s forward,
    with the KL reference's head gathered inside it."""

    def through_head(fn, hidden):
        def loss_with_gathered_reference(h):
            with reference_head_gathered(reference):
                return fn(h)

        return run_as_forward(head, loss_with_gathered_reference, hidden)

    return through_head


def restore_hf_deepspeed_config(training_args) -> None:
    """Point transformers' DeepSpeed config back to the trainer's after another model was loaded.

    transformers keeps a weak reference to one ``HfDeepSpeedConfig``; Axolotl's loader makes its own
    for the KL's copy reference, which replaces the trainer's and is then collected, after which
    ``is_deepspeed_zero3_enabled()`` is False and Axolotl's final save writes the partitioned
    parameters as they are: empty tensors.
    """
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is not None:
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        set_hf_deepspeed_config(config)
