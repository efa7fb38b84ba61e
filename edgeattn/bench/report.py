"""`edgeattn bench --report A.json [B.json ...]`: Markdown tables, the targets, and links to the plots.

One section per report (reports from different machines or days are never mixed
into one table: only figures from one run compare).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeattn.config import ConfigError

# (what, length, kind, threshold): the project's headline targets (issue 17)
TARGETS = (
    ("DHSA prefill tok/s vs llama.cpp", 4096, "llama.cpp", 1.5),
    ("DHSA prefill tok/s vs llama.cpp", 16384, "llama.cpp", 3.0),
    ("DHSA prefill tok/s vs llama.cpp", 32768, "llama.cpp", 5.0),
    ("DHSA prefill tok/s vs transformers", 16384, "transformers", 3.0),
)
STAGES = (
    ("attention_global_core", "global attn"),
    ("attention_sliding_core", "sliding attn"),
    ("projections", "QKVO proj"),
    ("mlp", "MLP"),
    ("rest", "rest"),
)


def load_report(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
        doc["rows"]  # noqa: B018
        doc["settings"]  # noqa: B018
    except FileNotFoundError:
        raise FileNotFoundError(f"--report {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--report {path} is not an edgeattn bench report ({type(err).__name__}: {err})") from None
    return doc


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _f(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _best(rows: list[dict[str, Any]], length: int, prefix: str) -> dict[str, Any] | None:
    """The fastest row at ``length`` whose name starts with ``prefix`` (the strongest peer configuration)."""
    cands = [r for r in rows if r["length"] == length and r["row"].startswith(prefix)]
    return max(cands, key=lambda r: r["tok_s"], default=None)


def _dhsa(rows: list[dict[str, Any]], length: int) -> dict[str, Any] | None:
    """edgeattn's DHSA row at ``length``: torch/dhsa when measured, else the fastest DHSA row."""
    cands = [r for r in rows if r["length"] == length and r["attention"] == "dhsa" and r["row"].count("/")]
    torch = [r for r in cands if r["row"] == "torch/dhsa"]
    return torch[0] if torch else max(cands, key=lambda r: r["tok_s"], default=None)


