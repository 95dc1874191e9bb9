"""``python -m instruction_modelling.analyze`` and old imports keep working: the command is ``instruction_modelling.commands.analyze``."""
if __name__ == "__main__":
    __import__("runpy").run_module("instruction_modelling.commands.analyze", run_name="__main__", alter_sys=True)
from instruction_modelling.commands.analyze import *  # noqa: E402,F401,F403
