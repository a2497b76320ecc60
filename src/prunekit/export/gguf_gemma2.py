"""Gemma 2 in llama.cpp's `gemma2` graph: Gemma 3's layout (`gguf_gemma.py`: 1 + w norms, pre/post norms on
both sub-layers, embedding scaled inside the graph, a period of sliding layers) without q/k norms, with
soft-capping of the attention logits and of the final logits.

What the graph does beyond `gguf_gemma.py` (references read, written independently: llama.cpp
`src/models/gemma2.cpp` (hparams, tensors, graph), convert_hf_to_gguf's `Gemma2Model`, gguf-py
`MODEL_ARCH.GEMMA2`):
- both soft-caps are always applied, from `attn_logit_softcapping` and `final_logit_softcapping` (defaults 50
  and 30 when absent): a config without one of them is refused, and both are always written;
- the period in `attention.sliding_window_pattern` defaults to 2, the window to 4096: both always written;
- every layer uses the one rope base and scale (no `rope.freq_base_swa`), as Hugging Face's Gemma 2;
- the output matrix is always the token embedding (the arch has no `output` tensor): an untied model is refused;
- the attention scale switches to 1/sqrt(hidden/heads) at 46 layers (the 27B model).
Only uniform results fit: the graph takes one head count and MLP width for all layers.
"""

from __future__ import annotations

from typing import Any

from prunekit.export.common import ExportError, ExportSource, refuse_heterogeneous
from prunekit.export.gguf_gemma import FULL, SLIDING, gemma_problems, swa_period

__all__ = ["gemma2_arch", "write_gemma2_keys"]

_SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")


def gemma2_arch(src: ExportSource) -> str:
    """"gemma2", or one clear error for what llama.cpp's gemma2 graph would compute differently."""
    refuse_heterogeneous(src, "Gemma 2", "gemma2",
                         "has no pre/post norms or soft-capping")
    _check(src)
    return "gemma2"


def _check(src: ExportSource) -> None:
    cfg = src.config
    problems = [f"{key} unset (the graph always soft-caps)" for key in _SOFTCAPS if getattr(cfg, key, None) is None]
    if not src.tied:
        problems.append("an output matrix apart from the embedding (the graph reuses the embedding)")
    problems += _rope_problems(cfg)
    problems += gemma_problems(src, big_n_layer=46, arch="gemma2")
    if problems:
        raise ExportError("this Gemma 2 model cannot be written for llama.cpp's gemma2 graph: " + "; ".join(problems))


def _rope_problems(cfg: Any) -> list[str]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if SLIDING in params or FULL in params:
        return ["rope per layer type (the graph takes one rope for all layers)"]
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        return [f"rope scaling {kind!r} (the graph applies default or linear rope)"]
    return []


def write_gemma2_keys(w: Any, src: ExportSource) -> None:
    """The keys only Gemma 2 needs (the common ones and the rope are written by the caller)."""
    cfg = src.config
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_sliding_window_pattern(swa_period(list(cfg.layer_types), "gemma2"))
    w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
