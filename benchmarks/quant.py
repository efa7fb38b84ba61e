"""Quantized weights end to end: prefill, decode and peak RSS per weight format, DHSA and dense,
beside llama.cpp on the same Q4_K_M GGUF; and each format's top-1 agreement with fp32.

Rows, each in a fresh child process running `edgeattn run FILE.onnx --backend ort` (the exported
file alone: no PyTorch model in the process, so its RSS is what a device would hold):
  <format> x {dense, dhsa}   the built-in model exported with --weights <format>, every layer's
                             attention on the TVM kernels (--dense-op edgeattn)
  llama.cpp                  llama-cpp-python on the built-in Q4_K_M GGUF (when installed)
Accuracy (once per format, dense attention, an --all-logits export): top-1 agreement with the
fp32 model and the perplexity of 512 positions of prose (edgeattn.evals.weights).

    python benchmarks/quant.py --lengths 4K --threads 2 --json benchmarks/results/quant_4k.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeattn.config import parse_token_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, header, table, write_json  # noqa: E402

FORMATS = ("fp32", "int8", "int4", "gguf")
COLUMNS = [
    ("length", "tokens"),
    ("weights", "weights"),
    ("attention", "attention"),
    ("tok_s", "prefill tok/s"),
    ("decode_tok_s", "decode tok/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("resident_mib", "RSS after load MiB"),
    ("weights_mib", "weight MiB"),
    ("prefill_vs_llama", "prefill vs llama.cpp"),
    ("decode_vs_llama", "decode vs llama.cpp"),
    ("rss_vs_llama", "RSS / llama.cpp"),
    ("status", "status"),
]
ACCURACY_COLUMNS = [
    ("weights", "weights"),
    ("weight_mib", "weight MiB"),
    ("vs_fp32_bytes", "bytes / fp32"),
    ("top1_agreement", "top-1 agreement"),
    ("perplexity", "perplexity"),
    ("perplexity_increase", "perplexity increase"),
]


def exports(formats: list[str], attentions: list[str]) -> dict[tuple[str, str], Path]:
    """The cached export of each (format, attention): made here, once, so the timed children only load."""
    from edgeattn import models
    from edgeattn.config import AttentionConfig
    from edgeattn.export.quantize import weight_format
    from edgeattn.runtime import ort_backend

    loaded = models.load()
    out = {}
    for f in formats:
        for att in attentions:
            cfg = AttentionConfig(kind=att)  # type: ignore[arg-type]
            out[(f, att)] = ort_backend.cached_export(loaded, cfg, dense_op="edgeattn", weights=weight_format(f))
    return out


def accuracy(formats: list[str]) -> list[dict[str, Any]]:
    """Top-1 agreement and perplexity of each format against the fp32 PyTorch model (512 positions)."""
    from edgeattn import models
    from edgeattn.config import AttentionConfig
    from edgeattn.evals import weights
    from edgeattn.export.exporter import export_loaded
    from edgeattn.export.quantize import weight_format

    loaded = models.load()
    ids = weights.prose_ids(loaded)
    reference = weights.fp32_logits(loaded, ids)
    fp32_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    rows = []
    for f in formats:
        with tempfile.TemporaryDirectory() as tmp:
            res = export_loaded(
                loaded, Path(tmp) / "m.onnx", AttentionConfig(kind="dense"), all_logits=True, weights=weight_format(f)
            )
            got = weights.compare(f, weights.export_logits(res.onnx_path, ids), reference, ids)
            nbytes = res.manifest["onnx"]["weight_bytes"]
        rows.append(
            {
                **got.to_dict(),
                "weight_mib": nbytes / 2**20,
                "vs_fp32_bytes": nbytes / fp32_bytes,
                "precision": res.manifest["onnx"]["precision"]["matrices"],
            }
        )
        print(f"  accuracy {f}: top-1 {got.top1_agreement:.3f}, perplexity +{got.perplexity_increase:.1%}", flush=True)
    return rows


def run_row(path: Path, length: int, threads: int, new_tokens: int, timeout: float) -> dict[str, Any]:
    """`edgeattn run FILE --backend ort` in a child; its one result row (or a status saying why not)."""
    cmd = [sys.executable, "-m", "edgeattn.cli", "run", str(path), "--backend", "ort", "--synthetic-length"]
    cmd += [str(length), "--max-new-tokens", str(new_tokens), "--threads", str(threads), "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"killed: > {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1][:200]}"}
    out = done.stdout
    (row,) = json.loads(out[out.index("{") : out.rindex("}") + 1])["results"]
    return {"status": "ok", **row}


def llama_row(length: int, threads: int, new_tokens: int, timeout: float) -> dict[str, Any] | None:
    """llama.cpp on the built-in GGUF with the same prompt tokens, through edgeattn.bench's child."""
    from edgeattn import models, text
    from edgeattn.bench import peers
    from edgeattn.bench.child import MARK

    if peers.llama_cpp_missing():
        return None
    loaded_path = models.resolve(None)
    gguf = models.gguf_source(loaded_path)
    tokenizer = models._load_tokenizer(loaded_path)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(text.token_ids(tokenizer, length)))
        job = {
            "backend": "llama.cpp",
            "row": "llama.cpp",
            "gguf": str(gguf),
            "ids_file": str(ids_file),
            "threads": threads,
            "new_tokens": new_tokens,
            "repeats": 1,
            "kernels": "llama.cpp",
            "weights": peers.weight_format(gguf),
        }
        try:
            done = subprocess.run(
                [sys.executable, "-m", "edgeattn.bench.child", json.dumps(job)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"status": f"killed: > {timeout:.0f} s"}
    line = next((x for x in done.stdout.splitlines() if x.startswith(MARK)), None)
    if line is None:
        return {"status": f"failed: {done.stderr.strip()[-200:]}"}
    rec = json.loads(line[len(MARK) :])
    return {
        "status": "ok",
        "prefill_s": rec["prefill_s"][0],
        "tok_s": length / rec["prefill_s"][0],
        "decode_tok_s": rec["decode_tok_s"][0],
        "peak_rss_mib": rec["peak_rss_mib"],
        "settings": rec.get("settings"),
    }


def with_ratios(rows: list[dict[str, Any]]) -> None:
    """Each edgeattn row against llama.cpp's row of the same length."""
    llama = {r["length"]: r for r in rows if r["weights"] == "Q4_K_M (llama.cpp)" and r.get("status") == "ok"}
    for r in rows:
        ref = llama.get(r["length"])
        if ref is None or r is ref or r.get("status") != "ok":
            continue
        r["prefill_vs_llama"] = r["tok_s"] / ref["tok_s"]
        if r.get("decode_tok_s") and ref.get("decode_tok_s"):
            r["decode_vs_llama"] = r["decode_tok_s"] / ref["decode_tok_s"]
        r["rss_vs_llama"] = r["peak_rss_mib"] / ref["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4K", help="Prompt lengths, e.g. 4K,16K.")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"Weight formats (of {', '.join(FORMATS)}).")
    ap.add_argument("--attention", default="dense,dhsa", help="Attention kinds.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16, help="Greedy tokens after the prompt (decode rate).")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Seconds before a row's child is killed.")
    ap.add_argument("--no-accuracy", action="store_true", help="Skip the agreement/perplexity table.")
    ap.add_argument("--no-llama", action="store_true", help="Skip llama.cpp.")
    ap.add_argument("--json", type=Path, help="Write the records here.")
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    lengths = parse_token_counts(args.lengths)

    print(header("Quantized weights: edgeattn (ONNX Runtime + TVM attention kernels) and llama.cpp", args.threads))
    t0 = time.time()
    acc = [] if args.no_accuracy else accuracy(formats)
    paths = exports(formats, attentions)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        if not args.no_llama:
            got = llama_row(length, args.threads, args.new_tokens, args.timeout)
            if got is not None:
                rows.append({"length": length, "weights": "Q4_K_M (llama.cpp)", "attention": "dense", **got})
                print(f"  {length} llama.cpp: {got.get('status')}", flush=True)
        for f in formats:
            for att in attentions:
                got = run_row(paths[(f, att)], length, args.threads, args.new_tokens, args.timeout)
                rows.append({"length": length, "weights": f, "attention": att, **got})
                print(f"  {length} {f} {att}: {got.get('status')} {fmt(got.get('tok_s'))} tok/s", flush=True)
    with_ratios(rows)
    if acc:
        print("\nAgreement with the fp32 model, 512 positions of prose (dense attention, ONNX Runtime):")
        print(table(acc, ACCURACY_COLUMNS))
    print(f"\nPrefill, decode ({args.new_tokens} greedy tokens) and peak RSS, one run each:")
    print(table(rows, COLUMNS))
    print(f"\n{time.time() - t0:.0f} s")
    if args.json:
        meta = {
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "command": "python " + " ".join(sys.argv),
            "runs": "one run per row, each in a fresh process",
        }
        write_json(args.json, rows, {**meta, "accuracy": acc})


if __name__ == "__main__":
    main()
