"""A compiled model artifact run on a device over TVM RPC, as a runtime :class:`Session`.

Why: ``edgeattn run --device NAME`` must run the same artifact the host runs
(``edgeattn compile``, :mod:`edgeattn.runtime.tvm_backend`) on the board or
phone, with the device's own measured peak memory.  Everything is checked on
the host *before* anything is sent: the manifest (format, TVM version), that
the artifact was built for one of the device's kernel targets, the sha256 of
the library and the weights, and that the weights fit the device's memory
budget.  Then the library is uploaded and loaded by the device's TVM runtime,
the weights are copied into device memory once, and each ``append`` runs the
Relax VM there (``set_input`` / ``invoke_stateful`` / ``get_outputs``: the RPC
form of a VM call, which cannot return a tuple across the wire).

    with open_remote_session("rpi5", artifact_dir) as sess:     # RemoteTvmSession
        sess.reset_peak(); logits = sess.append(prompt_ids); sess.peak_rss()
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeattn.runtime.artifact_format import ARTIFACT_FORMAT, ARTIFACT_VERSION, LIBRARY, MANIFEST
from edgeattn.runtime.tvm_backend import (
    LoadedArtifact,
    TvmSession,
    load_params,
    verify_files,
)

from .connect import RemoteDevice, open_device
from .errors import DeviceError
from .profiles import DeviceProfile, format_size, get_profile


def check_artifact_for(profile: DeviceProfile, folder: Path) -> dict[str, Any]:
    """The artifact's manifest, after every host-side check for ``profile``; DeviceError otherwise."""
    import tvm

    mfile = folder / MANIFEST
    try:
        man = json.loads(mfile.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeviceError(
            f"{folder} is not a readable TVM artifact ({err}); build one with "
            f"`edgeattn compile FILE.onnx --device {profile.target}`"
        ) from None
    if not isinstance(man, dict) or man.get("format") != ARTIFACT_FORMAT or man.get("version") != ARTIFACT_VERSION:
        raise DeviceError(f"{mfile} is not an edgeattn TVM artifact of version {ARTIFACT_VERSION}; compile again")
    if man.get("tvm") != tvm.__version__:
        raise DeviceError(
            f"{folder} was built by TVM {man.get('tvm')}, this host has TVM {tvm.__version__}: compile it again"
        )
    built_for = (man.get("target") or {}).get("profile")
    if built_for not in profile.targets:
        raise DeviceError(
            f"{folder} was compiled for target {built_for!r}, device {profile.name} runs "
            f"{', '.join(profile.targets)}; compile with `edgeattn compile FILE.onnx --device {profile.target}`"
        )
    verify_files(folder, man)  # sha256 of library and weights, before a byte is sent
    check_budget(profile, man)
    return man


def check_budget(profile: DeviceProfile, manifest: dict[str, Any]) -> int:
    """Planned bytes (weights + Relax's planned activations); BudgetError when the weights alone exceed the budget."""
    memory = manifest.get("memory") or {}
    weights = int(memory.get("weights_bytes", 0))
    planned = weights + int(memory.get("planned_activation_bytes", 0))
    budget = profile.budget_bytes()
    if weights > budget:
        from edgeattn.runtime.memory import BudgetError

        raise BudgetError(
            f"device {profile.name}'s memory budget {format_size(budget)} is below the {format_size(weights)} "
            f"the weights alone need; use a device with more memory, a smaller model, or raise the budget "
            f"(`edgeattn devices add NAME --like {profile.name} --memory-budget SIZE`)"
        )
    return planned


class RemoteTvmSession(TvmSession):
    """:class:`edgeattn.runtime.session.Session` over an artifact loaded on a remote device.

    The runtime's TvmSession (same feeds, same KV-cache handling) with the
    library, the weights and the KV cache in device memory, the VM called in
    its RPC form, and every call guarded: a dropped server is one DeviceLostError.
    """

    def __init__(
        self, device: RemoteDevice, profile: DeviceProfile, folder: Path, manifest: dict[str, Any], owns_device: bool
    ):
        from tvm import relax

        self.remote = device
        self.owns_device = owns_device  # close() ends the connection only if this session opened it
        self.profile = profile
        self.emulated = profile.emulated or device.emulated  # its timings are never device performance
        self.planned_bytes = check_budget(profile, manifest)
        sess = device.session
        family = manifest["target"]["family"]
        name = f"edgeattn-{manifest['key'][:16]}.so"
        with device.guard("uploading the model library"):
            sess.upload(str(folder / LIBRARY), target=name)
            lib = sess.load_module(name)
            dev = sess.cpu(0) if family == "cpu" else sess.device(family, 0)
            if not dev.exist:
                raise DeviceError(f"device {profile.name} has no {family} device for {folder}")
            vm = relax.VirtualMachine(lib, dev)
        with device.guard("copying the weights"):
            params = load_params(folder, manifest, dev)
            art = LoadedArtifact(path=folder, manifest=manifest, vm=vm, params=params, device=dev)
            super().__init__(art, device_name=profile.name + (" (emulated)" if self.emulated else ""))

    def reset(self) -> None:
        with self.remote.guard("resetting the KV cache"):
            super().reset()

    def append(self, ids: Sequence[int]) -> np.ndarray:
        with self.remote.guard(f"running {len(ids)} token(s)"):
            return super().append(ids)

    def _call_main(self, feed: list[Any]) -> Sequence[Any]:
        vm = self.art.vm  # a VM call cannot return a tuple across RPC: set inputs, invoke, fetch outputs
        vm.set_input("main", *feed, *self.art.params)
        vm.invoke_stateful("main")
        return vm.get_outputs("main")

    def reset_peak(self) -> dict[str, Any] | None:
        """Start a peak-memory measurement on the device (None: a plain TVM server without probes)."""
        return self.remote.reset_peak()

    def peak_rss(self) -> int | None:
        """The device process's peak resident bytes since :meth:`reset_peak` (VmHWM); None without probes."""
        probe = self.remote.probe()
        return None if probe is None else probe.get("peak_rss")

    def resident_bytes(self) -> int | None:
        """The device process's resident bytes now (for a memory plan made after the warm-up)."""
        probe = self.remote.probe()
        return None if probe is None else probe.get("rss")

    def peak_meter(self) -> DevicePeak:
        """``with sess.peak_meter() as mem: ...`` -> ``mem.start``, ``mem.peak``, ``mem.extra`` in bytes,
        measured on the device (VmHWM reset at entry), like the runtime's host ``PeakRSS``."""
        return DevicePeak(self)

    def close(self) -> None:
        super().close()
        self.art.params.clear()
        if self.owns_device:
            self.remote.close()

    def __enter__(self) -> RemoteTvmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DevicePeak:
    """Peak resident memory of a run on the device: the agent's VmHWM, reset when the block starts.

    Same attributes as :class:`edgeattn.runtime.measure.PeakRSS` (``start``, ``peak``,
    ``extra``), so the runner can measure a device run the way it measures the host;
    all zero for a plain TVM server without the agent's probes (``available`` False).
    """

    def __init__(self, session: RemoteTvmSession) -> None:
        self.session = session
        self.start = self.peak = 0
        self.available = False

    def __enter__(self) -> DevicePeak:
        probe = self.session.reset_peak()
        self.available = probe is not None and bool(probe.get("peak_reset"))
        if self.available:
            self.start = self.peak = int(probe["rss"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available and exc[0] is None:
            self.peak = int(self.session.peak_rss() or self.peak)

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.start)


def open_remote_session(
    profile: DeviceProfile | str,
    artifact_dir: str | Path,
    *,
    tracker: str | None = None,
    key: str | None = None,
    timeout: float | None = None,
    session_timeout: float = 0,
    device: RemoteDevice | None = None,
) -> RemoteTvmSession:
    """Check ``artifact_dir`` for the device, connect (or use ``device``), upload and load it there.

    Returns a RemoteTvmSession: a runtime Session (``append``/``reset``/``close``,
    ``info.device`` ending in "(emulated)" for the emulator) plus ``reset_peak()``,
    ``peak_rss()``, ``planned_bytes`` and ``emulated``.

    ``tracker``/``key`` override the profile's connection (``run --tracker``).  Pass
    ``device`` (from :func:`~edgeattn.devices.connect.open_device`) to run several
    artifacts (dense and DHSA) over one connection; the session then leaves it open.
    Every check that can fail on the host runs before connecting.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    folder = Path(artifact_dir)
    manifest = check_artifact_for(prof, folder)
    remote = device or open_device(prof, tracker=tracker, key=key, timeout=timeout, session_timeout=session_timeout)
    try:
        return RemoteTvmSession(remote, prof, folder, manifest, owns_device=device is None)
    except BaseException:
        if device is None:
            remote.close()
        raise


def session_for_export(
    profile: DeviceProfile | str,
    onnx_path: str | Path,
    *,
    max_context: int,
    progress: Any = None,
    **connect: Any,
) -> RemoteTvmSession:
    """``edgeattn run --device``'s first steps: compile the export for the device's model target (or take
    the cached artifact: ``edgeattn compile`` keys its folder by file hash, target and context), then
    :func:`open_remote_session` it (``connect``: tracker, key, timeout, session_timeout, device)."""
    from edgeattn.runtime.tvm_compile import compile_artifact

    prof = get_profile(profile) if isinstance(profile, str) else profile
    artifact = compile_artifact(onnx_path, prof.target, max_context=max_context, progress=progress)
    return open_remote_session(prof, artifact.path, **connect)
