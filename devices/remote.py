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

from .connect import RemoteDevice, open_device
from .errors import DeviceError
from .profiles import DeviceProfile, format_size, get_profile


def check_artifact_for(profile: DeviceProfile, folder: Path) -> dict[str, Any]:
    """The artifact's manifest, after every host-side check for ``profile``; DeviceError otherwise."""
    import tvm

    from edgeattn.runtime.tvm_backend import ARTIFACT_FORMAT, ARTIFACT_VERSION, MANIFEST, verify_files

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


class RemoteTvmSession:
    """:class:`edgeattn.runtime.session.Session` over an artifact loaded on a remote device."""

    def __init__(self, device: RemoteDevice, profile: DeviceProfile, folder: Path, manifest: dict[str, Any]) -> None:
        from tvm import relax

        from edgeattn.runtime.session import SessionInfo
        from edgeattn.runtime.tvm_backend import LIBRARY, load_params

        self.remote = device
        self.profile = profile
        self.manifest = manifest
        self.emulated = profile.emulated or device.emulated  # its timings are never device performance
        self.planned_bytes = check_budget(profile, manifest)
        att = (manifest["export"].get("attention") or {}).get("kind", "dense")
        label = profile.name + (" (emulated)" if self.emulated else "")
        self.info = SessionInfo(backend="tvm", attention=str(att), kernels="tvm", device=label)
        model = manifest["export"]["model"]
        self.layers = int(model["layers"])
        self.max_context = int(manifest["max_context"])
        self._kv_shape = (1, int(model["kv_heads"]), 0, int(model["head_dim"]))
        sess = device.session
        family = manifest["target"]["family"]
        name = f"edgeattn-{manifest['key'][:16]}.so"
        with device.guard("uploading the model library"):
            sess.upload(str(folder / LIBRARY), target=name)
            lib = sess.load_module(name)
            self.dev = sess.cpu(0) if family == "cpu" else sess.device(family, 0)
            if not self.dev.exist:
                raise DeviceError(f"device {profile.name} has no {family} device for {folder}")
            self.vm = relax.VirtualMachine(lib, self.dev)
        with device.guard("copying the weights"):
            self.params = load_params(folder, manifest, self.dev)
        self.reset()

    def reset(self) -> None:
        import tvm

        empty = np.zeros(self._kv_shape, np.float32)
        with self.remote.guard("resetting the KV cache"):
            self._past = [tvm.runtime.tensor(empty, self.dev) for _ in range(2 * self.layers)]
        self._cached = 0

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def append(self, ids: Sequence[int]) -> np.ndarray:
        import tvm

        n = len(ids)
        if n == 0:
            raise ValueError("append() needs at least one token")
        total = self._cached + n
        if total > self.max_context:
            raise DeviceError(
                f"{total} tokens exceed the artifact's max context {self.max_context}; "
                f"compile with --max-context {total} or more"
            )
        with self.remote.guard(f"running {n} token(s)"):
            feed = [
                tvm.runtime.tensor(np.asarray(ids, np.int64)[None], self.dev),
                tvm.runtime.tensor(np.ones((1, total), np.int64), self.dev),
                tvm.runtime.tensor(np.arange(self._cached, total, dtype=np.int64)[None], self.dev),
                *self._past,
            ]
            self.vm.set_input("main", *feed, *self.params)
            self.vm.invoke_stateful("main")
            out = self.vm.get_outputs("main")
            logits = out[0].numpy()
        self._past = list(out[1 : 1 + 2 * self.layers])
        self._cached = total
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float32)

    def reset_peak(self) -> dict[str, Any] | None:
        """Start a peak-memory measurement on the device (None: a plain TVM server without probes)."""
        return self.remote.reset_peak()

    def peak_rss(self) -> int | None:
        """The device process's peak resident bytes since :meth:`reset_peak` (VmHWM), None without probes."""
        probe = self.remote.probe()
        return None if probe is None else probe.get("peak_rss")

    def close(self) -> None:
        self._past, self.params = [], []
        self.vm = None
        self.remote.close()

    def __enter__(self) -> RemoteTvmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    ``tracker``/``key`` override the profile's connection (``run --tracker``).
    Every check that can fail on the host runs before connecting.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    folder = Path(artifact_dir)
    manifest = check_artifact_for(prof, folder)
    remote = device or open_device(prof, tracker=tracker, key=key, timeout=timeout, session_timeout=session_timeout)
    try:
        return RemoteTvmSession(remote, prof, folder, manifest)
    except BaseException:
        remote.close()
        raise
