"""Device profiles: what a device is (kernel targets, memory budget) and how to reach it, as data.

Why data files: a device farm grows by boards and phones, not by code.  The
built-in profiles live in ``devices/profiles/*.json``; a user's own (or an
override of a built-in one, same name) live in ``$EDGEATTN_DEVICES_DIR``,
default ``$XDG_CONFIG_HOME/edgeattn/devices`` (``~/.config/edgeattn/devices``),
and ``edgeattn devices add`` writes them.  A profile names its kernel target
profiles from :mod:`edgeattn.kernels_tvm.targets` (the one place targets are
resolved) and never spells TVM target JSON itself.

A profile file::

    {"name": "rpi5", "description": "...", "family": "raspberry-pi",
     "targets": ["arm-a76"],               # first = the one a model is compiled for
     "memory_budget": "6GiB",              # RAM a model may use there ("auto": MemAvailable, host only)
     "connect": {"kind": "tracker", "tracker": "127.0.0.1:9190", "key": "rpi5"}}

Connection kinds: ``local`` (this machine), ``rpc`` (``host``, ``port``: a TVM
RPC server such as ``edgeattn serve``), ``tracker`` (``tracker`` HOST:PORT and
``key``: TVM's RPC tracker hands out a free server of that key), ``adb`` (an
Android phone over USB: ``mode`` forward or reverse, ``device_port``,
``local_port``, optional ``serial`` and, for reverse, ``tracker``/``key``) and
``emulated`` (the emulated aarch64 device, started on demand).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeattn.atomic import write_text
from edgeattn.config import ConfigError
from edgeattn.errors import EdgeAttnError
from edgeattn.runtime.memory import parse_size

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
ENV_USER_DIR = "EDGEATTN_DEVICES_DIR"
CONNECT_KINDS = ("local", "rpc", "tracker", "adb", "emulated")
FAMILIES = ("host", "raspberry-pi", "jetson", "android", "emulated", "board")
ADB_MODES = ("forward", "reverse")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 2
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class DeviceProfileError(EdgeAttnError):
    """A profile that is unknown, malformed or cannot be written; the message names the fix."""


# ------------------------------------------------------------------ sizes


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30 and n % 2**28 == 0:
        return f"{n / 2**30:g} GiB"
    return f"{n / 2**20:.0f} MiB"


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); DeviceProfileError naming the expected form otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceProfileError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host.strip("[]"), int(port)


# ------------------------------------------------------------------ the profile


@dataclass(frozen=True)
class Connection:
    """How to reach a device; every remote kind goes through TVM's RPC."""

    kind: str
    host: str | None = None  # rpc
    port: int | None = None  # rpc
    tracker: str | None = None  # tracker, adb reverse: "HOST:PORT"
    key: str | None = None  # tracker, adb reverse
    serial: str | None = None  # adb: `adb -s SERIAL` (None: the only device attached)
    mode: str | None = None  # adb: forward | reverse
    device_port: int | None = None  # adb: the server's port on the phone
    local_port: int | None = None  # adb forward: the port on this machine
    timeout_s: float = DEFAULT_TIMEOUT_S  # connect / queue wait before a clear error
    retries: int = DEFAULT_RETRIES  # new attempts after a refused or dropped connect

    def describe(self) -> str:
        if self.kind == "local":
            return "local"
        if self.kind == "rpc":
            return f"rpc {self.host}:{self.port}"
        if self.kind == "tracker":
            return f"tracker {self.tracker} key {self.key}"
        if self.kind == "adb":
            who = f" -s {self.serial}" if self.serial else ""
            if self.mode == "reverse":
                return f"adb{who} reverse, tracker {self.tracker} key {self.key}"
            return f"adb{who} forward tcp:{self.local_port} -> device tcp:{self.device_port}"
        return "emulated aarch64 (qemu, started on demand)"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if d.get("timeout_s") == DEFAULT_TIMEOUT_S:
            d.pop("timeout_s")
        if d.get("retries") == DEFAULT_RETRIES:
            d.pop("retries")
        return d


@dataclass(frozen=True)
class DeviceProfile:
    """One device: kernel targets (first = the model's), cross compiler, memory budget, connection."""

    name: str
    description: str
    family: str
    targets: tuple[str, ...]
    connect: Connection
    memory_budget: int | None  # bytes; None = "auto" (MemAvailable when checked; host only)
    cross_compiler: str | None = None  # None: the primary target profile's
    emulated: bool = False
    notes: str = ""
    source: Path | None = field(default=None, compare=False)

    @property
    def target(self) -> str:
        """The kernel target profile a model is compiled for on this device."""
        return self.targets[0]

    @property
    def builtin(self) -> bool:
        return self.source is not None and self.source.parent == BUILTIN_DIR

    def linker(self) -> str:
        """The cross compiler that links libraries for this device ("local cc" for the host)."""
        if self.cross_compiler:
            return self.cross_compiler
        from edgeattn.kernels_tvm.targets import get_profile

        return get_profile(self.target).cross_compiler or "local cc"

    def budget_bytes(self) -> int:
        """The memory budget in bytes ("auto": this machine's MemAvailable now)."""
        if self.memory_budget is not None:
            return self.memory_budget
        import psutil

        return int(psutil.virtual_memory().available)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "targets": list(self.targets),
            "memory_budget": "auto" if self.memory_budget is None else format_size(self.memory_budget).replace(" ", ""),
            "connect": self.connect.to_dict(),
        }
        if self.cross_compiler:
            d["cross_compiler"] = self.cross_compiler
        if self.emulated:
            d["emulated"] = True
        if self.notes:
            d["notes"] = self.notes
        return d


