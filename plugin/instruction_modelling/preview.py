"""``python -m instruction_modelling.preview`` and old imports keep working: the command is ``instruction_modelling.commands.preview``."""
if __name__ == "__main__":
    __import__("runpy").run_module("instruction_modelling.commands.preview", run_name="__main__", alter_sys=True)
from instruction_modelling.commands.preview import *  # noqa: E402,F401,F403
