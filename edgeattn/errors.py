"""Errors a user can act on.

Every error raised at a user-facing boundary says what was wrong and how to fix
it; the CLI prints the message and exits non-zero instead of a traceback.
"""

from __future__ import annotations


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
