"""GGUF for uniform Mixture-of-Experts results: llama.cpp's graphs for Mixtral (`llama` with expert tensors),
Qwen2-MoE (`qwen2moe`), Qwen3-MoE (`qwen3moe`) and OLMoE (`olmoe`).

Those graphs take one expert count, top-k and expert width for every layer, and each fixes whether the top-k
router weights are renormalised (`llama` and `qwen3moe` do, `qwen2moe` and `olmoe` do not), so a result with
per-layer expert counts or widths, a removed sub-layer, dense MLP layers, or a config whose `norm_topk_prob`
disagrees with its graph is refused with one error.

Tensor layout (GGUF shapes are PyTorch's reversed): `ffn_gate_inp` is the router [E, H]; `ffn_gate_exps`
and `ffn_up_exps` [E, I, H] are the two halves of transformers' fused `gate_up_proj` [E, 2I, H];
`ffn_down_exps` [E, H, I] is `down_proj` as it is; Qwen2-MoE's shared expert is `ffn_{gate,up,down}_shexp`
and its sigmoid gate `ffn_gate_inp_shexp`, a vector [H].

llama.cpp's `olmoe` graph is multi-head only: its q/k norms and q/output projections are all [H] wide, so a
grouped-query OLMoE is written with each KV head repeated for the query heads that read it (K, V and the k-norm
weight; exact: the RMS of a vector whose parts are repeated equally often is the RMS of the original; prunekit
never narrows OLMoE's heads, so the query width stays the hidden size), and `clip_qkv`, which the graph does
not apply, is refused. Mixtral goes to `llama`, whose rope is "normal", so its Q/K rows are permuted there.

References read (conventions only): llama.cpp `src/models/{qwen2moe,qwen3moe,olmoe}.cpp` (tensors, which
keys they read, the renormalisation each passes to `build_moe_ffn`; olmoe's [H] q/k norms), gguf-py `gguf/constants.py` (names).
"""

from __future__ import annotations

from typing import Any

import gguf
import torch

from prunekit.adapters.moe import MoEAdapter
from prunekit.export.common import ExportError, ExportSource

# model_type -> (llama.cpp arch, whether its graph renormalises the top-k weights)
MOE_ARCHS: dict[str, tuple[str, bool]] = {
    "mixtral": ("llama", True),
    "qwen2_moe": ("qwen2moe", False),
    "qwen3_moe": ("qwen3moe", True),
    "olmoe": ("olmoe", False),
}
# Graphs that read `output` even when the model ties it to the embedding.
_NEEDS_OUTPUT = ("qwen2moe", "olmoe")
# Graphs with one head count for queries and keys (grouped-query models are written with KV heads repeated).
MHA_ONLY = ("olmoe",)


def moe_arch(src: ExportSource) -> str:
    """The llama.cpp architecture of a uniform MoE result, or one clear `ExportError`."""
    mt = src.model_type
    arch, renormalises = MOE_ARCHS[mt]
    ad = _adapter(src)
    check_uniform_moe(src, arch)
    if ad.renormalises() != renormalises:
        ours = "does not renormalise" if renormalises else "renormalises"
        theirs = "always does" if renormalises else "never does"
        raise ExportError(f"this {mt} model cannot be written as GGUF: it {ours} its top-k router weights "
                          f"(norm_topk_prob), but llama.cpp's {arch} graph {theirs}; use the Hugging Face checkpoint")
    _check_window(src, arch)
    if arch == "olmoe":
        _check_olmoe(src)
    return arch


