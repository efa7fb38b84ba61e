"""Run a model the way `edgeattn run` does, on any backend: warm-up, prefill, decode, measure, report.

Every backend is a :class:`~edgeattn.runtime.session.Session`; this module owns
everything around it, so the torch, ort and tvm rows of one report are measured
the same way, in the same process, minutes apart on the same CPU:

1. an untimed warm-up (kernel compilation, allocator growth) on a short prompt;
2. prefill -- one call, or chunks of the planned length when the memory budget
   says so -- timed, with peak RSS sampled throughout;
3. greedy decode through the KV cache, timed separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeattn.runtime.measure import MIB, PeakRSS, Timer, cpu_model, rss_bytes
from edgeattn.runtime.memory import MemoryPlan
from edgeattn.runtime.session import Session

WARM_UP_TOKENS = 64


@dataclass
class RunResult:
    """One row of the report (the JSON record of `edgeattn run --json`)."""

    backend: str
    attention: str
    kernels: str
    device: str
    prompt_tokens: int
    prefill_s: float
    prefill_cpu_s: float  # CPU seconds of every thread of the process: robust to other load on the machine
    tok_s: float
    new_tokens: int
    decode_tok_s: float | None
    peak_rss_mib: float
    planned_peak_mib: float
    prefill_chunk: int
    prefill_steps: int
    weights_mib: float = 0.0  # the weights as this backend holds them (quantized or fp16 exports: their bytes)
    kv_cache_mib: float = 0.0  # the KV cache at the end of the run (prompt + new tokens), as planned
    resident_mib: float = 0.0  # measured RSS after loading and the warm-up, before the prefill
    layers: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    continuation: str = ""

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.attention}" if self.backend != "transformers" else "transformers"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def warm_up(session: Session, vocab: int, tokens: int = WARM_UP_TOKENS) -> None:
    """Prefill a short prompt and decode one token, untimed, then empty the cache.

    The first call of each kernel compiles it (TVM) or picks it (oneDNN, ORT);
    no measured row should pay for that while another does not.
    """
    ids = [(7 * i + 3) % vocab for i in range(tokens)]
    logits = session.append(ids)
    session.append([int(np.argmax(logits))])
    session.reset()


def prefill(
    session: Session, ids: Sequence[int], chunk: int, progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, int]:
    """Push the prompt through in steps of ``chunk`` tokens; returns (last logits, steps).

    ``progress(done_tokens, total_tokens)`` is called after each step of a chunked prefill.
    """
    logits = None
    steps = 0
    for start in range(0, len(ids), chunk):
        logits = session.append(ids[start : start + chunk])
        steps += 1
        if progress is not None and chunk < len(ids):
            progress(min(start + chunk, len(ids)), len(ids))
    assert logits is not None
    return logits, steps


def greedy(session: Session, first: np.ndarray, max_new_tokens: int, eos: int | Sequence[int] | None) -> list[int]:
    """Greedy decode: the first token comes from the prefill's logits, each next from one append."""
    stop = set([eos] if isinstance(eos, int) else (eos or []))
    tokens = [int(np.argmax(first))]
    while len(tokens) < max_new_tokens and tokens[-1] not in stop:
        tokens.append(int(np.argmax(session.append([tokens[-1]]))))
    return tokens


