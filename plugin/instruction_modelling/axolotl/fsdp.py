"""IM's loss and KL under FSDP (``fsdp_version: 2``, and FSDP1 where it can be made to work).

The hidden-state loss (``im_loss_impl: chunked`` / ``cce``) applies the model's ``lm_head`` to the
final hidden states itself, after the model's forward. Under FSDP the head's weight is a shard
except while the FSDP unit that owns it is gathered, so:

* The unit owning ``lm_head`` (the root unit under Axolotl's wrapping: decoder layers and root)
  is gathered (``unshard()``) before the loss. FSDP keeps the root gathered from its forward to
  its post-backward anyway, so this costs nothing there; the head's gradient, computed in the
  loss's forward, lands on the gathered parameter and FSDP's post-backward reduce-scatters it.
* A head wrapped as its own unit (a size-based wrap policy of a large-vocabulary model, or a
  transformer_layer_cls_to_wrap that names the head's class) is not supported: computing with it
  outside its forward crashed in the backward pass (CPU/gloo). ``auto`` falls back to the full
  logits with a log line; an explicit ``chunked`` / ``cce`` is refused at config load when the
  wrap policy allows it.
* FSDP1 (``FullyShardedDataParallel``) keeps its parameters in flat parameters and exposes the
  module's weights as views only while gathered, and its unit hooks run only through the wrapped
  module's forward: the hidden-state loss and the KL are refused for it at config load (FSDP2 is
  Axolotl's recommended FSDP).

The KL's reference forward runs the decoder (not the whole model) so that it never builds logits;
under FSDP2 the root unit (embeddings, final norm, head) is gathered first. A ``copy`` reference is
loaded again and sharded like the policy (each wrapped layer its own unit, then the root), so no
rank holds a full replica; its root unit is gathered once per micro-batch and released after the
loss.
"""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger("axolotl.integrations.instruction_modelling")

# Module class names that, listed in transformer_layer_cls_to_wrap, would make lm_head its own unit.
_HEAD_CLASSES = ("Linear", "Embedding")


def fsdp_version(cfg) -> int | None:
    """The FSDP version a raw Axolotl config asks for (None without FSDP), as Axolotl resolves it:
    top-level ``fsdp_version``, else ``fsdp_config.fsdp_version`` / ``version``, else 1."""
    fsdp_config = cfg.get("fsdp_config") or {}
    if not fsdp_config and not cfg.get("fsdp"):
        return None
    version = cfg.get("fsdp_version") or fsdp_config.get("fsdp_version") or fsdp_config.get("version") or 1
    return int(version)


def _fsdp_option(cfg, key: str):
    fsdp_config = cfg.get("fsdp_config") or {}
    return fsdp_config.get(key, fsdp_config.get(f"fsdp_{key}"))


def check_fsdp_options(cfg) -> None:
    """Refuse, at config load and in one sentence, what IM cannot do under this FSDP config.

    Args:
        cfg: the raw Axolotl config (dict-like, before validation).

    Raises:
        ValueError: naming the option and what to do.
    """
    version = fsdp_version(cfg)
    if version is None:
        return
    from instruction_modelling.core.options import MEMORY_EFFICIENT_CE_OPTIONS

    impl = cfg.get("im_loss_impl") or "auto"
    kl = (cfg.get("im_kl_coef") or 0) > 0
    # What asks for the hidden-state path: an explicit impl, or a kernel option IM takes over.
    wants_hidden = f"im_loss_impl: {impl}" if impl in ("chunked", "cce") else next(
        (f"{k}: true" for k in MEMORY_EFFICIENT_CE_OPTIONS if cfg.get(k)), None)
    if version == 1:
        if wants_hidden:
            raise ValueError(
                f"{wants_hidden} needs the loss from hidden states, which IM supports under FSDP2 only "
                "(FSDP1 exposes the lm_head weight only inside its own forward); set fsdp_version: 2, or "
                f"{'im_loss_impl: auto' if impl != 'auto' else 'remove it'} (full logits under FSDP1)"
            )
        if kl:
            raise ValueError(
                "im_kl_coef > 0 runs a reference forward outside the wrapped model's forward, which IM supports "
                "under FSDP2 only; set fsdp_version: 2, or use DeepSpeed or data parallelism"
            )
        return
    if wants_hidden:
        policy = str(_fsdp_option(cfg, "auto_wrap_policy") or "")
        layers = [c.strip() for c in str(_fsdp_option(cfg, "transformer_layer_cls_to_wrap") or "").split(",")]
        head_own_unit = policy == "SIZE_BASED_WRAP" or any(c in _HEAD_CLASSES for c in layers)
        if head_own_unit:
            raise ValueError(
                f"{wants_hidden} needs lm_head inside the root FSDP unit, but this fsdp_config "
                f"({'auto_wrap_policy: SIZE_BASED_WRAP' if policy == 'SIZE_BASED_WRAP' else 'transformer_layer_cls_to_wrap: ' + _fsdp_option(cfg, 'transformer_layer_cls_to_wrap')}) "
                "may wrap it on its own; wrap the decoder layers with TRANSFORMER_BASED_WRAP, or "
                f"{'set im_loss_impl: auto' if impl != 'auto' else 'remove it'} (full logits when the head is its own unit)"
            )


