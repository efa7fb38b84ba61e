"""Where a torch prefill spends its time: attention core (global / sliding layers), projections, MLP, rest.

Forward hooks on each decoder layer's attention module, its four projections and its
MLP add up wall time per stage.  Only calls made while the timer is armed (the
caller arms it after each untimed warm-up) and whose query length equals the prompt's
are counted, so warm-up and decode steps (1 token) are left out and the split
belongs to the measured one-shot prefills.  The hooks cost two
clock reads per module call (a few hundred per prefill): nothing next to a prefill.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class StageTimer:
    """``with StageTimer(model, prompt_tokens) as st: ...; st.seconds()`` -> {stage: seconds per prefill}."""

    def __init__(self, model: Any, prompt_tokens: int) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.totals: dict[str, float] = defaultdict(float)
        self.prefills = 0
        self._handles: list[Any] = []
        self._starts: dict[int, float] = {}
        self.armed = False  # counts only while armed: the caller arms it after the warm-up

    def _hook(self, module: Any, stage: str) -> None:
        key = id(module)

        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.armed and self._tokens(args, kwargs) == self.prompt_tokens:
                self._starts[key] = time.perf_counter()

        def post(_m: Any, _args: Any, _kwargs: Any, _out: Any) -> None:
            t0 = self._starts.pop(key, None)
            if t0 is not None:
                self.totals[stage] += time.perf_counter() - t0

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    @staticmethod
    def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        x = args[0] if args else kwargs.get("hidden_states")
        shape = getattr(x, "shape", None)
        return int(shape[-2]) if shape is not None and len(shape) >= 2 else None

    def __enter__(self) -> StageTimer:
        model = self.model
        types = list(getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers)
        for layer, kind in zip(model.model.layers, types, strict=True):
            scope = "global" if kind == "full_attention" else "sliding"
            self._hook(layer.self_attn, f"attention_{scope}")
            for name in PROJECTIONS:
                self._hook(getattr(layer.self_attn, name), f"projections_{scope}")
            self._hook(layer.mlp, "mlp")
        self._handles.append(model.register_forward_pre_hook(self._count, with_kwargs=True))
        return self

    def _count(self, _m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if self.armed and ids is not None and int(ids.shape[-1]) == self.prompt_tokens:
            self.prefills += 1

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def seconds(self, prefill_s: float) -> dict[str, float]:
        """Seconds per prefill in each stage; the attention stages exclude their projections.

        ``prefill_s`` is the measured prefill time (median); ``rest`` is what the hooks did
        not see (embedding, norms, residuals, LM head, the session's own work).
        """
        n = max(self.prefills, 1)
        per = {k: v / n for k, v in self.totals.items()}
        # the projection hooks fire inside the attention hooks: the core is the attention minus them
        proj_g, proj_s = per.get("projections_global", 0.0), per.get("projections_sliding", 0.0)
        out = {
            "attention_global_core": max(0.0, per.get("attention_global", 0.0) - proj_g),
            "attention_sliding_core": max(0.0, per.get("attention_sliding", 0.0) - proj_s),
            "projections": proj_g + proj_s,
            "mlp": per.get("mlp", 0.0),
        }
        out["rest"] = max(0.0, prefill_s - sum(out.values()))
        return out
