"""OLMo 2 in llama.cpp's `olmo2` graph: no pre-norms; each sub-layer's output is normed (`post_attention_norm`,
`post_ffw_norm`) before the residual add; q and k are RMS-normed over the whole projection width.

What the graph does, and therefore what is written (references read, written independently: llama.cpp
`src/models/olmo2.cpp` (hparams, tensor shapes, graph), `llama_model_rope_type` in `src/llama-model.cpp`,
convert_hf_to_gguf's `Olmo2Model`, gguf-py `MODEL_ARCH.OLMO2`):
- norms multiply by the stored weight, as Hugging Face's Olmo2RMSNorm: written as they are;
- rope is NEOX style (rotate-half, as Hugging Face): no Q/K permutation;
- the q projection, the output projection and the q norm are sized by the hidden size, and the head size for
  those tensors is hidden / heads: a result with narrowed query heads (heads x head size below the hidden
  size) has no place there and is refused; narrowed MLP channels and dropped blocks are written;
- the `output` matrix is always read, so a tied model is written with its embedding as `output`;
- no q/k/v clipping, no biases, SiLU MLP, attention scale 1/sqrt(head size), one default or linear rope: a
  config that asks for more is refused rather than written wrong (transformers' Olmo2 does not clip either,
  but a checkpoint that declares `clip_qkv` was made for a graph that does). No sliding-window keys are written
  (those are OLMo 3's), so every layer attends fully, as in transformers' Olmo2.
Only uniform results fit: the graph takes one head count and MLP width for all layers.
"""

from __future__ import annotations

import gguf
import torch

from prunekit.export.common import ExportError, ExportSource, has_biases, refuse_heterogeneous

__all__ = ["olmo2_arch", "olmo2_tensors"]


def olmo2_arch(src: ExportSource) -> str:
    """"olmo2", or one clear error for what llama.cpp's olmo2 graph would compute differently."""
    refuse_heterogeneous(src, "OLMo 2", "olmo2",
                         "has no post-norms or q/k norms")
    _check(src)
    return "olmo2"


def _check(src: ExportSource) -> None:
    cfg = src.config
    hidden, n_head = int(cfg.hidden_size), src.shapes[0].n_head
    problems = []
    if n_head * src.head_dim != hidden:
        problems.append(f"{n_head} query heads of {src.head_dim} (the graph sizes the q projection and q norm by "
                        f"the hidden size, {hidden}: narrow channels or drop blocks, not heads)")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append(f"clip_qkv={cfg.clip_qkv} (the graph does not clip q/k/v)")
    if has_biases(src, ("attn",)):
        problems.append("attention biases (the graph has none)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.hidden_act!r} (the graph uses SiLU)")
    kind = dict(getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if kind not in ("default", "linear"):
        problems.append(f"rope scaling {kind!r} (the graph applies default or linear rope)")
    if problems:
        raise ExportError("this OLMo 2 model cannot be written for llama.cpp's olmo2 graph: " + "; ".join(problems))


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def olmo2_tensors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every OLMo 2 weight, as stored (no permutation, no norm offset)."""
    T = gguf.MODEL_TENSOR
    a = src.adapter
    (attn_post,), (mlp_post,) = a.spec.attn_norms, a.spec.mlp_norms
    out: list[tuple[str, torch.Tensor]] = [(_name(T.TOKEN_EMBD), a.embed().weight)]
    for i, layer in enumerate(a.layers()):
        q, k, v, o = a.attn_projections(layer)
        qn, kn = a.qk_norms(layer)
        gate, up, down = a.mlp_projections(layer)
        out += [
            (_name(T.ATTN_Q, i), q.weight), (_name(T.ATTN_K, i), k.weight), (_name(T.ATTN_V, i), v.weight),
            (_name(T.ATTN_Q_NORM, i), qn.weight), (_name(T.ATTN_K_NORM, i), kn.weight),
            (_name(T.ATTN_OUT, i), o.weight), (_name(T.ATTN_POST_NORM, i), getattr(layer, attn_post).weight),
            (_name(T.FFN_GATE, i), gate.weight), (_name(T.FFN_UP, i), up.weight), (_name(T.FFN_DOWN, i), down.weight),
            (_name(T.FFN_POST_NORM, i), getattr(layer, mlp_post).weight),
        ]
    return out + [(_name(T.OUTPUT_NORM), a.final_norm().weight), (_name(T.OUTPUT), a.lm_head().weight)]