def profile_from_dict(data: dict[str, Any], source: Path | None = None) -> DeviceProfile:
    """Validate one profile's JSON; DeviceProfileError names the file and the field otherwise."""
    where = f"device profile {source}" if source else "device profile"

    def bad(msg: str) -> DeviceProfileError:
        return DeviceProfileError(f"{where}: {msg}")

    if not isinstance(data, dict):
        raise bad("must be a JSON object")
    unknown = set(data) - {f for f in DeviceProfile.__dataclass_fields__ if f != "source"}
    if unknown:
        raise bad(f"unknown field(s) {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad(f"name {name!r} must be lower-case letters, digits, '.', '_' or '-' (at most 64)")
    family = data.get("family", "board")
    if family not in FAMILIES:
        raise bad(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    targets = data.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise bad('targets must list kernel target profiles (edgeattn.kernels_tvm.targets), e.g. ["arm-a76"]')
    from edgeattn.kernels_tvm.targets import PROFILE_NAMES

    for t in targets:
        if t not in PROFILE_NAMES:
            raise bad(f"unknown kernel target {t!r}; known: {', '.join(PROFILE_NAMES)}")
    budget_text = data.get("memory_budget", "auto")  # parse_size: the runtime's own --memory-budget reader
    try:
        budget = None if budget_text == "auto" else parse_size(budget_text)
    except ConfigError as err:
        raise bad(f"memory_budget: {err}") from None
    conn = connection_from_dict(data.get("connect", {"kind": "local"}), bad)
    if budget is None and conn.kind != "local":
        raise bad("memory_budget 'auto' measures this machine: a remote device needs a size such as 3GiB")
    return DeviceProfile(
        name=name,
        description=str(data.get("description", "")),
        family=family,
        targets=tuple(targets),
        connect=conn,
        memory_budget=budget,
        cross_compiler=data.get("cross_compiler"),
        emulated=bool(data.get("emulated", False)),
        notes=str(data.get("notes", "")),
        source=source,
    )


def connection_from_dict(data: Any, bad: Any = DeviceProfileError) -> Connection:
    """Validate a ``connect`` object (``bad(msg)`` builds the error, prefixed with the file)."""
    if not isinstance(data, dict):
        raise bad("connect must be a JSON object with a 'kind'")
    kind = data.get("kind")
    if kind not in CONNECT_KINDS:
        raise bad(f"connect.kind {kind!r} is not one of {', '.join(CONNECT_KINDS)}")
    unknown = set(data) - set(Connection.__dataclass_fields__)
    if unknown:
        raise bad(f"unknown connect field(s) {', '.join(sorted(unknown))}")
    conn = Connection(**data)
    try:
        timeout, retries = float(conn.timeout_s), int(conn.retries)
    except (TypeError, ValueError):
        raise bad("connect.timeout_s must be a number of seconds and connect.retries an integer") from None
    if timeout <= 0 or retries < 0:
        raise bad("connect.timeout_s must be > 0 and connect.retries >= 0")
    conn = replace(conn, timeout_s=timeout, retries=retries)
    if kind == "rpc" and (not conn.host or not isinstance(conn.port, int)):
        raise bad("connect kind 'rpc' needs host and port (an integer)")
    if kind == "tracker" or (kind == "adb" and conn.mode == "reverse"):
        if not conn.tracker or not conn.key:
            raise bad(f"connect kind '{kind}' needs tracker (HOST:PORT) and key")
        parse_addr(conn.tracker, "tracker")
    if kind == "adb":
        if conn.mode not in ADB_MODES:
            raise bad(f"connect.mode {conn.mode!r} is not one of {', '.join(ADB_MODES)}")
        if not isinstance(conn.device_port, int):
            raise bad("connect kind 'adb' needs device_port (the server's port on the phone)")
        if conn.mode == "forward" and conn.local_port is None:
            conn = replace(conn, local_port=conn.device_port)
    return conn


# ------------------------------------------------------------------ where profiles live


def user_dir() -> Path:
    """``$EDGEATTN_DEVICES_DIR``, else ``$XDG_CONFIG_HOME/edgeattn/devices`` (``~/.config/...``)."""
    env = os.environ.get(ENV_USER_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "edgeattn" / "devices"


def _read(path: Path) -> DeviceProfile:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeviceProfileError(f"device profile {path} cannot be read: {err}; fix or delete the file") from None
    profile = profile_from_dict(data, source=path)
    if profile.name != path.stem:
        raise DeviceProfileError(
            f"device profile {path} says name {profile.name!r}; rename the file to {profile.name}.json"
        )
    return profile


def load_profiles() -> dict[str, DeviceProfile]:
    """Every profile by name: built-in ones, then the user's (a user file overrides a built-in name)."""
    found: dict[str, DeviceProfile] = {}
    for folder in (BUILTIN_DIR, user_dir()):
        if folder.is_dir():
            for path in sorted(folder.glob("*.json"), key=lambda p: p.stem):
                found[path.stem] = _read(path)
    return found


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; DeviceProfileError listing the known names otherwise."""
    profiles = load_profiles()
    if name not in profiles:
        raise DeviceProfileError(
            f"unknown device {name!r}; known devices: {', '.join(profiles)} "
            "(`edgeattn devices list`; add one with `edgeattn devices add`)"
        )
    return profiles[name]


def save_profile(profile: DeviceProfile, overwrite: bool = False) -> Path:
    """Write ``profile`` into the user directory (temp file + rename); refuses to replace one silently."""
    profile_from_dict(profile.to_dict())  # what is written must read back
    path = user_dir() / f"{profile.name}.json"
    if path.exists() and not overwrite:
        raise DeviceProfileError(f"a user device profile {path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
