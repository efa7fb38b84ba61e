"""The tvm backend's prefill of the default model: where its time goes, and its GEMMs against torch's.

Three tables, measured side by side in one run (one process per backend row, so
no row inherits another's allocator or thread-pool state):

1. prefill of L tokens on the tvm backend (`edgeattn compile` artifact, Relax VM),
   dense and DHSA, beside ONNX Runtime on the same file (ORT's own kernels: the
   plain-ONNX dense attention and the DHSA function bodies) and the torch backend
   (torch's GEMMs + our attention kernels);
2. the tvm prefill's time per op class (GEMM, attention, rest), from the VM's
   instrument hook (`edgeattn.runtime.tvm_backend.OpTimer`), and the artifact's
   planned activation memory beside the measured RSS growth of the prefill;
3. GFLOP/s of the packed-weight GEMM kernel (kernels_tvm/cpu_rules.py) against
   torch.matmul on the model's GEMM shapes (M = L).

    python benchmarks/tvm_prefill.py --lengths 512,4096 --json benchmarks/results/tvm_prefill.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, header, median, set_threads, table, time_it, write_json  # noqa: E402

ROWS = ("tvm-dense", "tvm-dhsa", "ort-dense", "ort-dhsa", "torch-dense", "torch-dhsa")


def _export(kind: str, budget: int, chunk: int) -> Path:
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime import ort_backend

    return ort_backend.cached_export(None, AttentionConfig(kind=kind, budget=budget, chunk_size=chunk))


def _ids(length: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(10, 200_000, length)]


def run_row(row: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (row, length) in this process."""
    set_threads(args.threads)
    from edgeattn.runtime.measure import PeakRSS

    backend, kind = row.split("-")
    ids = _ids(length)
    out: dict[str, Any] = {"row": row, "length": length}
    if backend == "tvm":
        from edgeattn.runtime import tvm_backend

        sess = tvm_backend.open_session(_export(kind, args.budget, args.chunk_size), max_context=args.max_context)
    elif backend == "ort":
        from edgeattn.runtime import ort_backend

        sess = ort_backend.open_session(_export(kind, args.budget, args.chunk_size), kernels="reference")
    else:
        from edgeattn import models
        from edgeattn.config import AttentionConfig
        from edgeattn.runtime.torch_backend import TorchSession

        cfg = AttentionConfig(kind=kind, budget=args.budget, chunk_size=args.chunk_size)  # type: ignore[arg-type]
        sess = TorchSession(models.load(None), cfg, kernels="tvm")
    sess.append(ids[:16])  # warm-up: thread pools, first-call allocations
    sess.reset()
    timer = None
    if backend == "tvm":
        timer = tvm_backend.attach_timer(sess)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        sess.append(ids)
        out["prefill_s"] = time.perf_counter() - t0
    out["tok_s"] = length / out["prefill_s"]
    out["rss_growth_mib"] = peak.extra / 2**20
    if timer is not None:
        classes = timer.by_class()
        total = sum(classes.values())
        out.update({f"{k}_s": v for k, v in classes.items()})
        out["instrumented_s"] = total
        man = sess.art.manifest
        out["planned_activations_mib"] = man["memory"]["planned_activation_bytes"] / 2**20
        out["planned_at"] = man["max_context"]
        model = man["export"]["model"]
        out["kv_cache_mib"] = 2 * model["layers"] * model["kv_heads"] * length * model["head_dim"] * 4 / 2**20
    sess.close()
    return out