def check_uniform_moe(src: ExportSource, arch: str) -> None:
    """Every layer has attention and a MoE block, all of one shape (experts, top-k, widths, heads), or one clear
    `ExportError`: llama.cpp's MoE graphs take one of each for all layers."""
    mt = src.model_type
    ad = _adapter(src)
    layers = ad.layers()
    if not all(ad.is_moe(layer) and ad.has_attention(layer) for layer in layers):
        raise ExportError(f"a {mt} result without some attention or MoE blocks, or with dense MLP layers, cannot be "
                          f"written as GGUF: llama.cpp's {arch} graph needs both in every layer; export a result "
                          "of expert drop or slimming alone, or use the Hugging Face checkpoint")
    if len({_moe_shape(ad, layer) for layer in layers}) > 1 or len(set(src.shapes)) > 1:
        raise ExportError(f"a {mt} result whose layers differ (expert counts, widths or heads) cannot be written as "
                          f"GGUF: llama.cpp's {arch} graph takes one of each for all layers")


def _check_window(src: ExportSource, arch: str) -> None:
    """None of these llama.cpp graphs has a sliding window: refuse a config that attends through one shorter than
    its context (Qwen2-MoE and Qwen3-MoE keep `sliding_window` set but unused unless `use_sliding_window`)."""
    cfg = src.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < cfg.max_position_embeddings:
        raise ExportError(f"this {src.model_type} model cannot be written as GGUF: it attends through a sliding window "
                          f"of {window} positions, which llama.cpp's {arch} graph does not have; use the Hugging "
                          "Face checkpoint")


def _check_olmoe(src: ExportSource) -> None:
    if getattr(src.config, "clip_qkv", None) is not None:
        raise ExportError("this olmoe model cannot be written as GGUF: it clips q/k/v (clip_qkv), which llama.cpp's "
                          "olmoe graph does not do; use the Hugging Face checkpoint")


def repeat_kv_heads(t: torch.Tensor, n_kv: int, n_head: int) -> torch.Tensor:
    """K/V rows (or vector entries) with each KV head repeated for its query heads, in the order transformers'
    `repeat_kv` reads them (query head h uses KV head h // (n_head // n_kv))."""
    heads = t.reshape(n_kv, -1, *t.shape[1:])
    return heads.repeat_interleave(n_head // n_kv, dim=0).reshape(-1, *t.shape[1:])


def _adapter(src: ExportSource) -> MoEAdapter:
    assert isinstance(src.adapter, MoEAdapter)
    return src.adapter


def _moe_shape(ad: MoEAdapter, layer: Any) -> tuple[int, int, int, int]:
    shared = ad.shared_projections(layer)
    return (ad.num_experts(layer), ad.top_k(layer), ad.expert_width(layer),
            0 if shared is None else shared[1].out_features)


def write_moe_keys(w: Any, src: ExportSource, arch: str) -> None:
    """Expert count, top-k and widths (all layers agree: `moe_arch` checked it)."""
    ad = _adapter(src)
    experts, top_k, width, shared = _moe_shape(ad, ad.layers()[0])
    w.add_expert_count(experts)
    w.add_expert_used_count(top_k)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(width)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(shared)


def moe_ffn_tensors(src: ExportSource, layer: Any, i: int) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of one layer's router, experts and shared expert."""
    T = gguf.MODEL_TENSOR
    ad = _adapter(src)
    gate_up, down = ad.expert_tensors(layer)
    width = down.shape[-1]
    out = [(_name(T.FFN_GATE_INP, i), ad.router(layer).weight),
           (_name(T.FFN_GATE_EXP, i), gate_up[:, :width]),
           (_name(T.FFN_UP_EXP, i), gate_up[:, width:]),
           (_name(T.FFN_DOWN_EXP, i), down)]
    shared = ad.shared_projections(layer)
    if shared is not None:
        gate, up, down_s = shared
        out += [(_name(T.FFN_GATE_SHEXP, i), gate.weight), (_name(T.FFN_UP_SHEXP, i), up.weight),
                (_name(T.FFN_DOWN_SHEXP, i), down_s.weight)]
        shared_gate = ad.shared_gate(layer)
        if shared_gate is not None:
            out.append((_name(T.FFN_GATE_INP_SHEXP, i), shared_gate.weight.reshape(-1)))
    return out


def needs_output(arch: str) -> bool:
    return arch in _NEEDS_OUTPUT


def _name(kind: Any, bid: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"
