"""``python -m instruction_modelling.data`` and old imports keep working: the command is ``instruction_modelling.commands.data``."""
if __name__ == "__main__":
    __import__("runpy").run_module("instruction_modelling.commands.data", run_name="__main__", alter_sys=True)
from instruction_modelling.commands.data import *  # noqa: E402,F401,F403
