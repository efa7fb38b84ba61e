"""`edgeattn run --device NAME`: the same rows as on the host, run on a board or phone over TVM RPC.

Per attention config: the export (cached), the artifact compiled for the
device's first kernel target (cached, ``edgeattn compile``), uploaded and run
by the device's TVM runtime (``devices/remote.py``); dense and DHSA share one
connection.  Peak memory is the device's own (the agent's VmHWM), planned
against the profile's memory budget unless ``--memory-budget`` overrides it.
Rows from an emulated device say so: their timings are never device performance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgeattn.runtime.runner import RunResult


def run_on_device(
    req: Any, loaded: Any, ids: list[int], hf_config: Any, log: Callable[[str], None], measure: Callable[..., RunResult]
) -> list[RunResult]:
    from edgeattn.devices.connect import open_device
    from edgeattn.devices.profiles import get_profile
    from edgeattn.devices.remote import open_remote_session
    from edgeattn.runtime import memory, ort_backend
    from edgeattn.runtime.tvm_compile import compile_artifact

    profile = get_profile(req.device)
    if req.memory_budget is None and profile.memory_budget:
        req.memory_budget = profile.memory_budget
        log(f"{profile.name}: memory budget {memory.fmt(profile.memory_budget)} from its profile")
    target = profile.targets[0]
    max_context = len(ids) + req.max_new_tokens
    artifacts = []
    for cfg in req.configs:  # compile everything before connecting: a device is a shared resource
        onnx_path = ort_backend.cached_export(loaded, cfg, layers=req.layers, dense_op="edgeattn")
        log(f"{cfg.kind}: compiling for {target} (cached after the first time)")
        artifacts.append(compile_artifact(onnx_path, target, max_context=max(max_context, 64)).path)
    device = open_device(profile, tracker=req.tracker, key=req.key)
    rows = []
    try:
        for cfg, art in zip(req.configs, artifacts, strict=True):
            session = open_remote_session(profile, art, device=device)
            fp = memory.footprint_of(hf_config, backend="tvm", kernels="tvm")
            rows.append(measure(req, session, ids, hf_config, fp, cfg.chunk_size, loaded.tokenizer, log))
    finally:
        device.close()
    return rows
