"""Instruction Modelling for Axolotl.

Enable in any Axolotl YAML::

    plugins:
      - instruction_modelling.InstructionModellingPlugin
    datasets:
      - path: data.jsonl
        type: instruction_modelling
    im_mode: im            # or: it (the instruction-tuning baseline)

The pure pieces (``segments``, ``losses``, ``args``) import without Axolotl; the plugin class
imports Axolotl lazily so ``import instruction_modelling`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["InstructionModellingPlugin"]


def __getattr__(name):
    # Lazy: the pure modules (segments, losses, args) must import without Axolotl.
    if name == "InstructionModellingPlugin":
        from .plugin import InstructionModellingPlugin

        return InstructionModellingPlugin
    raise AttributeError(f"module 'instruction_modelling' has no attribute {name!r}")
