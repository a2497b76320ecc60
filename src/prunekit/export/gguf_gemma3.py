"""Gemma 3 (text) in llama.cpp's `gemma3` graph: the keys and tensors that differ from the Llama family.

Only uniform results fit (every layer the same heads and MLP width, no sub-layer removed): the graph reads one
head count and one MLP width for all layers, and llama.cpp's per-layer `deci` graph has no place for Gemma's
extra norms. What the graph does, and therefore what is written (references read, written independently:
llama.cpp `src/models/gemma3.cpp`, the GEMMA3 hparams in `src/llama-model.cpp`, convert_hf_to_gguf's
`Gemma3Model`, gguf-py `MODEL_ARCH.GEMMA3`):
- RMS norms multiply by the stored weight, while Hugging Face's Gemma3RMSNorm computes x * (1 + w): every norm
  (attention pre/post, MLP pre/post, q/k, final) is written as 1 + w, as convert_hf_to_gguf does;
- the token embedding is scaled by sqrt(hidden) inside the graph: written unscaled;
- rope is NEOX style (rotate-half, as Hugging Face): no Q/K permutation; global layers use `rope.freq_base`
  (and the rope scaling keys), sliding layers `rope.freq_base_swa` unscaled;
- layer i uses the sliding window iff i % P < P - 1 for the period P in `attention.sliding_window_pattern`
  (default 6); the window covers the last `attention.sliding_window` positions, as Hugging Face's;
- attention scale is fixed by llama.cpp (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for 62 layers), the MLP
  is GELU (tanh approximation), and there is no logit soft-capping in the sliding-window graph: a config that
  differs is refused rather than written wrong.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import torch

from prunekit.export.common import ExportError, ExportSource

__all__ = ["check_gemma3", "gemma3_tensors", "swa_period", "write_gemma3_keys"]

_SLIDING, _FULL = "sliding_attention", "full_attention"


def swa_period(layer_types: list[str]) -> int:
    """The period P for which llama.cpp's rule (layer i slides iff i % P < P - 1) gives `layer_types`, or one
    clear error (a dropped block usually breaks the pattern)."""
    n = len(layer_types)
    period = layer_types.index(_FULL) + 1 if _FULL in layer_types else n + 1
    expected = [_SLIDING if i % period < period - 1 else _FULL for i in range(n)]
    if list(layer_types) != expected:
        raise ExportError(
            "this Gemma 3 result's sliding/full attention layers do not follow one period any more "
            f"({''.join('S' if t == _SLIDING else 'F' for t in layer_types)}), and llama.cpp's gemma3 graph places "
            "full-attention layers by a period; export the uniform model or use the Hugging Face checkpoint")
    return period


def _sliding_rope(cfg: Any) -> float:
    params = dict((getattr(cfg, "rope_parameters", None) or {}).get(_SLIDING) or {})
    if params.get("rope_type", "default") != "default":
        raise ExportError(f"llama.cpp's gemma3 graph does not scale rope on sliding layers; this config asks for "
                          f"{params['rope_type']!r}")
    return float(params.get("rope_theta", getattr(cfg, "rope_local_base_freq", 10000.0)))


def _llamacpp_attention_scale(n_layer: int, hidden: int, n_head: int, head_dim: int) -> float:
    return 1.0 / math.sqrt(hidden / n_head if n_layer == 62 else head_dim)


def check_gemma3(src: ExportSource) -> None:
    """Refuse, with one clear error, what llama.cpp's gemma3 graph would compute differently."""
    cfg = src.config
    problems = []
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, key, None) is not None:
            problems.append(f"{key}={getattr(cfg, key)} (the graph has no soft-capping)")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        problems.append(f"activation {act!r} (the graph uses GELU, tanh approximation)")
    if getattr(cfg, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if not getattr(cfg, "sliding_window", None):
        problems.append("no sliding window (the graph without one is the embedding variant)")
    else:
        swa_period(list(cfg.layer_types))  # its own error: the usual reason is a dropped block
    q, k, v, o = src.adapter.attn_projections(src.adapter.layers()[0])
    if any(lin.bias is not None for lin in (q, k, v, o)):
        problems.append("attention biases (the graph has none)")
    s = src.shapes[0]
    want = float(getattr(cfg, "query_pre_attn_scalar", src.head_dim)) ** -0.5
    got = _llamacpp_attention_scale(len(src.shapes), int(cfg.hidden_size), s.n_head, src.head_dim)
    if not math.isclose(want, got, rel_tol=1e-6):
        problems.append(f"attention scale {want:.6g} (llama.cpp uses {got:.6g} for this shape)")
    if problems:
        raise ExportError("this Gemma 3 model cannot be written for llama.cpp's gemma3 graph: " + "; ".join(problems))


def write_gemma3_keys(w: Any, src: ExportSource) -> None:
    """The keys only Gemma 3 needs (the common ones and the global rope are written by the caller)."""
    cfg = src.config
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_sliding_window_pattern(swa_period(list(cfg.layer_types)))
    w.add_rope_freq_base_swa(_sliding_rope(cfg))


def _name(kind: Any, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def _plus_one(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().to(torch.float32) + 1.0


def gemma3_tensors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every Gemma 3 weight, norms as 1 + w."""
    T = gguf.MODEL_TENSOR
    a = src.adapter
    (attn_pre, attn_post), (mlp_pre, mlp_post) = a.spec.attn_norms, a.spec.mlp_norms
    out: list[tuple[str, torch.Tensor]] = [(_name(T.TOKEN_EMBD), a.embed().weight)]
    for i, layer in enumerate(a.layers()):
        q, k, v, o = a.attn_projections(layer)
        qn, kn = a.qk_norms(layer)
        gate, up, down = a.mlp_projections(layer)
        out += [
            (_name(T.ATTN_NORM, i), _plus_one(getattr(layer, attn_pre))),
            (_name(T.ATTN_Q, i), q.weight), (_name(T.ATTN_K, i), k.weight), (_name(T.ATTN_V, i), v.weight),
            (_name(T.ATTN_Q_NORM, i), _plus_one(qn)), (_name(T.ATTN_K_NORM, i), _plus_one(kn)),
            (_name(T.ATTN_OUT, i), o.weight),
            (_name(T.ATTN_POST_NORM, i), _plus_one(getattr(layer, attn_post))),
            (_name(T.FFN_PRE_NORM, i), _plus_one(getattr(layer, mlp_pre))),
            (_name(T.FFN_GATE, i), gate.weight), (_name(T.FFN_UP, i), up.weight), (_name(T.FFN_DOWN, i), down.weight),
            (_name(T.FFN_POST_NORM, i), _plus_one(getattr(layer, mlp_post))),
        ]
    out.append((_name(T.OUTPUT_NORM), _plus_one(a.final_norm())))
    if not src.tied:  # llama.cpp reuses token_embd when `output` is absent
        out.append((_name(T.OUTPUT), a.lm_head().weight))
    return out
