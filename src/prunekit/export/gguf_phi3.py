"""Phi-3 (and Phi-3.5 / Phi-4-mini, same Hugging Face class) in llama.cpp's `phi3` graph.

What the graph does, and therefore what is written (references read, written independently: llama.cpp
`src/models/phi3.cpp` (hparams, tensor shapes, graph), `llm_graph_context::build_qkv` and
`llama_model::get_rope_factors` in `src/llama-graph.cpp` / `src/llama-model.cpp`, convert_hf_to_gguf's
`Phi3MiniModel`, gguf-py `MODEL_ARCH.PHI3`):
- q, k and v stay fused in `attn_qkv` (q rows, then k, then v, as Hugging Face's `qkv_proj`); `build_qkv` splits
  them by head counts. Gate and up stay fused in `ffn_up`, gate first: the graph's SWIGLU computes
  silu(first half) * second half, as Hugging Face's `up * silu(gate)` after `chunk(2)`.
- the graph loads `attn_output` as hidden x hidden and the fused qkv with a hidden-wide q part, so only results
  that keep every query head fit (MLP channels and whole layers may go; KV heads are sized by the GQA width).
  A result with fewer query heads, or per-layer shapes, goes to the Llama graphs instead (`llama` uniform,
  `deci` per layer, through `gguf._tensors` with the fused projections split by the adapter and Q/K permuted
  for their "normal" rope) where Phi-3's layer computes what a Llama layer does: default rope over the whole
  head (Phi-3-mini, Phi-3-medium); partial rotary or longrope there is refused;
- rope is NEOX style (rotate-half, as Hugging Face): no Q/K permutation; `rope.dimension_count` is the rotated
  part of a head (head_dim * partial_rotary_factor, Phi-4-mini's 0.75), which NEOX rotates and Hugging Face too;
- "longrope" (Phi-3.5, Phi-4-mini): `rope_factors_short` / `rope_factors_long` tensors, the original context as
  `rope.scaling.original_context_length` and the cos/sin factor as `rope.scaling.attn_factor`. llama.cpp uses
  the long factors when the context it is run with exceeds the original context, Hugging Face when the
  sequence does; within the original context both use the short ones (the case checked).
- the graph ignores `attention.sliding_window` (llama.cpp turns Phi-3 SWA off, for the released Phi-3 GGUFs too):
  the context length is written as the converter writes it, so the pruned model runs as llama.cpp runs the model
  it came from, and where the window is shorter than that context the export says once that llama.cpp attends
  past it (the same as transformers within the window, the case checked).
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
import torch

from prunekit.export.common import ExportError, ExportSource, has_biases

__all__ = ["phi3_arch", "phi3_tensors", "write_phi3_keys"]

log = logging.getLogger(__name__)


def _rope_params(cfg: Any) -> dict[str, Any]:
    return dict(getattr(cfg, "rope_parameters", None) or {})


def _rope_dims(src: ExportSource) -> int:
    return int(src.head_dim * float(_rope_params(src.config).get("partial_rotary_factor", 1.0)))


def phi3_arch(src: ExportSource) -> str:
    """`phi3` for a uniform result with every query head; otherwise, where Phi-3 computes what a Llama layer
    does (default rope over the whole head), `llama` (uniform) or `deci` (per-layer shapes) with the fused
    projections split; else one clear error."""
    cfg = src.config
    problems = _common_problems(src)
    all_heads = all(s.n_head * src.head_dim == int(cfg.hidden_size) for s in src.shapes if s.has_attn)
    if not src.heterogeneous and all_heads:
        arch = "phi3"
        kind = _rope_params(cfg).get("rope_type", "default")
        if kind not in ("default", "longrope"):
            problems.append(f"rope type {kind!r} (the graph computes default and longrope)")
    else:
        arch = "deci" if src.heterogeneous else "llama"
        if not _llama_rope(src):
            problems.append("fewer query heads or per-layer shapes, which llama.cpp's phi3 graph cannot load (it "
                            "takes every query head and one shape), with partial rotary or long-rope factors, which "
                            f"the Llama-style graphs do not compute ({_rope_dims(src)} of {src.head_dim} rotated, "
                            f"rope {_rope_params(cfg).get('rope_type', 'default')!r})")
    if problems:
        raise ExportError("this phi3 model cannot be written as GGUF: " + "; ".join(problems))
    _warn_window(cfg)
    return arch


def _llama_rope(src: ExportSource) -> bool:
    return _rope_dims(src) == src.head_dim and _rope_params(src.config).get("rope_type", "default") == "default"


def _common_problems(src: ExportSource) -> list[str]:
    act = getattr(src.config, "hidden_act", None)
    problems = [] if act == "silu" else [f"activation {act!r} (the graphs use SiLU)"]
    if has_biases(src):
        problems.append("projection biases (the graphs have none)")
    return problems


def _warn_window(cfg: Any) -> None:
    window = getattr(cfg, "sliding_window", None)
    if window and int(window) < int(cfg.max_position_embeddings):
        log.warning("llama.cpp runs Phi-3 without its sliding window, as for every Phi-3 GGUF: past %d tokens this "
                    "model attends further back in llama.cpp than in transformers", int(window))


def write_phi3_keys(w: Any, src: ExportSource) -> None:
    """Rope keys (partial rotary; longrope's original context and cos/sin factor)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = src.config
    params = _rope_params(cfg)
    w.add_rope_freq_base(float(params["rope_theta"]))
    w.add_rope_dimension_count(_rope_dims(src))
    if params.get("rope_type", "default") == "longrope":
        # Hugging Face's own definition of the cos/sin factor (from `factor` or the context ratio).
        _, attn_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg)
        w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        w.add_rope_scaling_attn_factors(float(attn_factor))


def _rope_factors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """longrope's long and short per-frequency factors (none for default rope)."""
    params = _rope_params(src.config)
    if params.get("rope_type", "default") != "longrope":
        return []
    return [(_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), torch.tensor(params["long_factor"], dtype=torch.float32)),
            (_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT), torch.tensor(params["short_factor"], dtype=torch.float32))]


def _name(kind: Any, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def phi3_tensors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every Phi-3 weight; the fused projections are written as they are."""
    T = gguf.MODEL_TENSOR
    a = src.adapter
    out: list[tuple[str, torch.Tensor]] = [(_name(T.TOKEN_EMBD), a.embed().weight)]
    for i, layer in enumerate(a.layers()):
        (qkv,), (gate_up,) = a.input_projections(layer, "attn"), a.input_projections(layer, "mlp")
        out += [
            (_name(T.ATTN_NORM, i), getattr(layer, a.spec.attn_norms[0]).weight),
            (_name(T.ATTN_QKV, i), qkv.weight),
            (_name(T.ATTN_OUT, i), a.output_projection(layer, "attn").weight),
            (_name(T.FFN_NORM, i), getattr(layer, a.spec.mlp_norms[0]).weight),
            (_name(T.FFN_UP, i), gate_up.weight),
            (_name(T.FFN_DOWN, i), a.output_projection(layer, "mlp").weight),
        ]
    out.append((_name(T.OUTPUT_NORM), a.final_norm().weight))
    if not src.tied:  # llama.cpp reuses token_embd when `output` is absent
        out.append((_name(T.OUTPUT), a.lm_head().weight))
    return out + _rope_factors(src)
