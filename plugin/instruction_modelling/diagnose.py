"""``python -m instruction_modelling.diagnose`` and old imports keep working: the command is ``instruction_modelling.commands.diagnose``."""
if __name__ == "__main__":
    __import__("runpy").run_module("instruction_modelling.commands.diagnose", run_name="__main__", alter_sys=True)
from instruction_modelling.commands.diagnose import *  # noqa: E402,F401,F403
