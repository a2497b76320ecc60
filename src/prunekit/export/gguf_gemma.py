"""What llama.cpp's Gemma 2 and Gemma 3 graphs share: 1 + w norms, an unscaled embedding, a period of sliding
layers, a fixed attention scale, GELU. The family modules (`gguf_gemma2.py`, `gguf_gemma3.py`) add their keys
and checks.

What both graphs compute (references read, written independently: llama.cpp `src/models/gemma2.cpp` and
`gemma3.cpp` (hparams, tensors, graph), convert_hf_to_gguf's `Gemma2Model` / `Gemma3Model`):
- RMS norms multiply by the stored weight, while Hugging Face's Gemma norms compute x * (1 + w): every norm is
  written as 1 + w, as convert_hf_to_gguf does;
- the token embedding is scaled by sqrt(hidden) inside the graph: written unscaled;
- rope is NEOX style (rotate-half, as Hugging Face): no Q/K permutation;
- layer i uses the sliding window iff i % P < P - 1 for the period P in `attention.sliding_window_pattern`;
- the attention scale is fixed by llama.cpp: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models
  (recognised by their layer count); the MLP is GELU (tanh approximation). A config that differs is refused.
"""

from __future__ import annotations

import math

import gguf
import torch

from prunekit.export.common import ExportError, ExportSource, has_biases

__all__ = ["FULL", "SLIDING", "gemma_problems", "gemma_tensors", "swa_period"]

SLIDING, FULL = "sliding_attention", "full_attention"


def swa_period(layer_types: list[str], arch: str = "gemma3") -> int:
    """The period P for which llama.cpp's rule (layer i slides iff i % P < P - 1) gives `layer_types`, or one
    clear error (a dropped block usually breaks the pattern)."""
    n = len(layer_types)
    period = layer_types.index(FULL) + 1 if FULL in layer_types else n + 1
    expected = [SLIDING if i % period < period - 1 else FULL for i in range(n)]
    if list(layer_types) != expected:
        raise ExportError(
            f"this {arch} result's sliding/full attention layers do not follow one period any more "
            f"({''.join('S' if t == SLIDING else 'F' for t in layer_types)}), and llama.cpp's {arch} graph places "
            "full-attention layers by a period; export the uniform model or use the Hugging Face checkpoint")
    return period


def _llamacpp_attention_scale(src: ExportSource, big_n_layer: int) -> float:
    n_layer, n_head = len(src.shapes), src.shapes[0].n_head
    return 1.0 / math.sqrt(int(src.config.hidden_size) / n_head if n_layer == big_n_layer else src.head_dim)


def gemma_problems(src: ExportSource, big_n_layer: int, arch: str) -> list[str]:
    """What a Gemma graph computes differently from this model (empty when it fits). `big_n_layer` is the layer
    count at which the graph switches its attention scale to 1/sqrt(hidden/heads)."""
    cfg = src.config
    problems = []
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        problems.append(f"activation {act!r} (the graph uses GELU, tanh approximation)")
    if getattr(cfg, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if not getattr(cfg, "sliding_window", None):
        problems.append("no sliding window (the graph without one is the embedding variant)")
    else:
        swa_period(list(cfg.layer_types), arch)  # its own error: the usual reason is a dropped block
    if has_biases(src, ("attn",)):
        problems.append("attention biases (the graph has none)")
    want = float(getattr(cfg, "query_pre_attn_scalar", src.head_dim)) ** -0.5
    got = _llamacpp_attention_scale(src, big_n_layer)
    if not math.isclose(want, got, rel_tol=1e-6):
        problems.append(f"attention scale {want:.6g} (llama.cpp uses {got:.6g} for this shape)")
    return problems


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def _plus_one(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().to(torch.float32) + 1.0


def gemma_tensors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight, norms as 1 + w; q/k norms where the family has them (Gemma 3)."""
    T = gguf.MODEL_TENSOR
    a = src.adapter
    (attn_pre, attn_post), (mlp_pre, mlp_post) = a.spec.attn_norms, a.spec.mlp_norms
    out: list[tuple[str, torch.Tensor]] = [(_name(T.TOKEN_EMBD), a.embed().weight)]
    for i, layer in enumerate(a.layers()):
        q, k, v, o = a.attn_projections(layer)
        qn, kn = a.qk_norms(layer)
        gate, up, down = a.mlp_projections(layer)
        out += [(_name(T.ATTN_NORM, i), _plus_one(getattr(layer, attn_pre))),
                (_name(T.ATTN_Q, i), q.weight), (_name(T.ATTN_K, i), k.weight), (_name(T.ATTN_V, i), v.weight)]
        if qn is not None:
            out += [(_name(T.ATTN_Q_NORM, i), _plus_one(qn)), (_name(T.ATTN_K_NORM, i), _plus_one(kn))]
        out += [
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
