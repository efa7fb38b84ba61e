"""`edgeattn bench`: a length x row sweep, each row in a fresh process, kept as it goes.

Everything that can be refused is checked before anything is written or run: the
lengths against the model's context, the rows, the device, the GGUF file, and an
existing report made with other settings.  Then each (length, row) runs in its own
child process (``edgeattn.bench.child``) and its record is added to the JSON report
at once, through a temp file and a rename: an interrupted sweep keeps every finished
row, and the next run with the same settings skips them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeattn.atomic import write_text
from edgeattn.bench import peers
from edgeattn.bench.child import MARK
from edgeattn.bench.rows import RowSpec
from edgeattn.config import AttentionConfig, ConfigError
from edgeattn.errors import EdgeAttnError
from edgeattn.runtime.measure import cpu_model

FORMAT = "edgeattn-bench/1"
REPORT_NAME = "bench.json"
WARM_UP = {
    "edgeattn": "untimed 64-token prefill + 1 decode step before each repeat (kernels loaded, allocator grown)",
    "llama.cpp": "untimed 64-token prefill + 1 decode step once, then each repeat from an empty KV cache",
}
# settings that change what a row measures: a report resumes only under the same ones
RESUME_KEYS = ("model", "threads", "new_tokens", "repeats", "budget", "chunk_size", "layers", "device", "gguf")


class ResumeError(EdgeAttnError):
    """An existing report cannot be resumed under this request."""


@dataclass
class BenchRequest:
    """Everything `edgeattn bench` was asked, already parsed."""

    rows: list[RowSpec]
    lengths: list[int]
    out: Path
    model: str | None = None
    threads: int = 1
    repeats: int = 1
    new_tokens: int = 16
    budget: int = 2048
    chunk_size: int = 16
    layers: str = "global"
    device: str = "host"
    gguf: Path | None = None
    fresh: bool = False
    command: str = ""


@dataclass
class Job:
    row: RowSpec
    length: int
    prompt_tokens: int


@dataclass
class Plan:
    """A checked request: the jobs still to run, rows skipped with their reason, the report so far."""

    request: BenchRequest
    settings: dict[str, Any]
    jobs: list[Job]
    done: int
    skipped: list[dict[str, str]]
    report: dict[str, Any]
    model_path: Path
    gguf: Path | None = None
    gguf_weights: str | None = None
    context: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def report_path(self) -> Path:
        return self.request.out / REPORT_NAME


def plan_sweep(req: BenchRequest) -> Plan:
    """Check the request and what is already on disk; nothing is written or run here."""
    from transformers import AutoConfig

    from edgeattn import models

    for name, value in (("--threads", req.threads), ("--repeats", req.repeats), ("--new-tokens", req.new_tokens)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if any(r.attention == "dhsa" for r in req.rows):
        AttentionConfig(kind="dhsa", budget=req.budget, chunk_size=req.chunk_size)  # refuses a budget < chunk
    skipped: list[dict[str, str]] = []
    rows = list(req.rows)
    if req.device != "host":
        from edgeattn.devices.profiles import get_profile

        get_profile(req.device)  # an unknown device: one error line, before anything loads
        wrong = [r.name for r in rows if not r.is_peer and r.backend != "tvm"]
        if wrong:
            raise ConfigError(
                f"--device {req.device} runs the compiled model: use --backends tvm (got rows {', '.join(wrong)})"
            )
        for r in [r for r in rows if r.is_peer]:
            skipped.append({"row": r.name, "reason": "peers run on this machine only (--device host)"})
        rows = [r for r in rows if not r.is_peer]
    if req.gguf is not None and not req.gguf.is_file():
        raise FileNotFoundError(f"--gguf {req.gguf}: no such file; pass the GGUF the model comes from, or leave it out")
    model_path = models.resolve(req.model)
    models.check_hf_dir(model_path)
    context = int(getattr(AutoConfig.from_pretrained(str(model_path)), "max_position_embeddings", 0) or 0)
    too_long = [n for n in req.lengths if context and n > context]
    if too_long:
        raise ConfigError(
            f"--lengths {', '.join(map(str, too_long))} tokens exceed the model's context of {context} tokens; "
            f"use lengths <= {context}"
        )
    gguf_weights = None
    # the GGUF is part of the settings whether or not this run has llama.cpp rows, so that rows added
    # later (`--peers llama.cpp` after a first run without) resume into the same report
    gguf_path = req.gguf or peers.gguf_of(model_path, req.model)
    llama_rows = [r for r in rows if r.backend == "llama.cpp"]
    if llama_rows:
        why = peers.llama_cpp_missing()
        if why is None and gguf_path is None:
            why = f"no GGUF file for {req.model}: pass --gguf PATH (the file the model was converted from)"
        if why is None and not gguf_path.is_file():
            raise FileNotFoundError(f"the model's GGUF file {gguf_path} is missing; pass --gguf PATH")
        if why is not None:
            skipped += [{"row": r.name, "reason": why} for r in llama_rows]
            rows = [r for r in rows if r.backend != "llama.cpp"]
        else:
            gguf_weights = peers.weight_format(gguf_path)
    settings = {
        "model": req.model or models.DEFAULT_MODEL,
        "threads": req.threads,
        "new_tokens": req.new_tokens,
        "repeats": req.repeats,
        "budget": req.budget,
        "chunk_size": req.chunk_size,
        "layers": req.layers,
        "device": req.device,
        "gguf": str(gguf_path) if gguf_path else None,
    }
    report = _existing_report(req, settings)
    finished = {(r["row"], r["length"]) for r in report["rows"] if "error" not in r}
    jobs, done = [], 0
    for length in req.lengths:
        # at the model's full context the prompt leaves room for the decoded tokens
        prompt = min(length, context - req.new_tokens) if context else length
        if prompt < 1:
            raise ConfigError(f"--new-tokens {req.new_tokens} leaves no room for a prompt in {context} tokens")
        for row in rows:
            if (row.name, length) in finished:
                done += 1
            else:
                jobs.append(Job(row, length, prompt))
    report["skipped"] = skipped
    return Plan(req, settings, jobs, done, skipped, report, model_path, gguf_path, gguf_weights, context)


def _existing_report(req: BenchRequest, settings: dict[str, Any]) -> dict[str, Any]:
    path = req.out / REPORT_NAME
    if path.exists() and not req.fresh:
        try:
            old = json.loads(path.read_text())
            old_settings = old["settings"]
            old["rows"]  # noqa: B018 - a report without rows is not one of ours
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ResumeError(
                f"{path} exists but is not an edgeattn bench report ({type(err).__name__}); "
                "pass --fresh to replace it or another --out"
            ) from None
        diff = [
            f"{k} {old_settings.get(k)!r} -> {settings[k]!r}" for k in RESUME_KEYS if old_settings.get(k) != settings[k]
        ]
        if diff:
            raise ResumeError(
                f"{path} was measured with other settings ({'; '.join(diff)}); rows measured differently do not "
                "compare: pass --fresh to start over, or another --out"
            )
        return old
    return {"format": FORMAT, "settings": settings, "rows": [], "skipped": [], "plots": []}


def machine() -> dict[str, Any]:
    """What the figures were measured on: they compare only within one machine and one run."""
    from importlib.metadata import PackageNotFoundError, version

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for dist in ("torch", "transformers", "onnxruntime", "apache-tvm", "llama-cpp-python"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _stats(xs: list[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread_pct": None}
    med = float(statistics.median(vals))
    return {
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "spread_pct": 100 * (max(vals) - min(vals)) / med if med else None,
    }


def _record(plan: Plan, job: Job, out: dict[str, Any], wall_s: float, load: float) -> dict[str, Any]:
    """The report's row: what was measured and how, from the child's raw figures."""
    row = job.row
    prefill = _stats(out["prefill_s"])
    decode = _stats(out["decode_tok_s"])
    cpu_s = _stats(out.get("prefill_cpu_s") or [])
    return {
        "row": row.name,
        "length": job.length,
        "prompt_tokens": out["prompt_tokens"],
        "backend": row.backend,
        "attention": row.attention,
        "kernels": out.get("kernels", row.kernels),
        "what": row.what,
        "weights": out.get("weights"),
        "threads": plan.request.threads,
        "cpu": cpu_model(),
        "device": plan.request.device,
        "warmup": WARM_UP["llama.cpp" if row.backend == "llama.cpp" else "edgeattn"],
        "repeats": len(out["prefill_s"]),
        "prefill_s": prefill["median"],
        "prefill_s_min": prefill["min"],
        "prefill_s_max": prefill["max"],
        "prefill_spread_pct": prefill["spread_pct"],
        "prefill_s_all": out["prefill_s"],
        "prefill_cpu_s": cpu_s["median"],
        # CPU seconds / (wall seconds x threads): below ~0.9 other work on the machine took cores from the row
        "cpu_utilisation": cpu_s["median"] / (prefill["median"] * plan.request.threads) if cpu_s["median"] else None,
        "load_avg_1min": load,
        "tok_s": out["prompt_tokens"] / prefill["median"],
        "new_tokens": plan.request.new_tokens,
        "decode_tok_s": decode["median"],
        "decode_spread_pct": decode["spread_pct"],
        "decode_tok_s_all": out["decode_tok_s"],
        "peak_rss_mib": out["peak_rss_mib"],
        "measured_peak_rss_mib": out.get("measured_peak_rss_mib"),
        "planned_peak_mib": out.get("planned_peak_mib"),
        "stages_s": out.get("stages_s"),
        "first_tokens": (out.get("token_ids") or [])[:8],
        "settings": out.get("settings", ""),
        "wall_s": wall_s,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": plan.request.command,  # rows added by later runs of a resumed report name their own
    }


def _run_child(job: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Run one child process; (its result, '') or (None, why it failed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgeattn.bench.child", json.dumps(job)], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(MARK) :]), ""
    if proc.returncode in (-9, 137):
        return None, "killed by SIGKILL (out of memory?)"
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-3:]
    return None, " / ".join(tail) or f"exit code {proc.returncode}"


def _job_dict(plan: Plan, job: Job, ids_dir: Path) -> dict[str, Any]:
    req = plan.request
    d = {
        "row": job.row.name,
        "backend": job.row.backend,
        "attention": job.row.attention,
        "kernels": job.row.kernels,
        "model": req.model,
        "length": job.length,
        "prompt_tokens": job.prompt_tokens,
        "threads": req.threads,
        "repeats": req.repeats,
        "new_tokens": req.new_tokens,
        "budget": req.budget,
        "chunk_size": req.chunk_size,
        "layers": req.layers,
        "device": req.device,
    }
    if job.row.backend == "llama.cpp":
        d |= {
            "gguf": str(plan.gguf),
            "weights": plan.gguf_weights,
            "ids_file": str(ids_dir / f"{job.prompt_tokens}.json"),
        }
    return d


def _write_ids(plan: Plan, ids_dir: Path) -> None:
    """The prompt's token ids for llama.cpp: the very ids edgeattn's rows prefill (same tokenizer, same text)."""
    from edgeattn import models, text

    lengths = sorted({j.prompt_tokens for j in plan.jobs if j.row.backend == "llama.cpp"})
    if not lengths:
        return
    tokenizer = models._load_tokenizer(plan.model_path)
    for n in lengths:
        (ids_dir / f"{n}.json").write_text(json.dumps(text.token_ids(tokenizer, n)))


def save(plan: Plan) -> None:
    plan.report["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_text(plan.report_path, json.dumps(plan.report, indent=1))


def run_sweep(
    plan: Plan,
    on_start: Callable[[Job], None] = lambda _j: None,
    on_done: Callable[[Job, dict[str, Any]], None] = lambda _j, _r: None,
) -> dict[str, Any]:
    """Run every job of ``plan`` one at a time, saving the report after each; returns the report.

    A row that fails is recorded with its error (and retried by the next run); it does not stop the sweep.
    """
    from edgeattn.bench import plots

    report = plan.report
    report["machine"] = machine()
    report["command"] = plan.request.command
    commands = report.setdefault("commands", [])
    if plan.request.command not in commands:
        commands.append(plan.request.command)
    report.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report["rows"] = [r for r in report["rows"] if "error" not in r]  # failed rows are run again
    prepared: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="edgeattn-bench-") as tmp:
        ids_dir = Path(tmp)
        _write_ids(plan, ids_dir)
        for job in plan.jobs:
            on_start(job)
            spec = _job_dict(plan, job, ids_dir)
            t0, load = time.perf_counter(), os.getloadavg()[0]
            out, why = None, ""
            if job.row.backend in ("ort", "tvm", "onnxruntime") and job.row.name not in prepared:
                _, why = _run_child({**spec, "mode": "prepare"})
                prepared.add(job.row.name)
                why = f"export failed: {why}" if why else ""
            if not why:
                out, why = _run_child(spec)
            wall = time.perf_counter() - t0
            record = (
                _record(plan, job, out, wall, load)
                if out is not None
                else {"row": job.row.name, "length": job.length, "error": why, "wall_s": wall}
            )
            report["rows"].append(record)
            save(plan)
            on_done(job, record)
    report["plots"] = plots.write_plots(report, plan.request.out)
    save(plan)
    return report
