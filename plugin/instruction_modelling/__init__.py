"""Instruction Modelling for Axolotl.

Enable in any Axolotl YAML::

    plugins:
      - instruction_modelling.InstructionModellingPlugin
    datasets:
      - path: data.jsonl
        type: instruction_modelling
    im_mode: im            # or: it (the instruction-tuning baseline)

The package is layered (``docs/design.md``; ``lint-imports`` checks it):

* ``core``: the method (segments, losses, KL, options), plain Python and PyTorch, no Axolotl.
* ``axolotl``: the adapter (plugin hooks, dataset strategy, collators, trainer).
* ``commands``: ``im diagnose | analyze | preview | recipes | data``, and ``sweep``.
* ``quickstart``: the tiny CPU demo (``im quickstart``).
* ``resources``: shipped files (the paper's chat template, the quickstart's data).

Public API: ``InstructionModellingPlugin`` (here), the ``im_*`` options
(``instruction_modelling.core.options.IMArgs``), the ``im`` command and
``python -m instruction_modelling.<command>`` (the command modules at this level forward to
``commands``). The plugin class imports Axolotl lazily, so ``import instruction_modelling`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["InstructionModellingPlugin"]


def __getattr__(name):
    # Lazy: the core must import without Axolotl.
    if name == "InstructionModellingPlugin":
        from instruction_modelling.axolotl.plugin import InstructionModellingPlugin

        return InstructionModellingPlugin
    raise AttributeError(f"module 'instruction_modelling' has no attribute {name!r}")
