"""`edgeattn run` on this machine: plan, load, open one session per row, run them, report.

The CLI parses options into a :class:`RunRequest` and prints what
:func:`run_on_host` returns; everything between lives here.  Checks that can
fail without allocating anything (context length, the memory budget against
the weights) run before the model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeattn.config import DEFAULT_KERNELS, AttentionConfig, ConfigError
from edgeattn.export.quantize import TVM_NOT_YET, WeightFormat
from edgeattn.runtime import memory
from edgeattn.runtime.measure import rss_bytes
from edgeattn.runtime.runner import RunResult, report_header, run_session

BACKENDS = ("torch", "ort", "tvm")


@dataclass
class RunRequest:
    """Everything `edgeattn run` was asked, already parsed."""

    configs: list[AttentionConfig]
    model: str | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    synthetic_length: int | None = None
    haystack: Path | None = None
    default_prompt_tokens: int = 8192
    layers: str = "global"
    max_new_tokens: int = 32
    threads: int = 1
    backends: list[str] = field(default_factory=list)  # empty: torch for model folders, ort for .onnx files
    kernels: str = DEFAULT_KERNELS
    memory_budget: int | None = None
    shipped_baseline: bool = True  # add the model as shipped (transformers SDPA) as a row
    ort_dense_op: str | None = None  # export option for the ort backend's dense layers (None: by --kernels)
    device: str = "host"  # a device profile name (edgeattn devices list): rows run there over TVM RPC
    tracker: str | None = None  # HOST:PORT of a TVM RPC tracker, overriding the profile's
    key: str | None = None  # the device key at that tracker
    weights: WeightFormat = field(default_factory=WeightFormat)  # the ort backend's export: fp32, int4, gguf, ...
    kv_dtype: str = "float32"  # the torch backend's KV cache: float32 or float16 (runtime/kv_cache.py)


def kernels_available() -> str:
    """'tvm' when TVM imports here, else 'reference' (the report header says which ran)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "reference"
    return "tvm"


def _check_request(req: RunRequest) -> None:
    from edgeattn.patching import KERNELS

    if req.kernels not in KERNELS:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNELS)}, got {req.kernels!r}")
    for b in req.backends:
        if b not in BACKENDS:
            raise ConfigError(f"--backend takes a comma list of {', '.join(BACKENDS)}; got {b!r}")
    if req.synthetic_length is not None and req.synthetic_length < 1:
        raise ConfigError(f"--synthetic-length must be >= 1, got {req.synthetic_length}")
    given = [x is not None for x in (req.prompt, req.prompt_file, req.synthetic_length)]
    if sum(given) > 1:
        raise ConfigError("give only one of --prompt, --prompt-file, --synthetic-length")
    if req.weights.kind != "fp32":
        if exported_file(req.model) is not None or artifact_folder(req.model) is not None:
            raise ConfigError(f"--weights applies when edgeattn exports the model; {req.model} already has its weights")
        if req.weights.quantized and "tvm" in req.backends:
            raise ConfigError(TVM_NOT_YET.format(label=req.weights.label))
        if set(req.backends or ["torch"]) - {"ort", "tvm"}:
            raise ConfigError(
                f"--weights {req.weights.label} runs the exported file: add --backend ort (the torch backend runs "
                "the model's own float weights)"
            )
        if req.device != "host":
            raise ConfigError(f"--weights {req.weights.label} runs on this machine's ort backend; leave out --device")
    _check_kv_dtype(req)
    if req.prompt_file is not None and not req.prompt_file.is_file():
        raise FileNotFoundError(f"--prompt-file {req.prompt_file}: no such file")


def _check_kv_dtype(req: RunRequest) -> None:
    """A float16 KV cache is the torch backend's (its cache, our CPU kernels); say where else it is not."""
    from edgeattn.runtime.kv_cache import KV_DTYPES

    if req.kv_dtype not in KV_DTYPES:
        raise ConfigError(f"--kv-dtype takes {' or '.join(KV_DTYPES)}, got {req.kv_dtype!r}")
    if req.kv_dtype == "float32":
        return
    others = set(req.backends or ["torch"]) - {"torch"}
    if others or exported_file(req.model) is not None or artifact_folder(req.model) is not None:
        raise ConfigError(
            f"--kv-dtype {req.kv_dtype} runs on --backend torch only: the exported graph's KV cache has the "
            "graph's dtype (export with --weights fp16 for a float16 graph, cache included)"
        )
    if req.device != "host":
        raise ConfigError(f"--kv-dtype {req.kv_dtype} runs on this machine's torch backend; leave out --device")


