"""Does a prefill split into calls (chunked prefill under a memory budget) keep the needles one-shot finds?

The observation window (``AttentionConfig.observe``) is each call's last queries, so a prompt
prefilled in several calls pins vertical chunks per call, and its logits differ from one-shot
prefill's (they are equal only with ``observe=0``, the paper's selection: tests/test_runtime.py).
This measures what that difference costs where the window matters, retrieval: a fact hidden in
real prose at several depths, the prompt asking for it, then greedy decoding on the torch backend
with the TVM kernels.  Rows: dense; DHSA prefilled in one call; DHSA prefilled in calls of
``--piece`` tokens (as `edgeattn run --memory-budget` would); DHSA without the window.

    python benchmarks/chunked_prefill.py --length 4096 --piece 1024 --budget 128 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, set_threads, table, write_json  # noqa: E402

COLUMNS = [("length", "tokens"), ("depth", "depth"), ("row", "row"), ("hit", "found"), ("answer", "answer")]


def greedy_answer(session: Any, pieces: list[list[int]], tokenizer: Any, steps: int) -> str:
    """Prefill ``pieces`` call by call, then ``steps`` greedy tokens; the decoded continuation."""
    for piece in pieces:
        logits = session.append(piece)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = session.append([out[-1]])
    session.close()
    return tokenizer.decode(out, skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096, help="prompt tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the fact sits, as fractions of the prompt")
    p.add_argument("--piece", type=int, default=1024, help="tokens per prefill call of the chunked row")
    p.add_argument("--budget", type=int, help="DHSA budget in tokens (default: L/32, where the window matters)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="greedy tokens after the prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    set_threads(args.threads)

    from edgeattn import models, needle, text
    from edgeattn.config import AttentionConfig
    from edgeattn.runtime.torch_backend import TorchSession

    loaded = models.load()
    body = loaded.tokenizer(text.pydoc_text(), add_special_tokens=False).input_ids[50_000:]
    budget = args.budget or args.length // 32
    sparse = AttentionConfig(kind="dhsa", budget=budget, chunk_size=args.chunk_size)
    print(header(f"Chunked prefill vs one-shot, needle retrieval, Gemma 3 270M, budget {budget}", args.threads))
    records = []
    for depth in (float(x) for x in args.depths.split(",")):
        fact = needle.FACTS[int(depth * 10) % len(needle.FACTS)]
        ids = needle.build_prompt(loaded.tokenizer, body, args.length, depth, fact).ids
        split = [ids[i : i + args.piece] for i in range(0, len(ids), args.piece)]
        rows = [
            ("dense", AttentionConfig(kind="dense"), [ids]),
            ("dhsa one-shot", sparse, [ids]),
            (f"dhsa in {len(split)} calls", sparse, split),
            ("dhsa, no window", sparse.with_(observe=0), [ids]),
        ]
        for name, cfg, pieces in rows:
            t0 = time.perf_counter()
            answer = greedy_answer(TorchSession(loaded, cfg, kernels="tvm"), pieces, loaded.tokenizer, args.steps)
            rec = dict(length=args.length, depth=depth, row=name, hit=fact in answer, answer=answer.strip()[:24])
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            records.append(rec)
            print(f"  {name} @ depth {depth}: {'found' if rec['hit'] else 'missed'} ({rec['answer']!r})", flush=True)
    print(table(records, COLUMNS))
    for name in dict.fromkeys(r["row"] for r in records):
        hits = [r["hit"] for r in records if r["row"] == name]
        print(f"{name}: {sum(hits)}/{len(hits)}")
    if args.json:
        meta = {"threads": args.threads, "budget": budget, "chunk_size": args.chunk_size, "piece": args.piece}
        write_json(args.json, records, {**meta, "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
