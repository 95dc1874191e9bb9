"""Kept for ``from instruction_modelling.quickstart.config import cpu_config, write_config``: the CPU
configs live in ``instruction_modelling.axolotl.configs``."""
from instruction_modelling.axolotl.configs import PLUGIN, cpu_config, write_config  # noqa: F401
