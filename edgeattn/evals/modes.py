"""The attention modes an eval compares, all at one token budget N_b.

DHSA and block-sparse are :class:`~edgeattn.config.AttentionConfig` kinds.  The two window
baselines need no new kind: a block-sparse selection whose local band
(``AttentionConfig.local``) fills the whole budget keeps nothing but that band, i.e. a sliding
window at chunk granularity (each query sees its own chunk, causally, and the ``local`` tokens
before it), and with sinks it is StreamingLLM's sinks + window.  So every mode runs on the same
kernels (TVM or the reference) through the same selection code, and "same budget" holds exactly:
the band is the largest whole number of chunks that fits beside the own chunk and the sinks, and
the config's budget is set to exactly what the band, own chunk and sinks use, so no chunk chosen
by score slips into the leftover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeattn.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MIN_CHUNK,
    DEFAULT_SINKS,
    AttentionConfig,
    ConfigError,
)

MODE_NAMES: tuple[str, ...] = (
    "dense",
    "dhsa",
    "dhsa-paper",
    "dhsa-shift",
    "dhsa-predictor",
    "block-sparse",
    "window",
    "sinks-window",
)
ALL_MODES = ",".join(MODE_NAMES)
MODE_HELP = (
    "dense; dhsa (fixed chunks), dhsa-paper (fixed chunks, no observation window: chunk means only), dhsa-shift, "
    "dhsa-predictor (adaptive chunks); block-sparse (fixed blocks, "
    "plain means); window (a sliding window of the budget, 'local only'); sinks-window (StreamingLLM: sinks + window)"
)


@dataclass(frozen=True)
class Mode:
    """One attention mode: its name in reports, the config of the sparse layers, how chunks are cut."""

    name: str
    cfg: AttentionConfig

    @property
    def chunking(self) -> str:
        return self.cfg.chunking if self.cfg.kind == "dhsa" else "fixed"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.cfg.to_dict()}


def window_config(budget: int, chunk: int, sinks: int) -> AttentionConfig:
    """A sliding window (sinks + window when ``sinks`` > 0) of at most ``budget`` keys, as block-sparse + band."""
    band = (budget - chunk - sinks) // chunk * chunk
    if band < chunk:
        raise ConfigError(
            f"budget {budget} leaves no room for a window beside a {chunk}-token chunk and {sinks} sinks; "
            f"pass --budget >= {2 * chunk + sinks}"
        )
    return AttentionConfig(kind="block-sparse", budget=chunk + sinks + band, chunk_size=chunk, sinks=sinks, local=band)


def make_mode(
    name: str,
    budget: int,
    chunk: int = DEFAULT_CHUNK_SIZE,
    sinks: int = DEFAULT_SINKS,
    min_chunk: int = DEFAULT_MIN_CHUNK,
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> Mode:
    """The mode called ``name`` at ``budget`` (one of :data:`MODE_NAMES`)."""
    if name == "dense":
        return Mode(name, AttentionConfig(kind="dense"))
    if name in ("dhsa", "dhsa-fixed", "dhsa-shift", "dhsa-predictor"):
        chunking = name.partition("-")[2] or "fixed"
        cfg = AttentionConfig(
            kind="dhsa", budget=budget, chunk_size=chunk, sinks=sinks, chunking=chunking,  # type: ignore[arg-type]
            min_chunk=min_chunk, max_chunk=max_chunk,
        )  # fmt: skip
        return Mode("dhsa" if chunking == "fixed" else name, cfg)
    if name == "dhsa-paper":  # the paper's selection: chunk means only, no observation window
        return Mode(name, AttentionConfig(kind="dhsa", budget=budget, chunk_size=chunk, sinks=sinks, observe=0))
    if name == "block-sparse":
        return Mode(name, AttentionConfig(kind="block-sparse", budget=budget, chunk_size=chunk, sinks=sinks))
    if name == "window":
        return Mode(name, window_config(budget, chunk, 0))
    if name == "sinks-window":
        return Mode(name, window_config(budget, chunk, sinks))
    raise ConfigError(f"unknown mode {name!r}; choose from {', '.join(MODE_NAMES)}")


def parse_modes(spec: str, budget: int, **kw: Any) -> list[Mode]:
    """``"dense,dhsa,window"`` -> modes at ``budget`` (order kept, duplicates dropped)."""
    names = [x.strip() for x in spec.split(",") if x.strip()]
    if not names:
        raise ConfigError(f"--modes takes a comma list of {', '.join(MODE_NAMES)}; got {spec!r}")
    modes = [make_mode(n, budget, **kw) for n in dict.fromkeys(names)]
    return list({m.name: m for m in modes}.values())


def boundary_fn(mode: Mode, loaded: Any) -> Any:
    """The boundary source of an adaptive DHSA mode (None: fixed chunks)."""
    from edgeattn import chunking

    return chunking.boundary_fn_for(mode.cfg, loaded)
