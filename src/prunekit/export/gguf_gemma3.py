"""Gemma 3 (text) in llama.cpp's `gemma3` graph: the keys and checks that differ from the Llama family (what
Gemma 2 shares, norms as 1 + w and the sliding-window period included, is in `gguf_gemma.py`).

Only uniform results fit (every layer the same heads and MLP width, no sub-layer removed): the graph reads one
head count and one MLP width for all layers, and llama.cpp's per-layer `deci` graph has no place for Gemma's
extra norms. What the graph does beyond `gguf_gemma.py` (references read, written independently:
llama.cpp `src/models/gemma3.cpp`, the GEMMA3 hparams in `src/llama-model.cpp`, convert_hf_to_gguf's
`Gemma3Model`, gguf-py `MODEL_ARCH.GEMMA3`):
- q/k norms (per head), written as 1 + w like every other norm;
- global layers use `rope.freq_base` (and the rope scaling keys), sliding layers `rope.freq_base_swa` unscaled;
- the period in `attention.sliding_window_pattern` defaults to 6; the window covers the last
  `attention.sliding_window` positions, as Hugging Face's;
- the attention scale switches to 1/sqrt(hidden/heads) at 62 layers (the 27B model), and there is no logit
  soft-capping in the sliding-window graph: a config that differs is refused rather than written wrong.
"""

from __future__ import annotations

from typing import Any

from prunekit.export.common import ExportError, ExportSource, refuse_heterogeneous
from prunekit.export.gguf_gemma import SLIDING, gemma_problems, swa_period

__all__ = ["gemma3_arch", "swa_period", "write_gemma3_keys"]


def _sliding_rope(cfg: Any) -> float:
    params = dict((getattr(cfg, "rope_parameters", None) or {}).get(SLIDING) or {})
    if params.get("rope_type", "default") != "default":
        raise ExportError(f"llama.cpp's gemma3 graph does not scale rope on sliding layers; this config asks for "
                          f"{params['rope_type']!r}")
    return float(params.get("rope_theta", getattr(cfg, "rope_local_base_freq", 10000.0)))


def gemma3_arch(src: ExportSource) -> str:
    """`gemma3`, or one clear error for what llama.cpp's gemma3 graph would compute differently."""
    refuse_heterogeneous(src, "Gemma 3", "gemma3",
                         "has no place for Gemma's extra pre/post norms, q/k norms, embedding scale or sliding-window layers")
    cfg = src.config
    problems = [f"{key}={getattr(cfg, key)} (the graph has no soft-capping)"
                for key in ("final_logit_softcapping", "attn_logit_softcapping") if getattr(cfg, key, None) is not None]
    problems += gemma_problems(src, big_n_layer=62, arch="gemma3")
    if problems:
        raise ExportError("this Gemma 3 model cannot be written for llama.cpp's gemma3 graph: " + "; ".join(problems))
    return "gemma3"


def write_gemma3_keys(w: Any, src: ExportSource) -> None:
    """The keys only Gemma 3 needs (the common ones and the global rope are written by the caller)."""
    cfg = src.config
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_sliding_window_pattern(swa_period(list(cfg.layer_types)))
    w.add_rope_freq_base_swa(_sliding_rope(cfg))
