"""Errors a user can cause and fix. The CLI prints their message and exits non-zero, never a traceback."""

from __future__ import annotations


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
