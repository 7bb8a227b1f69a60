"""One-line errors for the console scripts.

``cli_main(prog)`` wraps a script's ``main``: a user error (``bytelm.errors.UserError`` and its subclasses,
such as ``bytelm.checkpoint.CorruptCheckpointError`` and ``bytelm.hf.export.ExportError``, or a missing /
unreadable path: ``FileNotFoundError``, ``IsADirectoryError``, ``NotADirectoryError``, ``PermissionError``)
prints ``PROG: error: MESSAGE`` on one line to stderr and exits with status 2, as argparse does for a bad
option. Any other exception is a bug and propagates with its traceback. ``--debug`` on the command line
(``add_debug_flag`` declares it) or ``BYTELM_DEBUG=1`` in the environment shows the traceback of user errors
too.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from bytelm.errors import OptionError, UserError

if TYPE_CHECKING:
    from bytelm.config import Config

DEBUG_ENV = "BYTELM_DEBUG"
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
EXIT_USER_ERROR = 2

R = TypeVar("R")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of any error (same as {DEBUG_ENV}=1)",
    )


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its lines joined); the type name when it has no message."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    return text or type(e).__name__


def load_config_overrides(overrides: Sequence[str]) -> Config:
    """``bytelm.config.load_config`` for a console script: a misspelt key or a bad value in the Hydra
    overrides is an ``OptionError`` (one line), not a traceback."""
    from omegaconf.errors import OmegaConfBaseException

    from bytelm.config import load_config

    try:
        return load_config(list(overrides))
    except (ValueError, OmegaConfBaseException) as e:
        raise OptionError(f"bad configuration override: {e}") from e


def cli_main(prog: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator for a console script's ``main(argv=None)``: user errors become one line and exit status 2."""

    def wrap(main: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> R:
            args = sys.argv[1:] if argv is None else list(argv)
            try:
                return main(argv)
            except USER_ERRORS as e:
                if debug_requested(args):
                    raise
                sys.stdout.flush()
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR) from None

        return run

    return wrap


__all__ = [
    "DEBUG_ENV",
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "add_debug_flag",
    "cli_main",
    "debug_requested",
    "load_config_overrides",
]
