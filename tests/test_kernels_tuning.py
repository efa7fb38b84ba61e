"""Tuning records for the CPU attention kernels (kernels_tvm/tune.py): lookup, errors, a real short run.

Tiny shapes (Hq=2, Hkv=1, D=32) so every compile takes a second or two.  Each test points
``$EDGEATTN_TUNING_DIR`` at its own folder, so the records committed in kernels_tvm/tuning
never leak into (or out of) these tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import pytest
import torch
import tvm

from edgeattn import dhsa
from edgeattn.config import AttentionConfig
from edgeattn.kernels_tvm import cpu, registry, tune, tuning_records
from edgeattn.kernels_tvm.abi import OP_DENSE, OP_SPARSE, KernelSpec
from edgeattn.runtime.measure import cpu_model

DIMS = dict(heads_q=2, heads_kv=1, head_dim=32)
SPEC = KernelSpec(op=OP_DENSE, **DIMS)


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_records.ENV_DIR, str(tmp_path))
    return tmp_path


def host():
    return registry.host_target()


def tuned_knobs() -> cpu.CpuSchedule:
    """A valid schedule that differs from the default (so 'applied' is observable)."""
    default = cpu.default_schedule(SPEC, host())
    other = replace(default, qt=default.lanes * 2, kt=16, par=16, prefetch=not default.prefetch)
    assert other != default and tuning_records.schedule_problem(SPEC, other) is None
    return other


def write_file(folder, records, target="x86-host", name="x86-host.json"):
    path = folder / name
    path.write_text(json.dumps({"format": tuning_records.FORMAT, "target": target, "records": records}))
    return path


def record(sch: cpu.CpuSchedule, model: str, choice: str = "tuned", spec: KernelSpec = SPEC) -> dict:
    return {
        "op": spec.op,
        "shape": {f: getattr(spec, f) for f in tuning_records.SHAPE_FIELDS},
        "choice": choice,
        "schedule": asdict(sch),
        "cpu_model": model,
        "mcpu": tuning_records.target_mcpu(host()),
    }


def dense_ref(q, k, v):
    return dhsa.attention(q[None].double(), k[None].double(), v[None].double(), AttentionConfig(kind="dense"))[0]


def run_dense(kern, length=77):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(h, length, DIMS["head_dim"], generator=g) for h in (2, 1, 1))
    out = registry.empty((2, length, DIMS["head_dim"])).fill_(float("nan"))
    kern(q, k, v, out)
    ref = dense_ref(q, k, v)
    return float((out.double() - ref).abs().max() / ref.abs().max())


def test_record_applies_only_on_the_cpu_it_was_measured_on(records, caplog) -> None:
    sch = tuned_knobs()
    write_file(records, [record(sch, cpu_model())])
    with caplog.at_level(logging.DEBUG, logger="edgeattn.kernels_tvm.tune"):
        got, source = cpu.schedule_and_source(SPEC, host())
    assert got == sch and source.startswith("tuned") and "x86-host.json" in source
    assert "tuned schedule from" in caplog.text
    kern = registry.get_kernel(OP_DENSE, host(), **DIMS)
    assert kern.schedule == sch and kern.schedule_source.startswith("tuned")
    assert run_dense(kern) < 1e-4

    # the same file measured on another CPU model: defaults, and the log says why
    write_file(records, [record(sch, "Some Other CPU 9000")])
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edgeattn.kernels_tvm.tune"):
        got, source = cpu.schedule_and_source(SPEC, host())
    assert got == cpu.default_schedule(SPEC, host()) and source == "default"
    assert "Some Other CPU 9000" in caplog.text
    default_kern = registry.get_kernel(OP_DENSE, host(), **DIMS)
    # the cache key holds the schedule: the default kernel is not the tuned one
    assert default_kern is not kern and default_kern.schedule_source == "default"


def test_default_is_best_record_and_other_shapes_keep_defaults(records) -> None:
    sch = tuned_knobs()
    write_file(records, [record(sch, cpu_model(), choice="default")])
    assert cpu.schedule_and_source(SPEC, host()) == (cpu.default_schedule(SPEC, host()), "default")
    other = SPEC.with_(head_dim=64)
    write_file(records, [record(sch, cpu_model())])
    assert cpu.schedule_and_source(other, host())[1] == "default"
    sparse = SPEC.with_(op=OP_SPARSE)
    assert cpu.schedule_and_source(sparse, host())[1] == "default"


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"format": "something-else", "target": "x86-host", "records": []}), "not an edgeattn tuning"),
        (json.dumps({"format": tuning_records.FORMAT, "target": "arm-a76", "records": []}), "holds records for target"),
        (
            json.dumps({"format": tuning_records.FORMAT, "target": "x86-host", "records": [{"op": OP_DENSE}]}),
            "lacks one of",
        ),
    ],
)
def test_corrupt_or_foreign_file_is_a_clear_error(records, content, fragment) -> None:
    path = records / "x86-host.json"
    path.write_text(content)
    with pytest.raises(tuning_records.TuningRecordError) as info:
        registry.get_kernel(OP_DENSE, host(), **DIMS)
    msg = str(info.value)
    assert str(path) in msg and fragment in msg and "python -m edgeattn.kernels_tvm.tune --target x86-host" in msg


def test_unknown_knob_or_unbuildable_schedule_is_an_error(records) -> None:
    bad = record(tuned_knobs(), cpu_model())
    bad["schedule"]["unroll"] = 4
    write_file(records, [bad])
    with pytest.raises(tuning_records.TuningRecordError, match="knobs outside"):
        cpu.schedule_for(SPEC, host())
    wrong = record(replace(tuned_knobs(), jb=3, kt=16), cpu_model())  # kt not a multiple of jb
    write_file(records, [wrong])
    with pytest.raises(tuning_records.TuningRecordError, match="cannot build"):
        cpu.schedule_for(SPEC, host())


# slow: compiles and times a dozen candidates; the tuner's check-and-time path runs in CI on the emulated
# device (tests/test_emulated_arm64.py), and the record logic above needs no tuning run
@pytest.mark.slow
def test_short_real_tuning_run_writes_a_valid_file_atomically(records, monkeypatch) -> None:
    monkeypatch.setenv("TVM_NUM_THREADS", "2")  # main() sets it; restored afterwards
    out = records / "x86-host.json"
    argv = ["--target", "x86-host", "--op", "dense", "--length", "128", "--trials", "2", "--repeats", "1"]
    argv += ["--heads-q", "2", "--head-dim", "32", "--out", str(out)]
    assert tune.main(argv) == 0
    assert sorted(p.name for p in records.iterdir()) == ["x86-host.json"]  # no temp file left
    (rec,) = tuning_records.load_records(out)
    assert rec["op"] == OP_DENSE and rec["candidates"] == 2 and rec["cpu_model"] == cpu_model()
    assert rec["choice"] in ("tuned", "default") and rec["threads"] == 2 and rec["tvm_version"] == tvm.__version__
    assert len(rec["time_s"]["default"]) == 2 and all(t > 0 for t in rec["time_s"]["default"])
    chosen = cpu.CpuSchedule(**rec["schedule"])
    assert cpu.schedule_for(SPEC, host()) == chosen  # what the file says is what gets built
    lib = registry.compile_module(cpu.build(SPEC, host(), chosen), host())
    kern = registry.CompiledKernel(spec=SPEC, target=host(), lib=lib)
    assert run_dense(kern, length=131) < 1e-4

    # a write that fails half-way leaves the old file as it was and no temp file behind
    before = out.read_bytes()

    from edgeattn import atomic

    real_fdopen = atomic.os.fdopen

    def half_written(fd, mode):  # writes half of the text, then the disk is full
        f = real_fdopen(fd, mode)
        write = f.write

        def write_half(text):
            write(text[: len(text) // 2])
            raise OSError("disk full")

        f.write = write_half
        return f

    monkeypatch.setattr(atomic.os, "fdopen", half_written)
    with pytest.raises(OSError, match="disk full"):
        tuning_records.write_records(out, "x86-host", [rec])
    assert out.read_bytes() == before and sorted(p.name for p in records.iterdir()) == ["x86-host.json"]


def test_candidates_fit_the_registers_and_build_rules() -> None:
    target = host()
    seen = list(tune.candidates(SPEC, lambda: cpu.default_schedule(SPEC, target), target))
    assert len(seen) > 10
    nregs = tune.vector_registers(cpu.default_schedule(SPEC, target).lanes, target)
    for _, s in seen:
        assert tuning_records.schedule_problem(SPEC, s) is None
        assert s.jb * (s.rb // s.lanes) + s.rb // s.lanes + 1 <= nregs
        assert s.ri * (s.db // s.lanes) + s.db // s.lanes + 1 <= nregs


def test_profile_of_targets_and_arm_needs_the_device(capsys) -> None:
    from edgeattn.kernels_tvm.targets import get_target

    assert tuning_records.profile_of(host()) == "x86-host"
    assert tuning_records.profile_of(get_target("arm-a76")) == "arm-a76"
    assert tuning_records.profile_of(get_target("arm-a78ae")) == "arm-a78ae"
    assert tuning_records.profile_of(get_target("arm64")) == "arm64"
    assert tuning_records.profile_of(tvm.target.Target({"kind": "cuda", "arch": "sm_87"})) is None
    with pytest.raises(SystemExit) as info:
        tune.parse_args(["--target", "arm-a76"])
    assert info.value.code == 2 and "--rpc" in capsys.readouterr().err


def test_device_that_does_not_answer_is_a_clear_error(capsys) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = tune.main(["--target", "arm64", "--rpc", f"127.0.0.1:{port}", "--length", "64", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"no TVM RPC server answers at 127.0.0.1:{port}" in err and "rpc_server" in err


def test_sparse_problem_checks_the_default_schedule_against_its_own_selection() -> None:
    """The tuner's sparse check compares with the reference of the selection its kernel made (the paper's):
    while the reference took the default observation window, every sparse candidate, the default too, was
    'wrong' and `tune --op sparse` stopped before timing anything."""
    spec = KernelSpec(op=OP_SPARSE, query_tile=tune.CHUNK, sinks=tune.SINKS, **DIMS)
    problem = tune.make_problem(spec, length=256, check_length=133)
    runner = tune.Runner(host())
    lib = runner.load(spec, cpu.default_schedule(spec, host()))
    assert runner.check(lib, spec, problem, tol=1e-4) < 1e-4
