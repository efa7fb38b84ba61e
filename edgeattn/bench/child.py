"""One benchmark row in a fresh process: `python -m edgeattn.bench.child JOB_JSON`.

Each (row, length) runs in its own process so that its peak RSS -- the whole
process's high-water mark (VmHWM), what an edge device must actually hold -- is that row's
alone and no row inherits another's allocator state or warm caches.  The parent
(``edgeattn.bench.sweep``) reads the one line that starts with :data:`MARK`.

edgeattn's rows and the transformers / ONNX Runtime peers go through
``edgeattn.runtime.host.run_on_host``, the `edgeattn run` machinery (warm-up,
timed prefill, timed greedy decode, sampled peak RSS); llama.cpp goes through
``edgeattn.bench.peers``, which follows the same protocol.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

MARK = "EDGEATTN-BENCH-RESULT "


def peak_rss_mib() -> float:
    """This process's peak resident set so far: VmHWM, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries it across exec from the address space the child was spawned
    from (the parent's, under vfork/posix_spawn), so a small child (llama.cpp) would report the
    parent's peak.  VmHWM starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _request(job: dict[str, Any], kernels: str) -> Any:
    """The `edgeattn run` request that measures ``job``'s row (and nothing else)."""
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.host import RunRequest

    backend, attention, row = job["backend"], job["attention"], job["row"]
    cfg = AttentionConfig(kind=attention, budget=job["budget"], chunk_size=job["chunk_size"])  # type: ignore[arg-type]
    req = RunRequest(
        configs=[cfg],
        model=job["model"],
        synthetic_length=job["prompt_tokens"],
        layers=job["layers"],
        max_new_tokens=job["new_tokens"],
        threads=job["threads"],
        backends=[backend],
        kernels=kernels,
        shipped_baseline=False,
        device=job["device"],
    )
    if row == "transformers":
        req.configs, req.backends, req.shipped_baseline = [], [], True
    elif row == "ort-onnx":  # ONNX Runtime alone: plain ONNX attention, function bodies, no kernel of ours
        req.backends, req.kernels, req.ort_dense_op = ["ort"], "reference", "onnx"
    elif row == "ort-gqa":  # ONNX Runtime's GroupQueryAttention in every layer
        req.backends, req.ort_dense_op = ["ort"], "gqa"
    return req


def _export_for(job: dict[str, Any], loaded: Any, kernels: str) -> Path | None:
    """The ONNX file an ort/tvm row runs (exported into the cache once, by ``prepare``)."""
    from edgeattn.runtime import ort_backend

    req = _request(job, kernels)
    if req.backends not in (["ort"], ["tvm"]):
        return None
    dense_op = req.ort_dense_op or ("edgeattn" if req.kernels == "tvm" and req.backends == ["ort"] else "onnx")
    return ort_backend.cached_export(loaded, req.configs[0], layers=req.layers, dense_op=dense_op)


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    """Export (and for tvm rows compile) what a row needs, in a process of its own, so the measured
    process's peak RSS does not carry the export's."""
    from edgeattn import models
    from edgeattn.runtime.host import kernels_available

    loaded = models.load(job["model"])
    path = _export_for(job, loaded, kernels_available())
    if path is not None and job["backend"] == "tvm" and job["device"] == "host":
        from edgeattn.runtime import tvm_backend

        tvm_backend.open_session(path, threads=job["threads"]).close()
    return {"prepared": str(path) if path else None}


def _arm(timer: Any) -> None:
    if timer is not None:
        timer.armed = True


def run_edgeattn(job: dict[str, Any]) -> dict[str, Any]:
    """edgeattn's rows and the transformers / ONNX Runtime peers: ``repeats`` runs of `edgeattn run`."""
    from edgeattn import models
    from edgeattn.bench.stages import StageTimer
    from edgeattn.runtime.host import kernels_available, run_on_host
    from edgeattn.runtime.threads import set_threads

    set_threads(job["threads"])
    loaded = models.load(job["model"])
    kernels = kernels_available()
    results = []
    torch_rows = job["backend"] in ("torch", "transformers") and job["device"] == "host"
    timer = StageTimer(loaded.model, job["prompt_tokens"]) if torch_rows else None
    if timer is not None:
        timer.__enter__()
    try:
        for _ in range(job["repeats"]):
            if timer is not None:
                timer.armed = False
            # run_on_host logs first when it plans the row's memory, right after the warm-up: arm the timer then
            _, rows = run_on_host(_request(job, kernels), log=lambda _msg: _arm(timer), loaded=loaded)
            results.append(rows[0])
    finally:
        if timer is not None:
            timer.__exit__(None, None, None)
    first = results[0]
    prefill_s = [r.prefill_s for r in results]
    record: dict[str, Any] = {
        "kernels": first.kernels if job["row"] not in ("ort-onnx", "ort-gqa") else job["kernels"],
        "weights": str(loaded.model.dtype).replace("torch.float", "fp"),
        "prompt_tokens": first.prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_cpu_s": [r.prefill_cpu_s for r in results],
        "decode_tok_s": [r.decode_tok_s for r in results],
        "measured_peak_rss_mib": max(r.peak_rss_mib for r in results),
        "planned_peak_mib": first.planned_peak_mib,
        "prefill_steps": first.prefill_steps,
        "token_ids": first.token_ids,
        "settings": f"DHSA budget {job['budget']}, chunk {job['chunk_size']}, layers {job['layers']}"
        if job["attention"] == "dhsa"
        else "",
    }
    if timer is not None:
        record["stages_s"] = timer.seconds(sorted(prefill_s)[len(prefill_s) // 2])
    return record


def run_llama(job: dict[str, Any]) -> dict[str, Any]:
    from edgeattn.bench import peers

    ids = json.loads(Path(job["ids_file"]).read_text())
    out = peers.run_llama(
        Path(job["gguf"]),
        ids,
        threads=job["threads"],
        new_tokens=job["new_tokens"],
        repeats=job["repeats"],
        flash_attn=job["row"] == "llama.cpp-fa",
    )
    return {**out, "prompt_tokens": len(ids), "kernels": job["kernels"], "weights": job["weights"]}


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    t0 = time.perf_counter()
    if job.get("mode") == "prepare":
        out = prepare(job)
    elif job["backend"] == "llama.cpp":
        out = run_llama(job)
    else:
        out = run_edgeattn(job)
    out["peak_rss_mib"] = peak_rss_mib()
    out["child_wall_s"] = time.perf_counter() - t0
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
