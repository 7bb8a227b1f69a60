"""Errors in what the user asked for, as opposed to bugs.

A ``UserError`` (a missing or corrupt checkpoint, a bad option value) carries a message that says what is
wrong and names the path or value. The console scripts (``bytelm.cli.errors.cli_main``) print that message
alone on one line and exit with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command's input; its message is shown to the user on its own, without a traceback."""


class OptionError(UserError, ValueError):
    """A bad option value (also a ``ValueError``, for callers that catch that)."""


class ModelLoadError(UserError, RuntimeError):
    """A model file or folder that exists but cannot be loaded (not a model, corrupt, incomplete); the message
    names the path."""


__all__ = ["ModelLoadError", "OptionError", "UserError"]
