"""What the subcommands share: exit codes and how a bad configuration is printed."""

from __future__ import annotations

import sys

from ..config import ConfigError

#: Exit codes: 0 success; 1 runtime failure (operator commands: the daemon unreachable);
#: 2 invalid configuration or usage (as argparse); 3 unknown guest; 4 feature unavailable.
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
EXIT_UNREACHABLE, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 1, 3, 4
EXIT_USAGE = 2


def print_problems(source: str, problems: list[str]) -> None:
    count = len(problems)
    print(f"{source}: invalid configuration ({count} problem{'s' if count != 1 else ''}):", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)


def print_config_error(err: ConfigError) -> None:
    print(f"{err.source}: invalid configuration:", file=sys.stderr)
    for line in err.errors:
        print(f"  {line}", file=sys.stderr)