def prompt_ids(req: RunRequest, tokenizer: Any, path: Path) -> list[int]:
    from edgeattn import text

    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer files; add tokenizer.json (or use the built-in model)")
    prompt = req.prompt_file.read_text(errors="replace") if req.prompt_file is not None else req.prompt
    if prompt is not None:
        ids = tokenizer(prompt).input_ids
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids
    source = text.haystack_dir(req.haystack) if req.haystack is not None else None
    return text.token_ids(tokenizer, req.synthetic_length or req.default_prompt_tokens, source)


def run_on_host(
    req: RunRequest, log: Callable[[str], None] = lambda _m: None, loaded: Any = None
) -> tuple[dict[str, Any], list[RunResult]]:
    """Run every (backend, attention) row of ``req`` on this machine, in one process.

    ``loaded`` reuses a model already in memory (tests, benchmarks) instead of loading ``req.model``.
    """
    from transformers import AutoConfig

    from edgeattn import models
    from edgeattn.runtime.threads import set_threads

    _check_request(req)
    set_threads(req.threads)
    onnx_file = exported_file(req.model)
    if onnx_file is not None:
        return _run_exported(req, onnx_file, log)
    if artifact_folder(req.model) is not None:
        return _run_artifact(req, Path(str(req.model)), log)
    if req.device != "host":
        from edgeattn.devices.profiles import get_profile

        get_profile(req.device)  # an unknown device is refused before anything loads
        if set(req.backends) - {"tvm"}:
            raise ConfigError(f"--device {req.device} runs the compiled model: use --backend tvm (or leave it out)")
        req.backends = ["tvm"]
        req.shipped_baseline = False
    if not req.backends:
        req.backends = ["torch"]
    path = loaded.path if loaded is not None else models.resolve(req.model)
    models.check_hf_dir(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    fp = memory.footprint_of(hf_config, kernels=req.kernels)
    # the runtime before the weights: a model passed in is already part of the RSS
    _refuse_before_loading(req, fp, max(0, rss_bytes() - (fp.weights if loaded is not None else 0)))

    loaded = loaded if loaded is not None else models.load(req.model)
    ids = prompt_ids(req, loaded.tokenizer, path)
    memory.check_context(fp, len(ids), req.max_new_tokens)
    granularity = max((c.chunk_size for c in req.configs), default=1)
    header = report_header(
        loaded.name,
        req.threads,
        req.memory_budget,
        budget=req.configs[0].budget if req.configs else None,
        chunk_size=req.configs[0].chunk_size if req.configs else None,
        chunking=req.configs[0].chunking if req.configs else None,
        observe=req.configs[0].observe if req.configs else None,
        kernels=req.kernels,
        layers=req.layers,
        weights=req.weights.label,
        kv_dtype=req.kv_dtype,
    )
    if req.device != "host":
        from edgeattn.runtime.device_run import run_on_device

        header["device"] = req.device
        return header, run_on_device(req, loaded, ids, hf_config, log, _measure)
    results: list[RunResult] = []
    for session, layers in _sessions(req, loaded):
        manifest = getattr(session, "manifest", None)
        kv_bytes = 2 if session.info.backend == "torch" and req.kv_dtype == "float16" else None
        row_fp = _footprint(hf_config, manifest, session.info.backend, session.info.kernels, kv_bytes)
        results.append(_measure(req, session, ids, hf_config, row_fp, granularity, loaded.tokenizer, log, layers))
    return header, results


def _footprint(
    hf_config: Any, manifest: dict[str, Any] | None, backend: str, kernels: str, kv_bytes: int | None = None
) -> memory.Footprint:
    """The row's footprint; an exported file holds its own weights (quantized, fp16): their bytes, not fp32's.

    ``kv_bytes``: bytes per cached K/V value when the cache is stored apart from the model's dtype."""
    onnx_info = (manifest or {}).get("onnx") or {}
    dtype_bytes = 2 if onnx_info.get("dtype") == "float16" else 4
    fp = memory.footprint_of(hf_config, dtype_bytes=dtype_bytes, backend=backend, kernels=kernels, kv_bytes=kv_bytes)
    return replace(fp, weights=int(onnx_info["weight_bytes"])) if onnx_info.get("weight_bytes") else fp


def _refuse_before_loading(req: RunRequest, fp: memory.Footprint, runtime_bytes: int) -> None:
    """Checks that need no model in memory: a requested length beyond the context, a budget below the weights."""
    if req.synthetic_length is not None:  # known before loading: refuse 10M tokens before allocating them
        memory.check_context(fp, req.synthetic_length, req.max_new_tokens)
    memory.check_weights_fit(fp, runtime_bytes, req.memory_budget)


def exported_file(model: str | None) -> Path | None:
    """The .onnx file a MODEL argument names, if it names one (ort and tvm backends run it as it is)."""
    if model is not None and str(model).endswith(".onnx"):
        return Path(model)
    return None


def artifact_folder(model: str | None) -> Path | None:
    """The compiled TVM artifact folder a MODEL argument names (`edgeattn compile` writes them), if it names one."""
    if model is None:
        return None
    from edgeattn.runtime.artifact_format import MANIFEST

    path = Path(str(model))
    return path if path.is_dir() and (path / MANIFEST).is_file() and not (path / "config.json").is_file() else None


def _source_of_export(path: Path, manifest: dict[str, Any]) -> Path:
    """The HF directory an export was made from: its tokenizer and config describe the file."""
    from edgeattn import models

    name = manifest.get("model", {}).get("name")
    try:
        return models.resolve(name)
    except Exception as err:
        raise ConfigError(
            f"{path} was exported from {name!r}, which is not on this machine, so there is no tokenizer for it; "
            "copy that model here (or export from one that is)"
        ) from err


def _run_exported(req: RunRequest, path: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], list[RunResult]]:
    """`edgeattn run model.onnx`: the file's own attention, on the ort (default) or tvm backend."""
    from edgeattn.runtime import ort_backend

    backends = req.backends or ["ort"]
    if "torch" in backends:
        raise ConfigError(f"{path} is an ONNX file: run it with --backend ort or tvm (torch runs model folders)")
    manifest = ort_backend.check_export(path)  # a mismatched or corrupt file stops here, before any load
    run = _prepare_file_run(req, path, manifest, backend="ort", kernels=req.kernels)
    hf_config, fp, tokenizer, ids, attention, header = run
    results = []
    for backend in backends:
        if backend == "ort":
            session = ort_backend.open_session(path, kernels=req.kernels, threads=req.threads)
        else:
            from edgeattn.runtime import tvm_backend

            session = tvm_backend.open_session(path, threads=req.threads)
        results.append(_measure(req, session, ids, hf_config, fp, attention.get("chunk_size") or 1, tokenizer, log))
    return header, results


