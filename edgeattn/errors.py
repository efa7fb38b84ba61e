"""Errors a user can act on.

Every error raised at a user-facing boundary says what was wrong and how to fix
it; the CLI prints the message and exits non-zero instead of a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class EdgeAttnError(Exception):
    """Base class: ``str(err)`` is the whole message shown to the user."""

    exit_code = 2


class ModelNotFoundError(EdgeAttnError):
    pass


class UnsupportedModelError(EdgeAttnError):
    pass


class CorruptModelError(EdgeAttnError):
    pass


class NotBuiltYetError(EdgeAttnError):
    """A verb whose machinery lands in a later issue; never pretends to work."""

    exit_code = 3


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors a user can act on into one 'error:' line and a non-zero exit code (every CLI verb)."""
    import typer

    from edgeattn.config import ConfigError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeAttnError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except (ConfigError, FileNotFoundError, NotImplementedError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper
