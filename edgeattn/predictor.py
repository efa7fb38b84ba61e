"""The trained boundary predictor (DHSA's design) and its file format.

For every position t the network looks at the ``window`` keys left of t and
the ``window`` keys from t on, encodes each side by attention pooling (a
learned query over projected keys, with learned position embeddings), fuses
the two summaries with their difference, product and cosine similarity, and
scores "a chunk starts at t" with a small MLP.  Input features are the
per-head unit-normalised keys of one layer (:func:`edgeattn.chunking.key_features`),
so one network can serve every global layer of a model.

A predictor file is a safetensors file whose metadata hold a format name and
version, the network config (JSON), the model it was calibrated for, and a
SHA-256 of the tensors: loading checks all of them, so a truncated, edited or
foreign file is a clear error rather than silent garbage boundaries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeattn.errors import EdgeAttnError

FORMAT_NAME = "edgeattn-boundary-predictor"
FORMAT_VERSION = 1
FILE_NAME = "boundary_predictor.safetensors"
SHIPPED_PATH = Path(__file__).resolve().parent / "data" / "gemma3-270m-boundary-predictor.safetensors"
SHIPPED_CARD = SHIPPED_PATH.with_suffix(".json")


class PredictorFileError(EdgeAttnError):
    """A predictor file that cannot be used; the message says why and how to get a good one."""


@dataclass(frozen=True)
class PredictorConfig:
    """Shape of the network; stored in every file so a file rebuilds its own network."""

    in_dim: int = 256  # kv_heads * head_dim of the model's keys
    hidden: int = 64  # width of the projected keys / context summaries
    window: int = 8  # keys on each side of a position
    mlp: int = 64  # hidden units of the scoring MLP
    threshold: float = 0.0  # logit above which a position is a boundary (tuned for F1 on held-out data)
    model: dict[str, Any] = field(default_factory=dict)  # what it was calibrated for (name, fingerprint)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PredictorConfig:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**data)


class _SidePooling(nn.Module):
    """Attention pooling of a window of projected keys into one vector per position."""

    def __init__(self, hidden: int, window: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden))
        self.position = nn.Parameter(torch.zeros(window, hidden))

    def forward(self, padded: torch.Tensor, start: int, length: int, valid: torch.Tensor) -> torch.Tensor:
        """Pool ``padded[:, start + l + j]`` over j < window for every l: [B, L + 2w, H] -> [B, L, H].

        The logit of (l, j) is (h + position_j) . query / sqrt(H); it is computed as
        h . query (one mat-vec over the sequence) plus position_j . query, and the
        weighted sum as ``window`` shifted adds, so no [L, window, H] tensor is built.
        """
        window = self.position.shape[0]
        scale = 1.0 / math.sqrt(padded.shape[-1])
        hq = padded @ self.query  # [B, L + 2w]
        pq = self.position @ self.query  # [W]
        logits = torch.stack([hq[:, start + j : start + j + length] for j in range(window)], dim=-1)
        logits = ((logits + pq) * scale).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a side with no keys pools to zero
        out = weights[..., 0:1] * padded[:, start : start + length]
        for j in range(1, window):
            out = out + weights[..., j : j + 1] * padded[:, start + j : start + j + length]
        return out


class BoundaryPredictor(nn.Module):
    """Scores every position of a key sequence: logits [B, L], entry t = "a chunk starts at t"."""

    def __init__(self, config: PredictorConfig | None = None) -> None:
        super().__init__()
        self.config = config or PredictorConfig()
        c = self.config
        self.proj = nn.Linear(c.in_dim, c.hidden)
        self.left = _SidePooling(c.hidden, c.window)
        self.right = _SidePooling(c.hidden, c.window)
        self.mlp = nn.Sequential(nn.Linear(4 * c.hidden + 1, c.mlp), nn.GELU(), nn.Linear(c.mlp, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, L, in_dim] (unit-norm per head) -> logits [B, L]."""
        if feats.dim() != 3 or feats.shape[-1] != self.config.in_dim:
            raise ValueError(f"expected features [batch, length, {self.config.in_dim}], got {tuple(feats.shape)}")
        w, hidden = self.config.window, self.config.hidden
        length = feats.shape[1]
        padded = F.pad(self.proj(feats), (0, 0, w, w))  # [B, L + 2w, H]; padded row l + w is position l
        pos = torch.arange(length, device=feats.device)[:, None]
        offs = torch.arange(w, device=feats.device)[None, :]
        lvec = self.left(padded, 0, length, (pos - w + offs) >= 0)  # keys l-w .. l-1
        rvec = self.right(padded, w, length, (pos + offs) < length)  # keys l .. l+w-1
        cos = F.cosine_similarity(lvec, rvec, dim=-1, eps=1e-6).unsqueeze(-1)
        # first MLP layer on [l, r, l - r, l * r, cos] without materialising the concatenation
        first = self.mlp[0]
        wl, wr, wd, wp, wc = first.weight.split([hidden, hidden, hidden, hidden, 1], dim=1)
        x = F.linear(lvec, wl + wd, first.bias) + F.linear(rvec, wr - wd) + F.linear(lvec * rvec, wp) + cos * wc[:, 0]
        return self.mlp[2](self.mlp[1](x)).squeeze(-1)