def _measure(
    req: RunRequest,
    session: Any,
    ids: list[int],
    hf_config: Any,
    fp: memory.Footprint,
    granularity: int,
    tokenizer: Any,
    log: Callable[[str], None],
    layers: list[int] | None = None,
) -> RunResult:
    """One row: plan after the warm-up, run, close; warns if the measured peak broke the budget."""

    def plan(resident: int) -> memory.MemoryPlan:
        made = memory.plan_run(fp, len(ids), req.max_new_tokens, resident, req.memory_budget, granularity)
        log(f"{session.info.backend}/{session.info.attention} ({session.info.kernels}): {made.describe()}")
        return made

    try:
        row = run_session(
            session,
            ids,
            plan,
            req.max_new_tokens,
            vocab=hf_config.vocab_size,
            eos=getattr(hf_config, "eos_token_id", None),
            decode_text=(lambda t: tokenizer.decode(t, skip_special_tokens=True)) if tokenizer else None,
            layers=layers,
            progress=lambda done, total: log(
                f"{session.info.backend}/{session.info.attention}: prefilled {done}/{total}"
            ),
        )
    finally:
        session.close()
    if req.memory_budget and row.peak_rss_mib * memory.MIB > req.memory_budget:
        log(
            f"warning: measured peak {row.peak_rss_mib:.0f} MiB exceeded the budget "
            f"{req.memory_budget / memory.MIB:.0f} MiB (plan {row.planned_peak_mib:.0f} MiB)"
        )
    return row


def _sessions(req: RunRequest, loaded: Any):
    """(session, sparse layers) per report row, opened one at a time (each holds its own state)."""
    from edgeattn.runtime.torch_backend import TorchSession

    if req.shipped_baseline:
        yield TorchSession(loaded, AttentionConfig(kind="dense"), as_shipped=True), []
    for backend in req.backends:
        for cfg in req.configs:
            boundary_fn = _boundary_fn(cfg, loaded)
            if backend == "torch":
                s = TorchSession(
                    loaded, cfg, kernels=req.kernels, layers=req.layers, boundary_fn=boundary_fn, kv_dtype=req.kv_dtype
                )
                yield s, (s.layers if cfg.kind != "dense" else [])
            elif backend == "ort":
                yield _ort_session(req, loaded, cfg), []
            else:
                yield _tvm_session(req, loaded, cfg), []


