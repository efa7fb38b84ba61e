"""Tuning records: which CPU schedule a kernel is built with, read from ``kernels_tvm/tuning/<profile>.json``.

The tuner (tune.py) writes these files; the kernel builder (cpu.py) reads them.  Both import
this module and it imports neither, so the records do not tie the builder, the tuner and the
registry in an import loop.  Log lines go to the tuner's logger, ``edgeattn.kernels_tvm.tune``:
one place to listen for "which schedule, and why".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from edgeattn.atomic import write_text

from .abi import OP_DENSE, OP_SPARSE, KernelSpec
from .schedule import CpuSchedule

log = logging.getLogger("edgeattn.kernels_tvm.tune")

FORMAT = "edgeattn-cpu-tuning/1"
ENV_DIR = "EDGEATTN_TUNING_DIR"
TUNED_OPS = (OP_DENSE, OP_SPARSE)
CPU_PROFILES = ("x86-host", "arm64", "arm-a76", "arm-a78ae")
SHAPE_FIELDS = ("heads_q", "heads_kv", "head_dim", "dtype", "decode")
RETUNE = "python -m edgeattn.kernels_tvm.tune --target {profile}"


class TuningRecordError(ValueError):
    """A record file that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------ records: where, what, when


def records_dir() -> Path:
    """The folder of the record files: ``$EDGEATTN_TUNING_DIR`` or ``kernels_tvm/tuning`` (package data)."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(__file__).resolve().parent / "tuning"


def record_path(profile: str) -> Path:
    return records_dir() / f"{profile}.json"


def profile_of(target: Any) -> str | None:
    """The CPU target profile an LLVM target belongs to (None: not a CPU profile with records)."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", ""))
    if not triple or triple.startswith("x86_64"):
        return "x86-host"
    if triple.startswith("aarch64"):
        mcpu = str(target.attrs.get("mcpu", ""))
        return {"cortex-a72": "arm-a72", "cortex-a76": "arm-a76", "cortex-a78ae": "arm-a78ae"}.get(mcpu, "arm64")
    return None


def target_mcpu(target: Any) -> str:
    return str(target.attrs.get("mcpu", "")) or "generic"


def shape_key(spec: KernelSpec) -> dict[str, Any]:
    """What a record is for: op and the static shape (scaling/softcap/window do not move the best tiles)."""
    return {"op": spec.op, **{f: getattr(spec, f) for f in SHAPE_FIELDS}}