def is_fsdp2_unit(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def owning_unit(root: torch.nn.Module, module: torch.nn.Module) -> torch.nn.Module | None:
    """The innermost FSDP2 unit whose parameters include ``module``'s (``module`` itself when it
    is wrapped on its own), or None when no unit contains it."""
    names = {id(m): name for name, m in root.named_modules()}
    target = names.get(id(module))
    if target is None:
        return None
    owner = None
    for name, m in root.named_modules():
        if is_fsdp2_unit(m) and (name == "" or target == name or target.startswith(name + ".")):
            if owner is None or len(name) >= len(owner[0]):
                owner = (name, m)
    return owner[1] if owner is not None else None


def head_blocker(root: torch.nn.Module, head: torch.nn.Module) -> str | None:
    """Why the hidden-state loss cannot use ``head`` under this FSDP2 wrapping (None when it can)."""
    if is_fsdp2_unit(head):
        return ("lm_head is its own FSDP unit (its wrap policy wrapped it separately), which the hidden-state loss "
                "does not support; wrap only the decoder layers (TRANSFORMER_BASED_WRAP) to save the logits' memory")
    if owning_unit(root, head) is None:
        return "no FSDP2 unit owns lm_head"
    return None


def gather(root: torch.nn.Module, *modules: torch.nn.Module) -> list[torch.nn.Module]:
    """``unshard()`` the FSDP2 units owning ``modules`` (a no-op for a unit already gathered, as
    the root is between its forward and its post-backward); returns the units."""
    units = []
    for module in modules:
        unit = owning_unit(root, module)
        if unit is not None and all(unit is not u for u in units):
            unit.unshard()
            units.append(unit)
    return units


def gather_reference(trainer, model: torch.nn.Module, scores):
    """Gather what the KL's reference forward needs under FSDP2 for one micro-batch; returns the
    function that releases it after the loss (None when nothing needs releasing).

    The adapter reference is the policy: its root unit is gathered from its forward to its
    post-backward, so gathering is a no-op there. A copy's root unit takes no backward pass, so
    nothing else would reshard it: released after the loss, or, on the logits path (whose backward
    pass recomputes the reference's logits chunk by chunk), once the logits' gradient is computed.
    """
    if not trainer.accelerator.is_fsdp2:
        return None
    if trainer.kl_reference.mode == "adapter":
        _, _, decoder, _ = trainer._parts(model)
        gather(model, decoder)
        return None
    reference = trainer.kl_reference.model
    units = gather(reference, reference)

    def release(*_):
        for unit in units:
            unit.reshard()

    if isinstance(scores, torch.Tensor) and scores.requires_grad:
        scores.register_hook(release)
        return None
    return release


def shard_like_policy(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen reference model as accelerate shards the policy under FSDP2: each module its
    auto-wrap policy selects (the decoder layers) becomes a unit, then the root, all on the
    policy's mesh with its mixed-precision and offload policies. Peak memory per rank is then one
    layer gathered at a time plus 1/world of the rest, not a full replica (TRL's
    ``prepare_fsdp`` makes the whole model one unit)."""
    from accelerate.utils import get_module_children_bottom_up
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    mesh = getattr(accelerator.state, "device_mesh", None)
    if mesh is not None and getattr(accelerator.state, "parallelism_config", None) is not None:
        mesh = mesh[tuple(accelerator.state.parallelism_config.fsdp_dim_names)]
    kwargs = dict(reshard_after_forward=True, offload_policy=plugin.cpu_offload,
                  mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(), mesh=mesh)
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module):
                fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    model.eval()
    return model