def _order(r: dict[str, Any]) -> tuple[int, int, str]:
    peer = 0 if "/" in r["row"] else 1
    return (r["length"], peer, r["row"])


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each headline target: measured ratio, threshold, holds or by how much it is missed."""
    out = []
    for what, length, peer, need in TARGETS:
        ours, theirs = _dhsa(rows, length), _best(rows, length, peer)
        item: dict[str, Any] = {"target": f"{what} at {_k(length)} >= {need}x", "length": length, "need": need}
        if ours is None or theirs is None:
            item |= {"ratio": None, "holds": None, "note": "not measured in this run"}
        else:
            ratio = ours["tok_s"] / theirs["tok_s"]
            item |= {"ratio": ratio, "holds": ratio >= need, "against": theirs["row"]}
            if ours.get("prefill_cpu_s") and theirs.get("prefill_cpu_s"):  # CPU seconds: less sensitive to load
                item["cpu_ratio"] = theirs["prefill_cpu_s"] / ours["prefill_cpu_s"]
            item["note"] = (
                "holds" if ratio >= need else f"missed: {ratio / need:.2f} of the target ({need / ratio:.2f}x short)"
            )
        out.append(item)
    ours, theirs = _dhsa(rows, 16384), _best(rows, 16384, "llama.cpp")
    item = {"target": "DHSA peak RSS at 16K <= llama.cpp's", "length": 16384, "need": 1.0}
    if ours is None or theirs is None:
        item |= {"ratio": None, "holds": None, "note": "not measured in this run"}
    else:
        gap = ours["peak_rss_mib"] - theirs["peak_rss_mib"]
        ratio = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
        item |= {"ratio": ratio, "holds": gap <= 0, "against": theirs["row"]}
        item["note"] = (
            "holds"
            if gap <= 0
            else f"missed: {ours['peak_rss_mib']:,.0f} vs {theirs['peak_rss_mib']:,.0f} MiB ({gap:,.0f} MiB over, "
            f"{ratio:.2f}x; our weights are {ours.get('weights')}, llama.cpp's {theirs.get('weights')})"
        )
    out.append(item)
    return out


def render_one(doc: dict[str, Any], path: Path) -> str:
    rows = sorted([r for r in doc["rows"] if "error" not in r], key=_order)
    failed = [r for r in doc["rows"] if "error" in r]
    s, m = doc["settings"], doc.get("machine", {})
    lines = [
        f"### {s.get('model')}: {m.get('cpu', '?')}, {s.get('threads')} threads",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} logical CPUs, {m.get('memory_gib', '?')} GiB; "
        f"{m.get('os', '')}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
        + ".",
        f"Measured {doc.get('started', '?')} to {doc.get('updated', '?')}; each row in its own process; "
        f"{s.get('repeats')} timed repeat(s) per row after an untimed warm-up; {s.get('new_tokens')} greedy tokens "
        f"decoded after each prefill (decode tok/s at that context); DHSA budget {s.get('budget')}, chunk "
        f"{s.get('chunk_size')}, layers {s.get('layers')}. Peak RSS is the whole process's peak (VmHWM: "
        "model load included). CPU util = prefill CPU s / (wall s x threads): below ~0.9 other work on the "
        "machine took cores from the row; (load) = the 1-minute load average when the row started. "
        "Report: `" + str(path) + "`.",
        "Command(s), in order: " + "; ".join(f"`{c}`" for c in doc.get("commands") or [doc.get("command", "")]),
        "",
        "| length | row | weights | prefill s (median, min-max) | prefill tok/s | x llama.cpp | x transformers "
        "| decode tok/s | peak RSS MiB | CPU util (load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        llama, shipped = _best(rows, r["length"], "llama.cpp"), _best(rows, r["length"], "transformers")
        spread = f" ({r['prefill_s_min']:.2f}-{r['prefill_s_max']:.2f})" if r["repeats"] > 1 else ""
        vs_llama = f"{r['tok_s'] / llama['tok_s']:.2f}x" if llama else "-"
        vs_shipped = f"{r['tok_s'] / shipped['tok_s']:.2f}x" if shipped else "-"
        lines.append(
            f"| {_k(r['length'])} | {r['row']} | {r.get('weights')} | {r['prefill_s']:.2f}{spread} "
            f"| {r['tok_s']:,.0f} | {vs_llama} | {vs_shipped} | {_f(r.get('decode_tok_s'), 1)} "
            f"| {_f(r['peak_rss_mib'])} | {_f(r.get('cpu_utilisation'), 2)} ({_f(r.get('load_avg_1min'), 1)}) |"
        )
    lines += ["", "**Targets** (DHSA = the torch/dhsa row; against the fastest llama.cpp configuration measured):", ""]
    lines += ["| target | measured (wall time) | in CPU seconds | verdict (wall time) |", "|---|---|---|---|"]
    for t in targets(rows):
        measured = (
            "-" if t["ratio"] is None else f"{t['ratio']:.2f}x" + (f" ({t['against']})" if "against" in t else "")
        )
        cpu = f"{t['cpu_ratio']:.2f}x" if t.get("cpu_ratio") else "-"
        lines.append(f"| {t['target']} | {measured} | {cpu} | {t['note']} |")
    staged = [r for r in rows if r.get("stages_s")]
    if staged:
        lines += [
            "",
            "**Where the prefill time goes** (forward hooks on each layer's attention, projections and MLP; "
            "attention = the attention core without its projections; rest = embedding, norms, LM head, glue):",
            "",
            "| length | row | prefill s | " + " | ".join(h for _, h in STAGES) + " |",
            "|---|---|---|" + "---|" * len(STAGES),
        ]
        for r in staged:
            st = r["stages_s"]
            cells = [f"{st.get(k, 0):.2f} ({100 * st.get(k, 0) / r['prefill_s']:.0f} %)" for k, _ in STAGES]
            lines.append(f"| {_k(r['length'])} | {r['row']} | {r['prefill_s']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Rows: " + "; ".join(sorted({f"`{r['row']}` {r['what']}" for r in rows})) + "."]
    settings = sorted({f"`{r['row']}`: {r['settings']}" for r in rows if r.get("settings")})
    if settings:
        lines.append("Settings: " + "; ".join(settings) + ".")
    for r in rows:
        if r.get("peak_note"):
            lines.append(f"Peak RSS of `{r['row']}` at {_k(r['length'])} not shown: {r['peak_note']}.")
    for sk in doc.get("skipped", []):
        lines.append(f"Skipped `{sk['row']}`: {sk['reason']}.")
    for r in failed:
        lines.append(f"Failed `{r['row']}` at {_k(r['length'])}: {r['error']}")
    plots = doc.get("plots") or []
    if plots:
        lines.append("")
        here = Path(path).resolve().parent
        for name in plots:
            link = os.path.relpath(here / name, Path.cwd())
            lines.append(f"![{name.removesuffix('.png').replace('_', ' ')}]({link})")
    return "\n".join(lines)


def render(paths: list[Path]) -> str:
    """Markdown for one or more bench reports."""
    if not paths:
        raise ConfigError("--report needs at least one bench JSON file: edgeattn bench --report out/bench.json")
    return "\n\n".join(render_one(load_report(p), p) for p in paths)
