"""Does DHSA's selection find what dense attention finds?  The diagnostic every selection choice is judged by.

A fact (the needle) is hidden at several depths in real prose (pydoc, or ``--haystack DIR``), and
the prompt ends by asking for it, completion style.  On the default model (Gemma 3 270M) it reports,
for each selection variant and budget (fractions of the prompt length L):

* **ranks**: in each global layer, the rank of the needle's chunk among the key chunks before the
  last query chunk (the one that produces the answer), by DHSA's selection score and by dense
  attention mass, and whether the selection keeps it;
* **mass**: the dense attention mass the selection keeps (all queries, heads, global layers);
* **NIAH**: whether the greedy answer (prefill, then a few decode steps, every global layer on the
  variant; sliding layers dense) contains the fact, next to dense attention's answer;
* ``--kernel-lengths``: the TVM kernels' time (selection + sparse attention) of each variant on
  one global layer of random data, at 16K and 64K by default, next to the chunk count.

Variants (``--variants``): ``dhsa-N`` / ``block-N`` (fixed chunks / blocks of N), ``dhsa-shift``,
``dhsa-predictor`` (adaptive, min/max from the defaults), a ``+localT`` suffix adds a band of T recent
keys always kept (``AttentionConfig.local``), a ``+obsW`` suffix the observation window of the last W
queries (``AttentionConfig.observe``; without it a variant is the paper's selection, chunk means
only).  ``dense`` is always run.

Sliding-window layers run banded (O(L·window), ``edgeattn.dhsa.banded_attention``) instead of
transformers' L×L mask, which is what makes 16K-32K prompts affordable here; the result is the same
attention.  The needle ranks and mass come from one dense forward per prompt; NIAH needs one greedy
run per variant and budget (``--niah-max-length`` skips the long ones).

    python benchmarks/selection.py --lengths 2048,4096 --json benchmarks/results/selection_2k4k.json
    python benchmarks/selection.py --lengths 2048 --niah "dhsa-16:32/16/8;block-16:32" --kernel-lengths 16384,65536
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from edgeattn.atomic import write_text  # noqa: E402

PYDOC_OFFSET = 50_000  # past the tokens calibration saw (benchmarks/chunking.py uses the same)


@dataclass(frozen=True)
class Variant:
    """A selection to compare: the attention config and where its boundaries come from."""

    name: str
    kind: str  # dhsa | block-sparse
    chunking: str  # fixed | shift | predictor
    chunk: int
    local: int = 0
    observe: int = 0

    def config(self, budget: int, sinks: int) -> Any:
        """The variant at ``budget``, raised to the least budget it accepts (own chunk + sinks + band)."""
        from edgeattn.config import AttentionConfig

        cfg = AttentionConfig(kind=self.kind, budget=1 << 30, chunk_size=self.chunk, sinks=sinks,
                              chunking=self.chunking, local=self.local, observe=self.observe)  # fmt: skip
        return cfg.with_(budget=max(budget, cfg.largest_chunk + sinks + self.local))


def parse_variant(name: str) -> Variant:
    """``dhsa-16``, ``block-32``, ``dhsa-shift``, ``dhsa-predictor``, any of them ``+local64``, ``+obs16``."""
    from edgeattn.config import DEFAULT_CHUNK_SIZE

    base, *extras = name.split("+")
    opts = {"local": 0, "obs": 0}
    for extra in extras:
        key = extra.rstrip("0123456789")
        if key not in opts or key == extra:
            raise SystemExit(
                f"error: variant {name!r}: a suffix must be +localT or +obsW (tokens), e.g. dhsa-16+local64+obs16"
            )
        opts[key] = int(extra[len(key) :])
    local, observe = opts["local"], opts["obs"]
    kind, _, rest = base.partition("-")
    if kind not in ("dhsa", "block"):
        raise SystemExit(f"error: variant {name!r} must start with dhsa- or block-")
    if rest in ("shift", "predictor"):
        if kind != "dhsa":
            raise SystemExit(f"error: variant {name!r}: block-sparse uses fixed blocks only")
        return Variant(name, "dhsa", rest, DEFAULT_CHUNK_SIZE, local, observe)
    if not rest.isdigit() or int(rest) < 1:
        raise SystemExit(f"error: variant {name!r}: expected a chunk length after the dash, e.g. {kind}-16")
    if observe and kind != "dhsa":
        raise SystemExit(f"error: variant {name!r}: the observation window is DHSA's (block-sparse is the baseline)")
    return Variant(name, "dhsa" if kind == "dhsa" else "block-sparse", "fixed", int(rest), local, observe)


# ----------------------------------------------------------------- model runs


def use_banded_sliding_layers(model: Any) -> None:
    """Sliding layers dense but banded (O(L·window)) under every patch, global layers as patched."""
    from edgeattn import patching
    from edgeattn.config import DENSE

    for module in patching.attention_modules(model):
        if getattr(module, patching._CFG_ATTR, None) is None:  # layers the patch left alone
            setattr(module, patching._CFG_ATTR, DENSE)


def patch(loaded: Any, cfg: Any, sources: dict[str, Any]) -> None:
    from edgeattn import patching

    fn = sources.get(cfg.chunking) if cfg.kind == "dhsa" else None
    patching.patch(loaded.model, cfg, "global", boundary_fn=fn)
    use_banded_sliding_layers(loaded.model)


def capture_dense(loaded: Any, ids: list[int], layers: list[int]) -> dict[int, dict[str, Any]]:
    import torch

    from edgeattn import patching
    from edgeattn.config import DENSE

    x = torch.tensor([ids])
    patching.patch(loaded.model, DENSE, "all")
    with patching.capture_attention(loaded.model, layers) as calls, torch.inference_mode():
        loaded.model.model(input_ids=x, use_cache=False)
    patching.unpatch(loaded.model)
    return {i: {"q": c[-1].q, "k": c[-1].k, "scaling": c[-1].scaling} for i, c in calls.items()}


def greedy(loaded: Any, ids: list[int], new_tokens: int) -> str:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None
        )
    return loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


# ----------------------------------------------------------------- selection diagnostics


def parse_niah(spec: str, variants: list[Variant], budgets: list[int]) -> dict[str, set[str]]:
    """``"dhsa-16:32/16;block-16:32"`` -> {variant: {"L/32", "L/16"}, ...}; empty: everything."""
    names = {v.name for v in variants}
    if not spec:
        return {n: {f"L/{f}" for f in budgets} for n in names}
    plan: dict[str, set[str]] = {}
    for part in filter(None, spec.split(";")):
        name, _, fracs = part.partition(":")
        if name not in names:
            raise SystemExit(f"error: --niah names {name!r}, which is not in --variants ({', '.join(sorted(names))})")
        chosen = {f"L/{x}" for x in fracs.split("/") if x} if fracs else {f"L/{f}" for f in budgets}
        unknown = chosen - {f"L/{f}" for f in budgets}
        if unknown:
            raise SystemExit(f"error: --niah budget {sorted(unknown)[0]} is not one of --budgets {budgets}")
        plan[name] = chosen
    return plan


def boundaries_for(variant: Variant, k: Any, sources: dict[str, Any]) -> Any:
    from edgeattn import dhsa

    if variant.chunking == "fixed":
        return dhsa.fixed_boundaries(k.shape[2], variant.chunk)
    return sources[variant.chunking](k, None)


# ----------------------------------------------------------------- kernel cost


def kernel_times(variants: list[Variant], lengths: list[int], budget: int, sinks: int, sources: dict) -> list[dict]:
    """TVM selection + sparse attention of one global layer (random q/k/v, the default model's
    shape) per variant: median of 3 below 32K, one run above."""
    import torch

    from edgeattn.kernels_tvm import registry

    out = []
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        q = torch.randn(1, 4, length, 256, generator=gen)
        k = torch.randn(1, 1, length, 256, generator=gen)
        v = torch.randn(1, 1, length, 256, generator=gen)
        for var in variants:
            cfg = var.config(budget, sinks)
            bnd = boundaries_for(var, k, sources) if var.kind == "dhsa" else None
            registry.run_layer(q[:, :, :256], k[:, :, :256], v[:, :, :256], cfg)  # compile outside the timing
            reps = 3 if length < 32768 else 1
            sel, att = [], []
            for _ in range(reps):
                t = registry.LayerTimes()
                registry.run_layer(q, k, v, cfg, bnd, times=t)
                sel.append(t.select_s)
                att.append(t.attention_s)
            s, a = C.median(sel), C.median(att)
            chunks = length // var.chunk if bnd is None else len(bnd) - 1
            out.append(
                dict(variant=var.name, length=length, budget=budget, chunks=chunks, select_s=s, attention_s=a,
                     total_s=s + a, select_frac=s / (s + a))
            )  # fmt: skip
            log(f"kernels L={length} {var.name}: {s + a:.3f} s (select {s / (s + a):.1%})")
    return out


# ----------------------------------------------------------------- main run


def log(msg: str) -> None:
    print(f"[selection] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgeattn import chunking, dhsa, models, needle, text
    from edgeattn.config import DENSE, AttentionConfig
    from edgeattn.coverage import kept_mass_streamed, oracle_selection

    C.set_threads(args.threads)
    variants = [parse_variant(x) for x in args.variants.split(",") if x]
    niah_plan = parse_niah(args.niah, variants, args.budgets)
    loaded = models.load(args.model)
    tok = loaded.tokenizer
    src = text.haystack_dir(args.haystack) if args.haystack else text.pydoc_text()
    offset = args.offset if args.offset is not None else (0 if args.haystack else PYDOC_OFFSET)
    body = tok(src, add_special_tokens=False).input_ids[offset:]
    layers = models.global_layers(loaded.config)
    base = AttentionConfig(kind="dhsa", sinks=args.sinks)
    sources = {
        "shift": chunking.boundary_fn_for(base.with_(chunking="shift"), loaded),
        "predictor": chunking.boundary_fn_for(base.with_(chunking="predictor"), loaded),
    }
    ranks, mass, niah = [], [], []
    meta = dict(
        model=loaded.name, text=str(args.haystack or "pydoc_data.topics"), offset=offset, layers=layers,
        threads=args.threads, load_average_at_start=[round(x, 2) for x in os.getloadavg()],
        command="python " + " ".join(sys.argv),
    )  # fmt: skip
    for length in args.lengths:
        if length > len(body):
            raise SystemExit(f"error: the haystack has {len(body)} tokens, fewer than --lengths {length}")
        budgets = {f"L/{f}": max(64, length // f) for f in args.budgets}
        for di, depth in enumerate(args.depths):
            prompt = needle.build_prompt(tok, body, length, depth, needle.FACTS[di % len(needle.FACTS)])
            ids, span, fact = prompt.ids, prompt.span, prompt.fact
            t0 = time.perf_counter()
            store = capture_dense(loaded, ids, layers)
            log(f"L={length} depth {depth}: dense capture {time.perf_counter() - t0:.0f} s")
            for layer in layers:
                q, k, scaling = store[layer]["q"], store[layer]["k"], store[layer]["scaling"]
                selections = {}
                for var in variants:
                    bnd = boundaries_for(var, k, sources)
                    for bname, budget in budgets.items():
                        cfg = var.config(budget, args.sinks)
                        r = needle.needle_in_selection(q, k, scaling, bnd, cfg, span)
                        selections[(var.name, bname)] = (bnd, r.pop("keep"), args.sinks)
                        ranks.append(dict(length=length, depth=depth, layer=layer, variant=var.name, budget=bname,
                                          chunks=len(bnd) - 1, **r))  # fmt: skip
                if length <= args.mass_max_length:
                    named = {f"{v}|{b}": s for (v, b), s in selections.items()}
                    for chunk in args.oracle:
                        bnd = dhsa.fixed_boundaries(length, chunk)
                        for bname, budget in budgets.items():
                            keep = oracle_selection(q, k, scaling, bnd, budget, args.sinks)
                            named[f"oracle-{chunk}|{bname}"] = (bnd, keep, args.sinks)
                    for key, value in kept_mass_streamed(q, k, scaling, named).items():
                        v, b = key.split("|")
                        mass.append(dict(length=length, depth=depth, layer=layer, variant=v, budget=b, mass=value))
            del store
            if length > args.niah_max_length:
                continue
            t0 = time.perf_counter()
            patch(loaded, DENSE, sources)
            answer = greedy(loaded, ids, args.new_tokens)
            hit = fact in answer
            niah.append(dict(length=length, depth=depth, variant="dense", budget="-", answer=answer, hit=hit))
            log(f"L={length} depth {depth} dense: {answer!r} ({time.perf_counter() - t0:.0f} s)")
            for var in variants:
                for bname, budget in budgets.items():
                    if bname not in niah_plan.get(var.name, ()):
                        continue
                    t0 = time.perf_counter()
                    patch(loaded, var.config(budget, args.sinks), sources)
                    answer = greedy(loaded, ids, args.new_tokens)
                    niah.append(dict(length=length, depth=depth, variant=var.name, budget=bname, answer=answer,
                                     hit=fact in answer))  # fmt: skip
                    log(f"L={length} depth {depth} {var.name} {bname}: {answer!r} ({time.perf_counter() - t0:.0f} s)")
            from edgeattn import patching

            patching.unpatch(loaded.model)
            save(args, dict(meta, ranks=ranks, mass=mass, niah=niah, kernels=[], partial=True))
    kernels = kernel_times(variants, args.kernel_lengths, args.kernel_budget, args.sinks, sources)
    result = dict(meta, ranks=ranks, mass=mass, niah=niah, kernels=kernels, partial=False)
    save(args, result)
    return result


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The records so far (``partial`` until the run ends): a long run that is stopped keeps its prompts."""
    if args.json:
        write_text(args.json, json.dumps({"cpu": C.cpu_model(), **result}, indent=1))