def gemm_rates(length: int, threads: int) -> list[dict[str, Any]]:
    """GFLOP/s of the packed GEMM kernel vs torch.matmul on the default model's shapes (M = length)."""
    set_threads(threads)
    import numpy as np
    import torch
    import tvm

    from edgeattn.kernels_tvm import cpu_rules, registry

    torch.set_num_threads(threads)
    target = registry.host_target()
    tile = cpu_rules.gemm_tile(target)
    shapes = [("q_proj", 640, 1024), ("k/v_proj", 640, 256), ("o_proj", 1024, 640), ("gate/up", 640, 2048)]
    shapes += [("down", 2048, 640), ("lm_head (M=1)", 640, 262144)]
    rows = []
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    for name, k, n in shapes:
        m = 1 if name.startswith("lm_head") else length
        lib = registry.compile_module(tvm.IRModule({"edgeattn_gemm": cpu_rules.gemm_primfunc(k, n, tile)}), target)
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        ta, tw = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(cpu_rules.pack_weight(w, tile.nb), dev)
        tc = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
        fn = lib["edgeattn_gemm"]
        fn(ta, tw, tc)
        err = float(np.abs(tc.numpy() - a @ w).max() / np.abs(a @ w).max())
        flops = 2.0 * m * k * n
        a_t, w_t = torch.from_numpy(a), torch.from_numpy(w)
        reps = 5
        t_tvm = median(time_it(lambda fn=fn, ta=ta, tw=tw, tc=tc: fn(ta, tw, tc), repeats=reps, warmup=1))
        t_torch = median(time_it(lambda a_t=a_t, w_t=w_t: torch.matmul(a_t, w_t), repeats=reps, warmup=1))
        rows.append(
            {
                "gemm": name,
                "M": m,
                "K": k,
                "N": n,
                "tvm_gflops": flops / t_tvm / 1e9,
                "torch_gflops": flops / t_torch / 1e9,
                "tvm_vs_torch": t_torch / t_tvm,
                "rel_err": err,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,4096", help="prompt lengths, comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows ({', '.join(ROWS)})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--max-context", type=int, default=None, help="artifact context bound (default: max length)")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM table")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.max_context is None:
        args.max_context = max(lengths)
    if args.child:
        row, length = args.child.split("@")
        print("RESULT " + json.dumps(run_row(row, int(length), args)))
        return

    print(header("tvm backend prefill (default model, Gemma 3 270M)", args.threads))
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    records: list[dict[str, Any]] = []
    for length in lengths:
        for row in rows:
            cmd = [sys.executable, __file__, "--child", f"{row}@{length}", "--threads", str(args.threads)]
            cmd += ["--budget", str(args.budget), "--chunk-size", str(args.chunk_size)]
            cmd += ["--max-context", str(args.max_context), "--lengths", str(length)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{row} @ {length}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rec = json.loads(lines[-1][len("RESULT ") :])
            records.append(rec)
            print(f"  {row:12s} L={length:6d}: {rec['prefill_s']:.3f} s", flush=True)
    for rec in records:
        same = [
            r for r in records if r["length"] == rec["length"] and r["row"].split("-")[1] == rec["row"].split("-")[1]
        ]
        tvm_row = next((r for r in same if r["row"].startswith("tvm")), None)
        if tvm_row is not None:
            rec["vs_tvm"] = rec["prefill_s"] / tvm_row["prefill_s"]
    print()
    print(
        table(
            records,
            [
                ("length", "tokens"),
                ("row", "row"),
                ("prefill_s", "prefill s"),
                ("tok_s", "tok/s"),
                ("vs_tvm", "time / tvm's"),
                ("rss_growth_mib", "RSS growth MiB"),
            ],
        )
    )
    tvm_recs = [r for r in records if r["row"].startswith("tvm")]
    if tvm_recs:
        print("\ntvm prefill by op class (VM instrument hook), and planned vs measured memory")
        cols = [("length", "tokens"), ("row", "row"), ("gemm_s", "GEMM s"), ("attention_s", "attention s")]
        cols += [("rest_s", "rest s"), ("instrumented_s", "sum s"), ("planned_activations_mib", "planned act. MiB")]
        cols += [("planned_at", "planned at"), ("kv_cache_mib", "KV cache MiB"), ("rss_growth_mib", "RSS growth MiB")]
        print(table(tvm_recs, cols))
    gemm: list[dict[str, Any]] = []
    if not args.no_gemm:
        gemm = gemm_rates(max(lengths), args.threads)
        print(f"\nGEMM GFLOP/s, packed-weight kernel vs torch.matmul (M = {max(lengths)} unless noted)")
        cols = [("gemm", "GEMM"), ("M", "M"), ("K", "K"), ("N", "N"), ("tvm_gflops", "tvm GFLOP/s")]
        cols += [("torch_gflops", "torch GFLOP/s"), ("tvm_vs_torch", "tvm speed / torch"), ("rel_err", "rel err")]
        print(table(gemm, cols))
    if args.json:
        meta = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "cpu": cpu_model(),
            "threads": args.threads,
            "budget": args.budget,
            "chunk_size": args.chunk_size,
            "max_context": args.max_context,
        }
        write_json(args.json, records + [{"gemm": g} for g in gemm], meta)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