def schedule_problem(spec: KernelSpec, sch: CpuSchedule) -> str | None:
    """Why ``sch`` cannot build ``spec`` (the loop nest's divisibility rules), or None when it can."""
    g, d, vl = spec.group, spec.head_dim, sch.lanes
    checks = [
        (sch.qt % vl == 0, f"qt={sch.qt} is not a multiple of lanes={vl}"),
        (sch.rb % vl == 0 and 0 < sch.rb <= g * sch.qt, f"rb={sch.rb} must be a multiple of {vl} and <= R"),
        (sch.db % vl == 0 and d % sch.db == 0, f"db={sch.db} must be a multiple of {vl} dividing D={d}"),
        (sch.kt % sch.jb == 0, f"kt={sch.kt} is not a multiple of jb={sch.jb}"),
        (0 < sch.ri <= g * sch.qt, f"ri={sch.ri} must be in [1, R]"),
        (sch.par >= 1, f"par={sch.par} must be >= 1"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def _bad(path: Path, why: str) -> TuningRecordError:
    profile = path.stem if path.stem in CPU_PROFILES else "<profile>"
    return TuningRecordError(
        f"tuning record file {path}: {why}. Fix: delete it (the default schedules are then used) or "
        f"re-create it with `{RETUNE.format(profile=profile)}`"
    )


def _schedule_from(path: Path, knobs: Any) -> CpuSchedule:
    names = {f.name for f in fields(CpuSchedule)}
    if not isinstance(knobs, dict) or set(knobs) - names:
        raise _bad(path, f"schedule {knobs!r} has knobs outside {sorted(names)}")
    bad = [k for k, v in knobs.items() if type(v) is not type(getattr(CpuSchedule(), k))]
    if bad:
        raise _bad(path, f"schedule knobs {bad} have the wrong type in {knobs!r}")
    return CpuSchedule(**knobs)


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of one file, validated (TuningRecordError naming the file otherwise); [] if absent."""
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"not readable JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(path, f'not an edgeattn tuning record file (expected "format": "{FORMAT}")')
    if doc.get("target") != path.stem:
        raise _bad(path, f"holds records for target {doc.get('target')!r}, but its name says {path.stem!r}")
    recs = doc.get("records")
    if not isinstance(recs, list):
        raise _bad(path, '"records" must be a list')
    for i, rec in enumerate(recs):
        need = ("op", "shape", "choice", "schedule", "cpu_model", "mcpu")
        if not isinstance(rec, dict) or any(k not in rec for k in need):
            raise _bad(path, f"record {i} lacks one of {need}")
        if rec["op"] not in TUNED_OPS or rec["choice"] not in ("tuned", "default"):
            raise _bad(path, f"record {i}: op {rec['op']!r} / choice {rec['choice']!r} unknown")
        if not isinstance(rec["shape"], dict) or set(rec["shape"]) != set(SHAPE_FIELDS):
            raise _bad(path, f"record {i}: shape must have exactly {SHAPE_FIELDS}")
        _schedule_from(path, rec["schedule"])
    return recs


def find_records(records: list[dict[str, Any]], spec: KernelSpec) -> list[dict[str, Any]]:
    """The records for ``spec``'s op and shape (one per CPU they were measured on)."""
    key = shape_key(spec)
    return [rec for rec in records if {"op": rec["op"], **rec["shape"]} == key]


def tuned_schedule(spec: KernelSpec, target: Any, lanes: int) -> tuple[CpuSchedule | None, Path | None]:
    """The schedule a matching record picked for ``spec`` on ``target`` (None: use the default).

    ``lanes``: the target's vector width as the default schedule sees it; a record made for
    another width does not apply.  Raises TuningRecordError for a corrupt or foreign file.
    """
    from edgeattn.runtime.measure import cpu_model

    profile = profile_of(target)
    if spec.op not in TUNED_OPS or profile is None:
        return None, None
    path = record_path(profile)
    recs = find_records(load_records(path), spec)
    what = f"{spec.op} {shape_key(spec)} on {profile}"
    if not recs:
        log.debug("%s: no tuning record in %s: default schedule", what, path)
        return None, None
    mcpu, model = target_mcpu(target), cpu_model()
    # x86-host: the same knobs can be slower on another CPU, so the CPU model must match too
    match = [r for r in recs if r["mcpu"] == mcpu and (profile != "x86-host" or r["cpu_model"] == model)]
    if not match:
        seen = sorted({f"{r['cpu_model']} ({r['mcpu']})" for r in recs})
        log.debug(
            "%s: records in %s were measured on %s, not on %s (%s): default schedule", what, path, seen, model, mcpu
        )
        return None, None
    rec = match[-1]
    if rec["choice"] == "default":
        log.debug("%s: record in %s says the default schedule is best here", what, path)
        return None, None
    sch = _schedule_from(path, rec["schedule"])
    if sch.lanes != lanes:
        log.debug("%s: record in %s has %d lanes, target %d: default schedule", what, path, sch.lanes, lanes)
        return None, None
    problem = schedule_problem(spec, sch)
    if problem:
        raise _bad(path, f"record for {what} cannot build: {problem}")
    log.debug("%s: tuned schedule from %s: %s", what, path, sch)
    return sch, path


def write_records(path: Path, profile: str, new: list[dict[str, Any]]) -> None:
    """Merge ``new`` into the file (a record replaces the one with the same key), atomically."""
    keep = [r for r in load_records(path) if not any(_same_key(r, n) for n in new)]
    doc = {"format": FORMAT, "target": profile, "records": keep + new}
    write_text(path, json.dumps(doc, indent=1) + "\n")


def _same_key(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["op"], a["shape"], a["mcpu"], a["cpu_model"]) == (b["op"], b["shape"], b["mcpu"], b["cpu_model"])
