"""The user's commands, one module each, all behind the ``im`` entry point (``cli``):
``diagnose``, ``analyze``, ``preview``, ``recipes``, ``sweep`` and ``data`` (the paper's datasets).

Each also runs as ``python -m instruction_modelling.<command>`` (thin modules at the package root).
Commands build on ``core`` and ``axolotl``; they never import the quickstart demo.
"""
