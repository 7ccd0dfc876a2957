"""Command line: ``virtwatch run | check-config | guests-save | console-log`` and the operator
commands. :func:`main` (in :mod:`.main`) is the console script's entry point.

Exit codes: 0 success; 1 runtime failure; 2 invalid configuration or usage.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