# ------------------------------------------------------------- model fit


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a predictor depends on in a model: key layout and layer structure (not the weights)."""
    from edgeattn.models import describe

    facts = describe(config)
    keep = ("model_type", "layers", "global_layers", "kv_heads", "head_dim", "hidden_size")
    facts = {k: facts[k] for k in keep}
    facts["key_features"] = facts["kv_heads"] * facts["head_dim"]
    return facts


def fingerprint_id(config: Any) -> str:
    return hashlib.sha256(json.dumps(model_fingerprint(config), sort_keys=True).encode()).hexdigest()[:12]


def check_compatible(net: BoundaryPredictor, config: Any) -> None:
    """Raise PredictorFileError if ``net`` cannot read this model's keys."""
    need = config.num_key_value_heads * config.head_dim
    if net.config.in_dim != need:
        trained = net.config.model.get("name", "another model")
        raise PredictorFileError(
            f"the boundary predictor was calibrated for {trained} (keys of {net.config.in_dim} features) but "
            f"this model's keys have {need} (kv_heads {config.num_key_value_heads} x head_dim {config.head_dim}); "
            "run `edgeattn calibrate MODEL` for this model, or use --chunking shift"
        )


def cache_path(config: Any) -> Path:
    """Where `edgeattn calibrate` keeps the predictor of a model when no --out is given."""
    from edgeattn.models import cache_dir

    return cache_dir() / "predictors" / f"{config.model_type}-{fingerprint_id(config)}" / FILE_NAME


def shipped_matches(config: Any) -> bool:
    """True when the predictor in the package was calibrated for a model of this fingerprint."""
    if not SHIPPED_PATH.is_file():
        return False
    return read_metadata(SHIPPED_PATH)[1].model.get("fingerprint") == model_fingerprint(config)


# ------------------------------------------------------------- files


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def save(net: BoundaryPredictor, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``net`` atomically (temp file, then rename) with format, config and tensor hash."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "config": net.config.to_json(),
        "sha256": _tensor_digest(state),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; a predictor is meant to be shared
    tmp.replace(path)
    return path


def read_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, str], PredictorConfig]:
    """Header of a predictor file (no tensors read); PredictorFileError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    fix = "re-train it with `edgeattn calibrate MODEL` or reinstall edgeattn for the shipped one"
    if not path.is_file():
        raise PredictorFileError(f"boundary predictor {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise PredictorFileError(
            f"boundary predictor {path} is not a readable safetensors file ({err}); {fix}"
        ) from err
    if meta.get("format") != FORMAT_NAME:
        raise PredictorFileError(f"{path} is a safetensors file but not an edgeattn boundary predictor; {fix}")
    if meta.get("version") != str(FORMAT_VERSION):
        raise PredictorFileError(
            f"{path} has predictor format version {meta.get('version')}, this edgeattn reads version "
            f"{FORMAT_VERSION}; {fix}"
        )
    try:
        config = PredictorConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise PredictorFileError(f"{path} has a damaged predictor config ({err}); {fix}") from err
    return meta, config


def load(path: str | os.PathLike[str]) -> BoundaryPredictor:
    """Read a predictor file, verifying format, version, config and tensor hash; eval mode."""
    from safetensors.torch import load_file

    meta, config = read_metadata(path)
    fix = "re-train it with `edgeattn calibrate MODEL` or reinstall edgeattn for the shipped one"
    try:
        state = load_file(str(path))
    except Exception as err:
        raise PredictorFileError(f"{path}: the tensors cannot be read ({err}); {fix}") from err
    if _tensor_digest(state) != meta.get("sha256"):
        raise PredictorFileError(f"{path}: the weights do not match their recorded SHA-256 (corrupt file); {fix}")
    net = BoundaryPredictor(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PredictorFileError(f"{path}: the weights do not fit the recorded network config ({err}); {fix}") from err
    return net.eval()
