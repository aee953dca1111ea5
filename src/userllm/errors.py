"""Errors a user can cause and fix. The CLI prints their message and exits non-zero, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, files or flags. ``str(err)`` is the whole message to print."""

    exit_code: int = 2


class InputError(UserError):
    """Input files are missing, unrecognized, or unreadable."""


class MalformedRowError(UserError):
    """A malformed row under ``--strict``; the message names ``file:line``, the field and what was expected."""


class EmptyResultError(UserError):
    """Filtering removed everything; the message names the filter and the flag to relax."""


class OutputExistsError(UserError):
    """The output exists and ``--force`` was not given."""


class ConfigError(UserError):
    """An invalid configuration value (from YAML or the command line)."""


def run_script(main: Callable[[], None]) -> None:
    """Run a script's ``main()`` as the CLI runs a command: a :class:`UserError` prints ``error: <message>`` on
    stderr and exits with its ``exit_code``, without a traceback (the benchmark and analysis scripts)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