def run_session(
    session: Session,
    ids: Sequence[int],
    plan_for: Callable[[int], MemoryPlan],
    max_new_tokens: int,
    *,
    vocab: int,
    eos: int | Sequence[int] | None = None,
    decode_text: Callable[[list[int]], str] | None = None,
    layers: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Warm up, plan, prefill ``ids`` in the plan's chunks, decode greedily; measured as one row.

    ``plan_for(resident_bytes)`` makes the memory plan from what the process
    holds after the warm-up (runtime, weights, compiled kernels), so the plan
    and the measured peak count the same things.
    """
    warm_up(session, vocab)
    # a remote session measures memory on its device (the agent's VmHWM), the host's RSS otherwise
    resident = getattr(session, "resident_bytes", lambda: None)() or rss_bytes()
    plan = plan_for(resident)
    meter = session.peak_meter() if hasattr(session, "peak_meter") else PeakRSS()
    with meter as mem:
        cpu0 = time.process_time()
        with Timer() as t_prefill:
            logits, steps = prefill(session, ids, plan.prefill_chunk, progress)
        prefill_cpu = time.process_time() - cpu0
        with Timer() as t_decode:
            tokens = greedy(session, logits, max_new_tokens, eos)
    session.reset()
    n_decoded = len(tokens) - 1
    info = session.info
    return RunResult(
        backend=info.backend,
        attention=info.attention,
        kernels=info.kernels,
        device=info.device,
        prompt_tokens=len(ids),
        prefill_s=t_prefill.seconds,
        prefill_cpu_s=prefill_cpu,
        tok_s=len(ids) / t_prefill.seconds,
        new_tokens=len(tokens),
        decode_tok_s=(n_decoded / t_decode.seconds) if n_decoded > 0 and t_decode.seconds > 0 else None,
        peak_rss_mib=mem.peak / MIB,
        planned_peak_mib=plan.peak / MIB,
        prefill_chunk=plan.prefill_chunk,
        prefill_steps=steps,
        weights_mib=plan.weights / MIB,
        kv_cache_mib=plan.kv_cache / MIB,
        resident_mib=resident / MIB,
        layers=list(layers or []),
        token_ids=tokens,
        continuation=decode_text(tokens) if decode_text else "",
    )


def report_header(model: str, threads: int, memory_budget: int | None, **extra: Any) -> dict[str, Any]:
    """What every report starts with: the machine changes day to day, so it is always named."""
    return {
        "model": model,
        "cpu": cpu_model(),
        "threads": threads,
        "memory_budget_mib": round(memory_budget / MIB) if memory_budget else None,
        "resident_mib_at_start": round(rss_bytes() / MIB),
        **extra,
    }


def format_table(header: dict[str, Any], results: list[RunResult]) -> str:
    """The human-readable report: one row per (backend, attention), ratios against the baselines."""
    head = (
        f"model {header['model']} | CPU {header['cpu']} | {header['threads']} threads | budget {header.get('budget')}"
        f" | chunk {header.get('chunk_size')} ({header.get('chunking')})"
    )
    if header.get("observe") is not None:  # None: an artifact whose manifest predates the option
        head += f" | window {header['observe']}" if header["observe"] else " | no window (paper's selection)"
    if header.get("weights") not in (None, "fp32"):
        head += f" | weights {header['weights']}"
    if header.get("kv_dtype") not in (None, "float32"):
        head += f" | KV cache {header['kv_dtype']} (torch rows)"
    if header.get("memory_budget_mib"):
        head += f" | memory budget {header['memory_budget_mib']} MiB"
    lines = [head, ""]
    cols = (
        f"{'backend/attention':<20}{'kernels':>10}{'tokens':>8}{'prefill s':>11}{'tok/s':>9}{'vs shipped':>11}"
        f"{'vs dense':>10}{'peak RSS':>10}{'planned':>9}{'weights':>9}{'KV':>7}{'steps':>7}{'decode tok/s':>14}"
        f"{'decode vs dense':>17}"
    )
    lines.append(cols)
    shipped = next((r for r in results if r.backend == "transformers"), None)
    dense = {r.backend: r for r in results if r.attention == "dense" and r.backend != "transformers"}
    for r in results:
        vs_shipped = f"{shipped.prefill_s / r.prefill_s:.2f}x" if shipped else "-"
        d = dense.get(r.backend)
        vs_dense = f"{d.prefill_s / r.prefill_s:.2f}x" if d else "-"
        decode = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "-"
        decode_vs = f"{r.decode_tok_s / d.decode_tok_s:.2f}x" if d and d.decode_tok_s and r.decode_tok_s else "-"
        lines.append(
            f"{r.label:<20}{r.kernels:>10}{r.prompt_tokens:>8}{r.prefill_s:>11.2f}{r.tok_s:>9.0f}{vs_shipped:>11}"
            f"{vs_dense:>10}{r.peak_rss_mib:>10.0f}{r.planned_peak_mib:>9.0f}{r.weights_mib:>9.0f}{r.kv_cache_mib:>7.0f}"
            f"{r.prefill_steps:>7}{decode:>14}{decode_vs:>17}"
        )
    lines.append("")
    lines.append(
        "peak RSS, planned peak, weights (as the row's backend holds them) and KV cache (prompt + new tokens) in MiB;"
        " steps = prefill calls (more than 1: chunked to fit the budget)"
    )
    lines.append("decode vs dense: decode tok/s over the dense row of the same backend (DHSA: on its chunk index)")
    for r in results:
        lines.append(f"[{r.label}] {r.continuation!r}")
    return "\n".join(lines)
