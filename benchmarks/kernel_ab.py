"""A/B of the CPU kernels: a git revision's ``kernels_tvm/cpu.py`` (attention) or ``select.py`` (chunk
selection) against the working tree's.

Kernel changes move times by a few per cent, and this machine's noise between two separate runs
is of the same size, so the two builds run in interleaved pairs on the same inputs (the order
alternating) and the table gives the median and the range of the per-pair ratios rev/tree (> 1:
the working tree is faster), plus the largest difference between their outputs.  Each build
uses its own default schedule (tuning records are not applied).  Only ``cpu.py`` (``select.py``
for ``--op select``) is taken from the revision; the other kernel modules are the working tree's.
The selection's outputs (chunk ids) must be identical: its "max |diff|" is 0 or the change is wrong.

One attention layer of the default model's global layers (4 query heads, 1 KV head, head_dim
256), budget 2048, 4 sinks, fixed chunks, selection by the selection kernel.

    python benchmarks/kernel_ab.py --rev HEAD~1                           # 16K and 32K, chunks 16 and 32
    python benchmarks/kernel_ab.py --rev HEAD~1 --mcpu host,haswell       # also the AVX2 build (on AVX-512 CPUs)
    python benchmarks/kernel_ab.py --rev HEAD~1 --op dense --lengths 8K
    python benchmarks/kernel_ab.py --rev HEAD~1 --op select --lengths 16K,64K --chunks 16
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeattn.config import parse_token_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, interleaved_ratios, median, set_threads, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HQ, HKV, D, SINKS, BUDGET = 4, 1, 256, 4, 2048

COLUMNS = [
    ("build", "build"),
    ("op", "op"),
    ("length", "L"),
    ("chunk", "chunk"),
    ("rev_s", "rev s"),
    ("tree_s", "tree s"),
    ("ratio", "rev/tree (median)"),
    ("ratio_min", "min"),
    ("ratio_max", "max"),
    ("max_abs_diff", "max |diff|"),
]


def module_at(rev: str, name: str) -> ModuleType:
    """``kernels_tvm/<name>.py`` as it was at ``rev``, imported inside the package (its relative imports resolve)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:kernels_tvm/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--rev {rev}: git cannot show kernels_tvm/{name}.py there ({err.stderr.strip()})") from err
    # a file, not exec'd text: TVMScript reads its functions' source back from the file
    folder = tempfile.mkdtemp(prefix="edgeattn-ab-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / f"{name}_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"edgeattn.kernels_tvm._{name}_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def target_for(mcpu: str) -> Any:
    from edgeattn.kernels_tvm import registry

    return registry.host_target() if mcpu == "host" else registry.resolve_target({"kind": "llvm", "mcpu": mcpu})


def compare(builds: dict[str, ModuleType], target: Any, op: str, length: int, chunk: int, pairs: int) -> dict:
    """Interleaved timings of the two builds of ``op`` on one input."""
    import numpy as np
    import torch

    from edgeattn import dhsa
    from edgeattn.config import DEFAULT_OBSERVE
    from edgeattn.kernels_tvm import registry
    from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SELECT, OP_SPARSE
    from edgeattn.kernels_tvm.schedule import target_lanes

    common = dict(heads_q=HQ, heads_kv=HKV, head_dim=D)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, length, D, generator=gen) for h in (HQ, HKV, HKV))
    out = registry.empty((HQ, length, D))
    if op == "dense":
        spec = registry.make_spec(OP_DENSE, **common)
        arrays, outputs = (q, k, v, out), [out]
    else:
        bnd = dhsa.fixed_boundaries(length, chunk).to(torch.int32)
        bt = registry.empty(bnd.shape, "int32").copy_(bnd)
        width = registry.selection_width(bnd.numpy(), BUDGET, SINKS)
        sel = registry.empty((HKV, len(bnd) - 1, width), "int32")
        nsel = registry.empty((HKV, len(bnd) - 1), "int32")
        select = dict(budget=BUDGET, sinks=SINKS, observe=DEFAULT_OBSERVE, **common)
        registry.get_kernel(OP_SELECT, target, **select)(q, k, bt, sel, nsel)
        if op == "select":
            spec = registry.make_spec(OP_SELECT, **select)
            arrays, outputs = (q, k, bt, sel, nsel), [sel, nsel]
        else:
            spec = registry.make_spec(OP_SPARSE, sinks=SINKS, query_tile=registry.query_tile_for(bnd.numpy()), **common)
            arrays, outputs = (q, k, v, bt, sel, nsel, out), [out]

    def build(module: ModuleType) -> Any:
        if op == "select":
            return module.build_chunk_select(spec, lanes=target_lanes(target))
        return module.build(spec, target, module.default_schedule(spec, target))

    args = [registry.as_tvm(a) for a in arrays]
    funcs, outs = {}, {}
    for name, module in builds.items():
        funcs[name] = registry.compile_module(build(module), target)[registry.SYMBOL[spec.op]]
        funcs[name](*args)  # warm-up, and the outputs to compare
        outs[name] = [o.clone().double().numpy() for o in outputs]
    times: dict[str, list[float]] = {}
    ratios = interleaved_ratios(lambda: funcs["tree"](*args), lambda: funcs["rev"](*args), pairs, times)
    return {
        "op": op,
        "length": length,
        "chunk": chunk if op != "dense" else None,
        "rev_s": median(times["base"]),
        "tree_s": median(times["ours"]),
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(outs["rev"], outs["tree"], strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="git revision whose kernels_tvm/cpu.py (select.py) is the baseline")
    p.add_argument("--op", choices=("sparse", "dense", "select"), default="sparse")
    p.add_argument("--lengths", default="16K,32K", help="prompt lengths (K = 1024)")
    p.add_argument("--chunks", default="16,32", help="DHSA chunk lengths (sparse and select)")
    p.add_argument("--mcpu", default="host", help="comma list: host (this CPU) and/or LLVM CPU names, e.g. haswell")
    p.add_argument("--pairs", type=int, default=5, help="interleaved (rev, tree) pairs per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="write the records here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    source = "select" if args.op == "select" else "cpu"
    builds = {"rev": module_at(args.rev, source), "tree": importlib.import_module(f"edgeattn.kernels_tvm.{source}")}
    chunks = parse_token_counts(args.chunks, "--chunks") if args.op != "dense" else [0]
    print(header(f"CPU {args.op} kernel A/B: {args.rev} (rev) against the working tree", args.threads), flush=True)
    records = []
    for mcpu in [m.strip() for m in args.mcpu.split(",") if m.strip()]:
        target = target_for(mcpu)
        for length in parse_token_counts(args.lengths):
            for chunk in chunks:
                rec = {"build": mcpu, **compare(builds, target, args.op, length, chunk, args.pairs)}
                rec["threads"] = args.threads
                records.append(rec)
                print(f"  {mcpu} {args.op} L={length} chunk={chunk}: rev/tree {rec['ratio']:.3f}", flush=True)
    print(table(records, COLUMNS))
    if args.json:
        write_json(args.json, records, {"threads": args.threads, "rev": args.rev, "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
