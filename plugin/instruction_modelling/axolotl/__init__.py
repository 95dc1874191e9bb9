"""The Axolotl adapter: the plugin's hooks (``plugin``), the ``type: instruction_modelling``
dataset strategy (``strategy``, ``raw_rows``), the collators that carry ``segment_ids``
(``collator``), the trainer that computes the loss from ``core`` (``trainer``), and CPU configs
for tiny runs (``configs``). Thin by design: the method lives in ``instruction_modelling.core``.

Importing this package does not import Axolotl; its modules do.
"""
