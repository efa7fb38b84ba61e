"""TVM's RPC tracker, from the client side with deadlines, and a local one for tests and emulation.

Why: a device farm is many boards and phones behind one tracker, jobs queued
per device key -- that is TVM's tracker (``python -m tvm.exec.rpc_tracker``),
used as is.  What TVM's client lacks is a deadline: its ``TrackerSession``
retries a dead tracker for 60 s and queues a request for a key nobody serves
forever.  These helpers speak the same protocol (``tvm.rpc.base``) over a
socket with a timeout, so each of those cases is one clear error.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import DeviceError
from .errors import why as _why
from .profiles import parse_addr

TRACKER_HINT = "start one with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`"


# TVM's tracker wire format (tvm/rpc/base.py): int32 magic, then int32-length-prefixed JSON messages.
# Spelled out here so `edgeattn devices list` answers without importing TVM (seconds); a test checks
# these against tvm.rpc.base.
TRACKER_MAGIC = 0x2F271
SUCCESS, REQUEST, SUMMARY = 0, 4, 6  # TrackerCode values


def _recvall(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            raise ConnectionResetError(104, "the tracker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _tracker_call(addr: tuple[str, int], message: list[Any], timeout: float) -> Any:
    """One request/answer with TVM's tracker over a fresh socket that gives up after ``timeout``."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        if struct.unpack("<i", _recvall(sock, 4))[0] != TRACKER_MAGIC:
            raise DeviceError(f"{addr[0]}:{addr[1]} answered but is not a TVM RPC tracker")
        data = json.dumps(message).encode()
        sock.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", _recvall(sock, 4))[0]
        return json.loads(_recvall(sock, size).decode())


def tracker_summary(tracker: str, timeout: float = 5.0) -> dict[str, Any]:
    """TVM's tracker summary: ``{"queue_info": {key: {free, pending}}, "server_info": [...]}``."""
    addr = parse_addr(tracker, "tracker")
    try:
        answer = _tracker_call(addr, [SUMMARY], timeout)
    except (OSError, EOFError) as err:
        raise DeviceError(f"the RPC tracker at {tracker} does not answer ({_why(err)}); {TRACKER_HINT}") from None
    if not isinstance(answer, list) or answer[0] != SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker} sent an unexpected answer {answer!r}")
    return answer[1]


def servers_for_key(summary: dict[str, Any], key: str) -> list[tuple[str, int]]:
    """Addresses of the servers registered under ``key`` in a tracker summary."""
    found = []
    for item in summary.get("server_info", []):
        if item.get("key", "").split(":", 1)[-1] == key:
            host, port = item.get("addr", [None, None])
            found.append((str(host), int(port)))
    return found


def _keys_text(summary: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for item in summary.get("server_info", []):
        k = item.get("key", "").split(":", 1)[-1]
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items())) or "none"


def request_server(tracker: str, key: str, timeout: float) -> tuple[str, int, str]:
    """Ask the tracker for a free server of ``key``: (host, port, match key), waiting at most ``timeout``.

    A key no server is registered under fails at once (the tracker would queue
    the request forever); a key whose servers are all busy waits in TVM's queue
    until one is free or the deadline passes.
    """
    summary = tracker_summary(tracker, timeout)
    if not servers_for_key(summary, key):
        raise DeviceError(
            f"no server is registered under key {key!r} at the tracker {tracker} (keys there: {_keys_text(summary)}); "
            f"start one on the device: `edgeattn serve --tracker {tracker} --key {key}`"
        )
    addr = parse_addr(tracker, "tracker")
    try:
        answer = _tracker_call(addr, [REQUEST, key, "", 1], timeout)
    except TimeoutError:
        raise DeviceError(
            f"every server under key {key!r} at the tracker {tracker} stayed busy for {timeout:g} s; "
            "retry later or raise the timeout"
        ) from None
    except (OSError, EOFError) as err:
        raise DeviceError(f"the RPC tracker at {tracker} dropped the request ({_why(err)}); {TRACKER_HINT}") from None
    if not isinstance(answer, list) or answer[0] != SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker} refused the request for key {key!r}: {answer!r}")
    host, port, matchkey = answer[1]
    return str(host), int(port), str(matchkey)


class LocalTracker:
    """TVM's own tracker (``python -m tvm.exec.rpc_tracker``) in a child process on this machine.

    For tests and for ``devices emulate``: it binds to ``host`` (loopback by
    default), and ``start`` returns once it answers a summary request.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LocalTracker:
        if self.port is None:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = int(s.getsockname()[1])
        cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", self.host, "--port", str(self.port)]
        cmd += ["--port-end", str(self.port + 1), "--silent"]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=Path.cwd()
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")
                self._proc = None
                raise DeviceError(f"TVM's RPC tracker did not start on {self.address}: {err.strip()[-500:]}")
            try:
                tracker_summary(self.address, timeout=2.0)
                return self
            except DeviceError:
                time.sleep(0.3)
        self.stop()
        raise DeviceError(f"TVM's RPC tracker on {self.address} did not answer within {self.start_timeout:g} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> LocalTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
