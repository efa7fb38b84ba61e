"""llama.cpp as a peer: which GGUF file, whether llama-cpp-python is here, and one measured row.

llama.cpp runs the GGUF the edgeattn model was converted from (the built-in model's
Q4_K_M file from PyPI), on the same token ids, thread count and machine.  This
module runs inside the row's own child process and imports neither torch nor
transformers, so the child's peak RSS is llama.cpp's alone.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from edgeattn.runtime.measure import MIB, PeakRSS

INSTALL_HINT = (
    "install the optional `peers` extra (builds llama.cpp from source, 4-8 min on 2 cores): "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install -e ".[peers]" '
    "(README: 'llama.cpp as a peer')"
)
WARM_UP_TOKENS = 64  # as edgeattn.runtime.runner's warm-up


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp rows cannot run here (None when llama-cpp-python imports)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    return None


def gguf_of(model_dir: Path, model_arg: str | None) -> Path | None:
    """The GGUF file a model comes from: the MODEL argument itself, the source recorded by the
    conversion cache (the built-in model), or the only .gguf inside a model folder."""
    if model_arg is not None and str(model_arg).lower().endswith(".gguf"):
        return Path(model_arg).expanduser()
    marker = model_dir / "edgeattn-converted.json"
    if marker.is_file():
        source = json.loads(marker.read_text()).get("source")
        if source and Path(source).is_file():
            return Path(source)
    found = sorted(model_dir.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def weight_format(gguf_path: Path) -> str:
    """'Q4_K_M (GGUF)': the file type recorded in the GGUF header."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "GGUF"
    value = int(field.parts[field.data[0]][0])
    try:
        name = gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        name = f"file type {value}"
    return f"{name} (GGUF)"


def run_llama(
    gguf_path: Path,
    ids: list[int],
    *,
    threads: int,
    new_tokens: int,
    repeats: int,
    flash_attn: bool = False,
    n_batch: int = 512,
) -> dict[str, Any]:
    """Warm up, then ``repeats`` x (prefill ``ids``, greedy decode): the same protocol as edgeattn's runner.

    The first new token comes from the prefill's logits and each next one from one
    decode step, as in ``edgeattn.runtime.runner.greedy``.
    """
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=len(ids) + new_tokens,
        n_batch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    llm.reset()
    llm.eval(ids[:WARM_UP_TOKENS])
    llm.eval([last_token()])
    prefill_s, prefill_cpu_s, decode_tok_s, peaks, tokens = [], [], [], [], []
    for _ in range(repeats):
        llm.reset()
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            llm.eval(ids)
            prefill_s.append(time.perf_counter() - t0)
            prefill_cpu_s.append(time.process_time() - c0)
            tokens = [last_token()]
            t1 = time.perf_counter()
            while len(tokens) < new_tokens:
                llm.eval([tokens[-1]])
                tokens.append(last_token())
            t_dec = time.perf_counter() - t1
        decode_tok_s.append((len(tokens) - 1) / t_dec if len(tokens) > 1 and t_dec > 0 else None)
        peaks.append(mem.peak / MIB)
    version = getattr(llama_cpp, "__version__", "?")
    return {
        "prefill_s": prefill_s,
        "prefill_cpu_s": prefill_cpu_s,
        "decode_tok_s": decode_tok_s,
        "measured_peak_rss_mib": max(peaks),
        "token_ids": tokens,
        "settings": f"llama-cpp-python {version}, n_batch {n_batch}, n_ubatch {min(n_batch, 512)}, "
        f"flash_attn {'on' if flash_attn else 'off'}, mmap on, n_ctx {len(ids) + new_tokens}",
    }