def _boundary_fn(cfg: AttentionConfig, loaded: Any) -> Any:
    if cfg.kind != "dhsa" or cfg.chunking == "fixed":
        return None
    from edgeattn import chunking

    return chunking.boundary_fn_for(cfg, loaded)


def _prepare_file_run(req: RunRequest, path: Path, described: dict[str, Any], backend: str, kernels: str) -> tuple:
    """What a run of an .onnx export or a compiled artifact needs before its session opens.

    ``described`` is the part of the file's manifest naming the source model and its attention;
    the source model's folder gives the config (for the memory plan) and the tokenizer.
    Returns (hf_config, footprint, tokenizer, prompt ids, attention, report header).
    """
    from transformers import AutoConfig

    from edgeattn import models
    from edgeattn.export.quantize import format_of_manifest

    source = _source_of_export(path, described)
    hf_config = AutoConfig.from_pretrained(str(source))
    fp = _footprint(hf_config, described, backend, kernels)
    _refuse_before_loading(req, fp, rss_bytes())
    tokenizer = models._load_tokenizer(source) if models._has_tokenizer(source) else None
    ids = prompt_ids(req, tokenizer, source)
    memory.check_context(fp, len(ids), req.max_new_tokens)
    attention = described.get("attention") or {}
    header = report_header(
        str(path),
        req.threads,
        req.memory_budget,
        budget=attention.get("budget"),
        chunk_size=attention.get("chunk_size"),
        chunking=attention.get("chunking"),
        observe=attention.get("observe"),
        kernels=kernels,
        weights=format_of_manifest(described.get("onnx") or {}).label,
    )
    return hf_config, fp, tokenizer, ids, attention, header


def _run_artifact(req: RunRequest, path: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], list[RunResult]]:
    """`edgeattn run ARTIFACT_DIR`: a compiled model as it is, on the tvm backend (its own attention)."""
    from edgeattn.runtime import tvm_backend

    if set(req.backends) - {"tvm"}:
        raise ConfigError(f"{path} is a compiled TVM artifact: it runs on --backend tvm only (leave --backend out)")
    if req.device != "host":
        raise ConfigError(
            f"{path} is an artifact for this machine; to run on {req.device}, pass the model or its .onnx export "
            f"(edgeattn run MODEL --device {req.device} compiles and caches the artifact for that device)"
        )
    manifest = tvm_backend.read_manifest(path)  # wrong target, TVM version or a damaged manifest stop here
    hf_config, fp, tokenizer, ids, attention, header = _prepare_file_run(
        req, path, manifest.get("export") or {}, backend="tvm", kernels="tvm"
    )
    limit = int(manifest.get("max_context") or 0)
    if len(ids) + req.max_new_tokens > limit:
        raise ConfigError(
            f"{path} was compiled for at most {limit} tokens, and this run needs {len(ids)} + {req.max_new_tokens}; "
            "use a shorter prompt or compile again with a larger --max-context"
        )
    session = tvm_backend.open_session(path, threads=req.threads)  # files checked by sha256 before loading
    return header, [_measure(req, session, ids, hf_config, fp, attention.get("chunk_size") or 1, tokenizer, log)]


def _ort_session(req: RunRequest, loaded: Any, cfg: AttentionConfig) -> Any:
    from edgeattn.runtime import ort_backend

    # on our kernels the dense and sliding layers are DenseFlashAttention nodes too: no L x L mask anywhere
    dense_op = req.ort_dense_op or ("edgeattn" if req.kernels == "tvm" else "onnx")
    path = ort_backend.cached_export(loaded, cfg, layers=req.layers, dense_op=dense_op, weights=req.weights)
    return ort_backend.open_session(path, kernels=req.kernels, threads=req.threads)


def _tvm_session(req: RunRequest, loaded: Any, cfg: AttentionConfig) -> Any:
    from edgeattn.runtime import ort_backend, tvm_backend

    path = ort_backend.cached_export(loaded, cfg, layers=req.layers, weights=req.weights)  # fp32/fp16 only
    return tvm_backend.open_session(path, threads=req.threads)
