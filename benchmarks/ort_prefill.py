"""Backend ``ort`` end to end: prefill of the default model, per exported file and kernel path.

Rows (each in its own child process, so its peak RSS is its own; one run each):
  dense  --dense-op onnx      reference  ORT on the plain dense file ([B,1,1,S,T] masks)
  dense  --dense-op gqa       reference  ORT's GroupQueryAttention in every layer
  dense  --dense-op edgeattn  tvm        every layer's DenseFlashAttention on the TVM kernel
  dhsa   --dense-op edgeattn  tvm        DHSA layers + dense layers on the TVM kernels
  dhsa   --dense-op edgeattn  reference  the ai.edgeattn ops as their ONNX function bodies
The parent watches each child's RSS and kills it past ``--rss-cap`` (recorded as such), so
an O(L^2) path cannot take the shared machine down.  Kernels compile during an untimed
64-token warm-up.

    python benchmarks/ort_prefill.py --lengths 4K,16K --threads 2 --json benchmarks/results/ort_prefill.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_BUDGET, DEFAULT_CHUNK_SIZE, parse_token_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, header, table, write_json  # noqa: E402

ROWS = [  # (attention, dense_op, kernels)
    ("dense", "onnx", "reference"),
    ("dense", "gqa", "reference"),
    ("dense", "edgeattn", "tvm"),
    ("dhsa", "edgeattn", "tvm"),
    ("dhsa", "edgeattn", "reference"),
]
COLUMNS = [
    ("length", "tokens"),
    ("attention", "attention"),
    ("dense_op", "--dense-op"),
    ("kernels", "--kernels"),
    ("prefill_s", "prefill s"),
    ("tok_s", "tok/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("status", "status"),
]


def child(path: str, kernels: str, length: int, threads: int, seed: int) -> None:
    """One prefill in this process; prints one JSON line."""
    import numpy as np

    from edgeattn.runtime.measure import PeakRSS
    from edgeattn.runtime.ort_backend import open_session

    t0 = time.perf_counter()
    session = open_session(path, kernels=kernels, threads=threads)
    load_s = time.perf_counter() - t0
    vocab = int(session.manifest["model"]["vocab_size"])
    ids = np.random.default_rng(seed).integers(0, vocab, length).tolist()
    session.append(ids[:64])  # warm-up: kernels compile here, untimed
    session.reset()
    with PeakRSS(interval=0.005) as mem:
        t1 = time.perf_counter()
        logits = session.append(ids)
        prefill_s = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "prefill_s": prefill_s,
                "tok_s": length / prefill_s,
                "peak_rss_mib": mem.peak / 2**20,
                "rss_before_prefill_mib": mem.start / 2**20,
                "load_s": load_s,
                "top1": int(np.argmax(logits)),
                "kernels_label": session.info.kernels,
            }
        ),
        flush=True,
    )


def run_child(args: argparse.Namespace, path: Path, kernels: str, length: int) -> dict[str, Any]:
    """Run one row in a child, killing it if its RSS passes the cap."""
    import psutil

    cmd = [sys.executable, __file__, "--child", str(path), "--kernels", kernels, "--length", str(length)]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    cap = args.rss_cap_gib * 2**30
    seen, killed, t0 = 0, False, time.perf_counter()
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        seen = max(seen, rss)
        if rss > cap or time.perf_counter() - t0 > args.timeout:
            killed = True
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if killed:
        why = f"killed: RSS > {args.rss_cap_gib} GiB" if seen > cap else f"killed: > {args.timeout} s"
        return {"status": why, "peak_rss_mib": seen / 2**20}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode == -9:  # SIGKILL, and not ours: the kernel's OOM killer (the machine ran out)
        return {"status": "out of memory (killed by the OOM killer)", "peak_rss_mib": seen / 2**20}
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1][:200]
        return {"status": f"failed (exit {proc.returncode}): {tail}", "peak_rss_mib": seen / 2**20}
    return {"status": "ok", **json.loads(lines[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4K,16K", help="prompt lengths, e.g. 4K,16K")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="DHSA budget N_b")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--rows", default="all", help="comma list of row numbers (0-based) of ROWS, or all")
    p.add_argument("--rss-cap-gib", type=float, default=10.0, help="kill a child whose RSS passes this")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a child running longer (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the records here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--kernels", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.kernels, args.length, args.threads, args.seed)
        return

    from edgeattn import models
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.ort_backend import cached_export

    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    loaded = models.load()
    files = {}
    for attention, dense_op, _ in rows:
        if (attention, dense_op) not in files:
            cfg = AttentionConfig(kind=attention, budget=args.budget, chunk_size=args.chunk_size)
            files[attention, dense_op] = cached_export(loaded, cfg, dense_op=dense_op)
    del loaded
    print(header("ort backend: prefill of the default model (one run per row, each in its own process)", args.threads))
    records = []
    meta = {"threads": args.threads, "command": "python benchmarks/ort_prefill.py " + " ".join(sys.argv[1:])}
    for length in parse_token_counts(args.lengths):
        for attention, dense_op, kernels in rows:
            rec = {"length": length, "attention": attention, "dense_op": dense_op, "kernels": kernels}
            rec |= {"backend": "ort", "threads": args.threads, "budget": args.budget if attention == "dhsa" else None}
            rec |= run_child(args, files[attention, dense_op], kernels, length)
            records.append(rec)
            print("  " + " ".join(f"{k}={fmt(rec.get(k))}" for k, _ in COLUMNS), flush=True)
            if args.json:  # after every row: a long run cut short keeps what it measured
                write_json(args.json, records, meta)
    print(table(records, COLUMNS))


if __name__ == "__main__":
    main()
