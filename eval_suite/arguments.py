"""Argument types for the command line: a bad number fails before any work, in one line.

(Before: ``--limit 0`` ran the full benchmark, ``--limit -1`` dropped the last problem,
``--temperatures -1`` sampled greedily and ``--timeout 0.05`` scored every program as a timeout.)
"""

from __future__ import annotations

import argparse
import math


def at_least(kind, minimum, why: str = ""):
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"{text} should be at least {minimum:g}{why}")
        return value
    parse.__name__ = f"{kind.__name__} >= {minimum:g}"
    return parse


def positive(kind):
    """An argparse type: a finite number above zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text} should be above 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


COUNT = positive(int)  # --limit, --n, --workers, --k
TEMPERATURE = at_least(float, 0.0, " (0 is greedy decoding)")
# The sandbox starts an interpreter and the problem's test harness within this time: below a
# second, correct programs time out on a loaded machine and the score is silently 0.
PROGRAM_TIMEOUT = at_least(float, 1.0, " second: a program's interpreter must start within it")
