"""The ``im`` command: one entry point for the toolkit's tools, in Axolotl's style.

    im diagnose data.jsonl            # = python -m instruction_modelling.diagnose data.jsonl
    im preview config.yml --rows 2    # = python -m instruction_modelling.preview ...
    im --help                         # every command; `im COMMAND --help` shows its options and defaults

Each command is the ``main`` of a module that also runs as ``python -m instruction_modelling.<module>``.
Both ways are quiet by default: third-party import-time messages that say nothing to the user
(torchao's "Failed to load ... _C_mxfp8", torch ``_pytree`` deprecation warnings, bitsandbytes'
kernel messages) are dropped. ``--verbose`` (or ``IM_VERBOSE=1``) keeps them. The filters are set
up only here, at our entry points, never on ``import instruction_modelling``, so a user's own
code and Axolotl runs see every message.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from typing import Callable, Sequence

# command -> (module whose `main(argv)` runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "diagnose": ("instruction_modelling.commands.diagnose",
                 "is IM right for this data? length statistics, Table 5 ratio and a recommendation"),
    "analyze": ("instruction_modelling.commands.analyze",
                "did IM reduce overfitting? per-example losses, memorisation BLEU, gain fits"),
    "preview": ("instruction_modelling.commands.preview", "show which tokens of an Axolotl config's rows carry loss"),
    "data": ("instruction_modelling.commands.data.__main__", "prepare the paper's datasets and report their statistics"),
    "recipes": ("instruction_modelling.commands.recipes", "generate, check or render the paper's Axolotl recipes"),
    "quickstart": ("instruction_modelling.quickstart.__main__",
                   "train IT and IM on a tiny local model through axolotl.cli.train (CPU, ~1 min)"),
}

# (logger, message pattern): records the tools drop unless --verbose. Matched on the logger that
# emits them (a logger's own filters see its records even when a handler elsewhere prints them).
NOISY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("torchao", r"Failed to load .*_C_|Skipping import of cpp extensions"),
    ("torch.utils._pytree", r"is an Enum subclass"),
    ("bitsandbytes.backends.cpu.ops", r"kernels-community|Failed to load CPU"),
    ("kernels.hf_hub", r"Skipping publisher trust check"),  # Axolotl 0.21's kernels (0.19's warns instead)
    ("bitsandbytes.cextension", r"compiled without GPU support|libbitsandbytes"),
    ("axolotl.cli.config", r"^config:"),  # the whole validated config, ~200 lines, printed by load_cfg
)
# Python warnings the tools drop unless --verbose (message regex).
NOISY_WARNINGS: tuple[str, ...] = (
    r"Skipping publisher trust check",  # bitsandbytes/kernels: no hub access, so no trust check
    r".*_pytree.*register_constant",
)


_quiet = False


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        return not self.pattern.search(message)


def quiet_third_party(verbose: bool = False) -> bool:
    """Drop the third-party noise listed in ``NOISY_LOG_RECORDS`` / ``NOISY_WARNINGS``.

    Called by our entry points before they import torch, transformers or Axolotl (the messages
    come at import time). Does nothing when ``verbose`` or ``IM_VERBOSE=1``.

    Args:
        verbose: keep every message.

    Returns:
        Whether the filters were installed.
    """
    global _quiet
    if verbose or os.environ.get("IM_VERBOSE", "").lower() in ("1", "true", "yes"):
        return False
    if _quiet:  # already installed (`im X` calls it before and inside run_module_main)
        return True
    _quiet = True
    for logger_name, pattern in NOISY_LOG_RECORDS:
        logging.getLogger(logger_name).addFilter(_DropMatching(pattern))
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    return True


def run_module_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a tool's ``main`` as an entry point: ``--verbose`` anywhere in ``argv`` keeps third-party
    messages (it is removed before ``main`` parses the rest); otherwise they are filtered.

    Args:
        main: the tool's ``main(argv) -> exit code``.
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (``None`` from ``main`` counts as 0).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    quiet_third_party(verbose)
    code = main(args)
    return 0 if code is None else int(code)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: im [--verbose] COMMAND [ARGS...]",
        "",
        "Instruction Modelling tools (each also runs as `python -m instruction_modelling.<command>`).",
        "`im COMMAND --help` shows the command's options and their defaults.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help   show this message and exit",
        "  --version    print the package version and exit",
        "  --verbose    keep third-party import-time messages (torchao, torch _pytree, bitsandbytes,",
        "               Axolotl's config dump); default: filtered. IM_VERBOSE=1 does the same.",
        "",
        "Evaluation has its own command: eval-suite --help",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``im [--verbose] COMMAND [ARGS...]``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The command's exit code; 2 for an unknown command.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from instruction_modelling import __version__

        print(f"instruction-modelling {__version__}")
        return 0
    command_at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if command_at is None or args[command_at] not in COMMANDS:
        given = args[command_at] if command_at is not None else " ".join(args)
        print(f"im: unknown command '{given}'; choose one of: {', '.join(COMMANDS)} (im --help)", file=sys.stderr)
        return 2
    rest = args[:command_at] + args[command_at + 1:]
    # Filters first: importing the command's module may import torch, whose messages come at import time.
    quiet_third_party("--verbose" in rest)
    module = importlib.import_module(COMMANDS[args[command_at]][0])
    return run_module_main(module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
