"""ONNX Runtime prefill of the exported default model: dense file vs DHSA file, side by side.

Each (file, length) runs in its own child process, so the peak RSS reported is
that run's (weights + ORT arena + activations), not the benchmark's.  The DHSA
file runs its ai.edgeattn ops as their ONNX function bodies: the portable path,
with an O(L^2) token mask inside, which the TVM kernels are meant to beat.

    python benchmarks/export_ort.py --lengths 2K,8K,16K --json results/export_ort.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, parse_token_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # shared helpers of the benchmarks folder, when present
    from _common import cpu_model, table, write_json
except ImportError:  # pragma: no cover - minimal stand-ins

    def cpu_model() -> str:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")

    def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
        lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(k, "-")) for k, _ in columns) + " |" for r in rows]
        return "\n".join(lines)

    def write_json(path: str | Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
        Path(path).write_text(json.dumps({"meta": {"cpu": cpu_model(), **(meta or {})}, "records": records}, indent=1))


COLUMNS = [
    ("length", "tokens"),
    ("dense_s", "dense prefill s"),
    ("dhsa_s", "DHSA prefill s"),
    ("speed", "dense/DHSA time"),
    ("dense_rss", "dense peak RSS MiB (prefill)"),
    ("dhsa_rss", "DHSA peak RSS MiB (prefill)"),
    ("mem", "DHSA/dense RSS"),
    ("dense_act", "dense prefill MiB"),
    ("dhsa_act", "DHSA prefill MiB"),
    ("act", "DHSA/dense prefill MiB"),
    ("top1_same", "same top-1"),
]


def child(path: str, length: int, threads: int, seed: int) -> None:
    """One prefill in this process; prints a JSON line."""
    import numpy as np
    import onnxruntime as ort

    from edgeattn.runtime.measure import PeakRSS

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    kv, d = past[0].shape[1], past[0].shape[3]
    ids = np.random.default_rng(seed).integers(0, 262144, (1, length))
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length)[None],
        **{i.name: np.zeros((1, kv, 0, d), np.float32) for i in past},
    }
    # peak RSS sampled in a thread: ru_maxrss is useless here (Linux carries the parent's
    # high-water mark into a fork+exec'd child, and the parent held the model while exporting)
    with PeakRSS(interval=0.005) as mem:
        t0 = time.perf_counter()
        logits = sess.run(["logits"], feed)[0]
        prefill_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "prefill_s": prefill_s,
                "tok_per_s": length / prefill_s,
                "peak_rss_mib": mem.peak / 2**20,  # during the prefill (sampled every 5 ms)
                "rss_before_prefill_mib": mem.start / 2**20,
                "activation_mib": mem.extra / 2**20,
                "load_s": load_s,
                "top1": int(logits[0, -1].argmax()),
            }
        )
    )


def layer_models(folder: Path, budget: int, chunk: int, sinks: int) -> dict[str, Path]:
    """One global attention layer of the default model (Hq 4, Hkv 1, D 256) as its own ONNX file:
    the dense graph's masked attention vs the two ai.edgeattn function bodies.  Isolates what
    limits the portable path at long context (the O(L^2) buffers), without the other 17 layers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edgeattn.export import ops
    from edgeattn.export.onnx_builder import BOOL, OPSET, NodeBuilder

    hq, hkv, d = 4, 1, 256
    scale = 256**-0.5
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, hq, "L", d]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, hkv, "L", d]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, hkv, "L", d]),
    ]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, hq, "L", d])]
    files = {}
    # dense: exactly the formulation of export/graph.py's dense layers
    nb = NodeBuilder()
    length = nb.dim(nb.op("Shape", "k"), 2)
    pos = nb.op("Range", nb.scalar_i64(0), length, nb.scalar_i64(1))
    causal = nb.op("LessOrEqual", nb.unsqueeze(pos, 0), nb.unsqueeze(pos, 1))
    qg = nb.op("Reshape", "q", nb.i64(0, hkv, hq // hkv, -1, d))
    scores = nb.op(
        "Mul",
        nb.op("MatMul", qg, nb.unsqueeze(nb.op("Transpose", "k", perm=[0, 1, 3, 2]), 2)),
        nb.const(scale, np.float32),
    )
    scores = nb.op("Where", nb.op("Cast", causal, to=BOOL), scores, nb.const(np.finfo(np.float32).min, np.float32))
    o = nb.op("MatMul", nb.op("Softmax", scores, axis=-1), nb.unsqueeze("v", 2))
    nb.op("Reshape", o, nb.i64(0, hq, -1, d), outputs=["out"])
    files["dense"] = helper.make_model(
        helper.make_graph(nb.nodes, "dense_layer", inputs, out), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    # DHSA: the two custom ops with fixed chunk boundaries
    nb = NodeBuilder()
    length = nb.dim(nb.op("Shape", "k"), 2)
    c = nb.scalar_i64(chunk)
    steps = nb.op("Range", nb.scalar_i64(0), nb.op("Add", length, c), c)
    bounds = nb.op("Min", steps, nb.as_tensor(nb.unsqueeze(length, 0)))
    sel, nsel = nb.op(
        ops.OP_SELECT,
        "q",
        "k",
        bounds,
        domain=ops.DOMAIN,
        outputs=2,
        budget=budget,
        sinks=sinks,
        max_selected=ops.max_selected(budget, sinks, chunk),
        normalize=1,
    )
    nb.op(
        ops.OP_SPARSE,
        "q",
        "k",
        "v",
        bounds,
        sel,
        nsel,
        domain=ops.DOMAIN,
        outputs=["out"],
        scaling=scale,
        softcap=0.0,
        window=0,
        sinks=sinks,
    )
    nb.nodes[-1].overload = ops.NO_SOFTCAP  # as the exporter does for models without softcapping
    files["dhsa"] = helper.make_model(
        helper.make_graph(nb.nodes, "dhsa_layer", inputs, out),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)],
        functions=ops.functions(),
    )
    paths = {}
    for kind, model in files.items():
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        paths[kind] = folder / f"layer-{kind}-b{budget}-c{chunk}.onnx"
        onnx.save_model(model, paths[kind])
    return paths


def layer_child(path: str, length: int, threads: int, seed: int) -> None:
    """One attention layer at ``length`` tokens; prints a JSON line (time and sampled peak RSS)."""
    import numpy as np
    import onnxruntime as ort

    from edgeattn.runtime.measure import PeakRSS

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feed = {
        "q": rng.standard_normal((1, 4, length, 256), np.float32),
        "k": rng.standard_normal((1, 1, length, 256), np.float32),
        "v": rng.standard_normal((1, 1, length, 256), np.float32),
    }
    with PeakRSS(interval=0.005) as mem:
        t0 = time.perf_counter()
        sess.run(["out"], feed)
        seconds = time.perf_counter() - t0
    print(json.dumps({"prefill_s": seconds, "peak_rss_mib": mem.peak / 2**20, "activation_mib": mem.extra / 2**20}))


def run_child(
    path: Path, length: int, threads: int, seed: int, timeout: float, mode: str = "--child", mem_limit_gib: float = 0
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, mode, str(path), str(length), str(threads), str(seed)]
    if mem_limit_gib:  # fail with an allocation error rather than wake the OOM killer on a shared machine
        limit = int(mem_limit_gib * 2**20)
        cmd = ["bash", "-c", f"ulimit -v {limit} && exec " + " ".join(cmd)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        alloc = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", proc.stderr)
        if alloc:
            cap = f" under the {mem_limit_gib:g} GiB cap" if mem_limit_gib else ""
            return {"error": f"OOM: {int(alloc.group(1)) / 2**30:.1f} GiB buffer{cap}"}
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"{why}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_exports(
    folder: Path, model: str | None, budget: int, chunk: int, sinks: int, force: bool
) -> dict[str, Path]:
    """Export the dense and the DHSA file once (reused on later runs unless --force)."""
    from edgeattn import models
    from edgeattn.config import AttentionConfig
    from edgeattn.export.exporter import export_loaded

    folder.mkdir(parents=True, exist_ok=True)
    files = {"dense": folder / "dense.onnx", "dhsa": folder / f"dhsa-b{budget}-c{chunk}-s{sinks}.onnx"}
    todo = {k: p for k, p in files.items() if force or not p.exists()}
    if todo:
        loaded = models.load(model)
        for kind, path in todo.items():
            cfg = AttentionConfig(kind=kind, budget=budget, chunk_size=chunk, sinks=sinks)
            export_loaded(loaded, path, cfg, force=True)
        del loaded
    return files


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--child", "--layer-child"):
        fn = child if sys.argv[1] == "--child" else layer_child
        fn(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2K,8K,16K", help="prompt lengths, e.g. 2K,8K,16K or 2048,8192")
    ap.add_argument("--model", default=None, help="model (default: the built-in Gemma 3 270M)")
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "edgeattn" / "bench-exports")
    ap.add_argument("--force-export", action="store_true", help="re-export even if the files exist")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it counts as failed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the records as JSON here")
    ap.add_argument(
        "--layer-only",
        action="store_true",
        help="time one global attention layer (dense subgraph vs the two ai.edgeattn ops) instead of the model",
    )
    ap.add_argument("--mem-limit-gib", type=float, default=0, help="virtual-memory cap per run (ulimit -v); 0: none")
    args = ap.parse_args()

    lengths = parse_token_counts(args.lengths)
    mode = "--layer-child" if args.layer_only else "--child"
    if args.layer_only:
        args.dir.mkdir(parents=True, exist_ok=True)
        files = layer_models(args.dir, args.budget, args.chunk_size, args.sinks)
    else:
        files = ensure_exports(args.dir, args.model, args.budget, args.chunk_size, args.sinks, args.force_export)
    load = os.getloadavg()
    what = "one global attention layer (Hq 4, Hkv 1, D 256)" if args.layer_only else "the exported model"
    print(f"ONNX Runtime prefill of {what} (fp32), dense vs DHSA ({args.model or 'gemma3-270m'})")
    print(f"CPU: {cpu_model()} | threads: {args.threads} | logical CPUs: {os.cpu_count()}")
    print(
        f"load average at start: {load[0]:.2f} | DHSA budget {args.budget}, chunk {args.chunk_size}, sinks {args.sinks}"
    )
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for kind, path in files.items():
            r = run_child(path, length, args.threads, args.seed, args.timeout, mode, args.mem_limit_gib)
            print(f"  {kind:5s} {length:6d}: {json.dumps(r)}", file=sys.stderr, flush=True)
            records.append({"kind": kind, "length": length, **r})
            row[f"{kind}_s"] = round(r["prefill_s"], 2) if "prefill_s" in r else r["error"]
            row[f"{kind}_rss"] = round(r["peak_rss_mib"]) if "peak_rss_mib" in r else "-"
            row[f"{kind}_act"] = round(r["activation_mib"]) if "activation_mib" in r else "-"
        if "prefill_s" in records[-1] and "prefill_s" in records[-2]:
            row["speed"] = round(records[-2]["prefill_s"] / records[-1]["prefill_s"], 2)
            row["mem"] = round(records[-1]["peak_rss_mib"] / records[-2]["peak_rss_mib"], 2)
            row["act"] = round(records[-1]["activation_mib"] / max(records[-2]["activation_mib"], 1e-9), 2)
            if "top1" in records[-1]:
                row["top1_same"] = records[-1]["top1"] == records[-2]["top1"]
        rows.append(row)
        lines = table([row], COLUMNS).splitlines()
        print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)
    print()
    print(table(rows, COLUMNS))
    if args.json:
        meta = {
            "threads": args.threads,
            "load_average_start": load,
            "budget": args.budget,
            "chunk_size": args.chunk_size,
            "sinks": args.sinks,
            "files": {k: str(p) for k, p in files.items()},
            "layer_only": args.layer_only,
        }
        write_json(args.json, records, meta)


if __name__ == "__main__":
    main()
