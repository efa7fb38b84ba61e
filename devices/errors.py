"""Errors of the devices package: one line each, saying which device failed and what to do."""

from __future__ import annotations

from edgeattn.errors import EdgeAttnError


class DeviceError(EdgeAttnError):
    """A device that cannot be reached or used; the message says which and how to fix it."""


class DeviceLostError(DeviceError):
    """The connection to a device dropped during a job (its server died or was stopped)."""


def why(err: BaseException) -> str:
    """The useful last line of an exception (TVM's errors carry C++ stack traces above it)."""
    import socket

    if isinstance(err, socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__
