"""The method itself, in plain Python and PyTorch, with no Axolotl import (checked by
``lint-imports``; see ``docs/design.md``).

* ``segments``: which tokens are template, instruction or output (Eq. 4's mask), for every chat
  shape (system prompts, tool calls and results, reasoning, per-message training flags).
* ``losses``: the segment-weighted cross-entropy (IT, IM, fractional weights, normalisations),
  from logits or chunk by chunk from hidden states.
* ``kl``: KL to the base model (Eq. 5) and its references.
* ``options``: the ``im_*`` options (pydantic), as Axolotl reads them.
* ``stats``, ``evaluation``, ``read``: dataset statistics, per-example losses, reading rows from files.
"""