def summary(result: dict[str, Any]) -> str:
    """One row per (variant, budget): needle kept in every layer, median ranks, mass, NIAH hits."""
    rows = []
    keys = []
    for r in result["ranks"]:
        if (r["variant"], r["budget"]) not in keys:
            keys.append((r["variant"], r["budget"]))
    dense_hits = [n for n in result["niah"] if n["variant"] == "dense"]
    for var, bud in keys:
        rr = [r for r in result["ranks"] if r["variant"] == var and r["budget"] == bud]
        mm = [m["mass"] for m in result["mass"] if m["variant"] == var and m["budget"] == bud]
        nn = [n for n in result["niah"] if n["variant"] == var and n["budget"] == bud]
        prompts = {(r["length"], r["depth"]) for r in rr}
        all_layers = sum(all(r["kept"] for r in rr if (r["length"], r["depth"]) == p) for p in prompts)
        rows.append(
            dict(
                variant=var,
                budget=bud,
                chunk=f"{statistics.mean(r['length'] / r['chunks'] for r in rr):.1f}",
                kept_layers=f"{sum(r['kept'] for r in rr)}/{len(rr)}",
                kept_all=f"{all_layers}/{len(prompts)}",
                pinned=f"{sum(r.get('pinned', False) for r in rr)}/{len(rr)}",
                rank_score=statistics.median(r["rank_score"] for r in rr),
                rank_mass=statistics.median(r["rank_mass"] for r in rr),
                mass=statistics.mean(mm) if mm else None,
                niah=f"{sum(n['hit'] for n in nn)}/{len(nn)}" if nn else "-",
            )
        )
    cols = [
        ("variant", "variant"), ("budget", "budget"), ("chunk", "mean chunk"),
        ("kept_layers", "needle kept (layers)"), ("kept_all", "kept in all layers"),
        ("pinned", "pinned by window"), ("rank_score", "median rank by score"), ("rank_mass", "median rank by mass"),
        ("mass", "mass kept"), ("niah", "NIAH hits"),
    ]  # fmt: skip
    for var, bud in dict.fromkeys((m["variant"], m["budget"]) for m in result["mass"]):
        if (var, bud) not in keys:  # mass-only rows: the oracle selections
            mm = [m["mass"] for m in result["mass"] if m["variant"] == var and m["budget"] == bud]
            rows.append(dict(variant=var, budget=bud, mass=statistics.mean(mm), niah="-"))
    lines = [C.header("DHSA selection vs dense attention on " + result["model"], result["threads"])]
    lengths = sorted({r["length"] for r in result["ranks"]})
    lines.append(f"text {result['text']} | lengths {lengths} | global layers {result['layers']}")
    lines.append(f"dense NIAH hits: {sum(n['hit'] for n in dense_hits)}/{len(dense_hits)}")
    lines.append(C.table(rows, cols))
    if result["kernels"]:
        lines.append("")
        lines.append("TVM kernels, one global layer (random data), selection + sparse attention")
        lines.append(
            C.table(
                result["kernels"],
                [
                    ("variant", "variant"),
                    ("length", "L"),
                    ("chunks", "chunks"),
                    ("budget", "budget"),
                    ("select_s", "select s"),
                    ("attention_s", "attention s"),
                    ("total_s", "total s"),
                    ("select_frac", "select share"),
                ],
            )  # fmt: skip
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from edgeattn.config import DEFAULT_BUDGET, DEFAULT_SINKS

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default: the built-in gemma3-270m)")
    p.add_argument("--haystack", type=Path, default=None, help="folder of .txt files instead of pydoc prose")
    p.add_argument(
        "--offset", type=int, default=None, help=f"first token of the text (default: {PYDOC_OFFSET} for pydoc, 0 else)"
    )
    p.add_argument("--lengths", type=ints, default=[2048, 4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9])
    p.add_argument("--budgets", type=ints, default=[32, 16, 8], help="budgets as L/x, e.g. 32,16,8")
    p.add_argument("--variants", default="dhsa-32,block-32,dhsa-16,block-16,dhsa-shift,dhsa-predictor")
    p.add_argument(
        "--niah",
        default="",
        help="greedy NIAH runs as 'variant:x/y;variant:x' (budgets L/x of --budgets; default: every variant "
        "at every budget)",
    )
    p.add_argument("--niah-max-length", type=int, default=8192, help="no greedy NIAH runs above this length")
    p.add_argument("--mass-max-length", type=int, default=32768, help="no mass measurement above this length")
    p.add_argument(
        "--oracle",
        type=ints,
        default=[],
        help="also the mass kept by the best possible selection of fixed chunks of these lengths (the ceiling)",
    )
    p.add_argument("--new-tokens", type=int, default=10, help="greedy tokens per answer (digits are one token each)")
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS)
    p.add_argument("--kernel-lengths", type=ints, default=[], help="also time the TVM kernels per variant here")
    p.add_argument("--kernel-budget", type=int, default=DEFAULT_BUDGET)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the raw records here")
    args = p.parse_args(argv)
    if args.haystack is not None and not args.haystack.is_dir():
        raise SystemExit(f"error: --haystack {args.haystack} is not a folder; pass a folder of .txt files")
    print(summary(run(args)))


if __name__ == "__main__":
    main()
