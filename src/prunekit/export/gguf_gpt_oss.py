"""gpt-oss in llama.cpp's `gpt-oss` graph (`LLM_ARCH_OPENAI_MOE`): the keys, tensors and checks that differ
from the other Mixture-of-Experts families.

Only uniform results fit (every layer attention and a MoE block, one expert count, top-k and expert width for
all; `gguf_moe.check_uniform_moe`). What the graph computes, and therefore what is written or refused
(references read, written independently: llama.cpp `src/models/openai-moe-iswa.cpp` (graph),
`llama_model_openai_moe::load_arch_hparams` / `load_arch_tensors` (keys, tensor shapes, which are required),
`build_moe_ffn` in `src/llama-graph.cpp` (gating, activation), `ggml_rope_yarn_corr_dims` in ggml (YaRN),
`conversion/gpt_oss.py` / `GptOssModel` and `TextModel.set_gguf_parameters` in convert_hf_to_gguf (keys and the
non-MXFP4 expert layout), gguf-py `MODEL_ARCH.GPT_OSS`):
- the router `ffn_gate_inp` has a bias; the graph takes the top k of the biased logits and a softmax over those
  k (`LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT`, no renormalisation after), as transformers' router does;
- transformers' `gate_up_proj` [E, H, 2I] holds gate and up in alternating columns (gate 2c, up 2c + 1): they
  are written as `ffn_gate_exps` / `ffn_up_exps` [E, I, H] with their biases [E, I] split the same way;
  `down_proj` [E, I, H] is written transposed as `ffn_down_exps` [E, H, I], its bias [E, H] as it is.
  Unquantized (f32/f16) expert tensors are what the converter writes for a checkpoint without MXFP4 blocks;
- the activation is SwiGLU-OAI with alpha 1.702 and limit 7.0 fixed in the graph (no key): a config with other
  `swiglu_alpha` / `swiglu_limit` is refused;
- one learnt sink per query head (`attn_sinks`); q/k/v/o biases are required tensors, so a config without
  attention biases gets zero biases (adding zero is exact); the attention scale is 1/sqrt(head_dim), as
  transformers'; the MLP norm is `post_attention_norm`; `output` is required even when tied;
- layer i attends through the sliding window iff i is even (period 2, `set_swa_pattern(2)`), over the last
  `attention.sliding_window` positions as transformers' mask does: a dropped block that breaks the
  alternation is refused;
- rope is NEOX style (rotate-half, as transformers: no Q/K permutation), the same on sliding and full layers;
  YaRN is written as the converter writes it (type, factor, original context, beta fast/slow), and llama.cpp
  scales cos/sin by 1 + 0.1 ln(factor) as transformers does without `attention_factor`/`mscale`. ggml always
  rounds YaRN's correction range outwards (floor/ceil), which transformers does only with `truncate: true`:
  a `truncate: false` config (the released gpt-oss checkpoints) is written as the converter writes it, so the
  GGUF runs as llama.cpp runs the released models (the same as transformers with the range rounded, which
  the tests check), with one warning that says so.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import gguf
import torch

from prunekit.adapters.moe import MoEAdapter
from prunekit.export.common import ExportError, ExportSource
from prunekit.export.gguf_moe import check_uniform_moe

__all__ = ["ARCH", "gpt_oss_arch", "gpt_oss_tensors", "write_gpt_oss_keys", "yarn_correction_range"]

log = logging.getLogger(__name__)

ARCH = "gpt-oss"
# SwiGLU-OAI constants llama.cpp's build_moe_ffn hard-codes for this graph.
_ALPHA, _LIMIT = 1.702, 7.0
_SLIDING, _FULL = "sliding_attention", "full_attention"
# YaRN fields this writer maps (llama.cpp keys) or checks; any other field of a YaRN config is refused.
_YARN_FIELDS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "truncate"}


def _adapter(src: ExportSource) -> MoEAdapter:
    assert isinstance(src.adapter, MoEAdapter)
    return src.adapter


def gpt_oss_arch(src: ExportSource) -> str:
    """The llama.cpp architecture (`gpt-oss`) of a result it computes as transformers does, or one clear error."""
    check_uniform_moe(src, ARCH)
    cfg = src.config
    problems = []
    alpha, limit = float(getattr(cfg, "swiglu_alpha", _ALPHA)), float(getattr(cfg, "swiglu_limit", _LIMIT))
    if not (math.isclose(alpha, _ALPHA, rel_tol=1e-6) and math.isclose(limit, _LIMIT, rel_tol=1e-6)):
        problems.append(f"SwiGLU alpha {alpha:g} / limit {limit:g} (the graph fixes {_ALPHA} / {_LIMIT})")
    if not getattr(cfg, "sliding_window", None):
        problems.append("no sliding window (the graph slides on every other layer)")
    if problems:
        raise ExportError("this gpt_oss model cannot be written for llama.cpp's gpt-oss graph: " + "; ".join(problems))
    _check_layer_types(list(cfg.layer_types))
    yarn = _yarn(cfg)  # its own errors
    if yarn is not None and not yarn["truncate"]:
        _warn_rounded_range(int(cfg.head_dim), yarn["theta"], yarn["original"], yarn["beta_fast"], yarn["beta_slow"])
    return ARCH


def _check_layer_types(layer_types: list[str]) -> None:
    expected = [_SLIDING if i % 2 == 0 else _FULL for i in range(len(layer_types))]
    if layer_types != expected:
        raise ExportError(
            "this gpt_oss result's sliding/full attention layers no longer alternate from a sliding first layer "
            f"({''.join('S' if t == _SLIDING else 'F' for t in layer_types)}), which llama.cpp's gpt-oss graph "
            "assumes (a dropped block usually breaks it); drop blocks in pairs or use the Hugging Face checkpoint")


def yarn_correction_range(dim: int, base: float, original_ctx: int, beta_fast: float,
                          beta_slow: float) -> tuple[float, float]:
    """YaRN's (low, high) correction dimensions before any rounding, clamped to [0, dim - 1] (transformers'
    `find_correction_range` with truncate off; ggml floors low and ceils high before clamping)."""
    def dim_of(rotations: float) -> float:
        return dim * math.log(original_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(dim_of(beta_fast), 0.0), min(dim_of(beta_slow), float(dim - 1))


def _yarn(cfg: Any) -> dict[str, Any] | None:
    """The YaRN parameters to write, None for unscaled rope, or one clear error."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    if kind != "yarn":
        raise ExportError(f"rope scaling type {kind!r} is not written for llama.cpp's gpt-oss graph (default, yarn)")
    extra = sorted(k for k, v in params.items() if k not in _YARN_FIELDS and v is not None)
    if extra or not params.get("factor"):
        raise ExportError(f"this gpt_oss YaRN config cannot be written for llama.cpp: it sets {', '.join(extra) or 'no factor'}, "
                          "which the writer does not map; use the Hugging Face checkpoint")
    beta_fast, beta_slow = float(params.get("beta_fast") or 32.0), float(params.get("beta_slow") or 1.0)
    original = int(params["original_max_position_embeddings"])
    return {"factor": float(params["factor"]), "original": original, "beta_fast": beta_fast, "beta_slow": beta_slow,
            "theta": float(params["rope_theta"]), "truncate": bool(params.get("truncate", True))}


def _warn_rounded_range(dim: int, base: float, original: int, beta_fast: float, beta_slow: float) -> None:
    """llama.cpp runs every gpt-oss GGUF (the released ones included) with YaRN's correction range rounded
    outwards; a pruned model exported for llama.cpp should run as llama.cpp runs the model it came from, so
    the range is written as the converter writes it, and the difference from transformers is said once."""
    low, high = yarn_correction_range(dim, base, original, beta_fast, beta_slow)
    rounded = (math.floor(low), min(math.ceil(high), dim - 1))
    if (low, high) != rounded:
        log.warning("llama.cpp rounds this gpt_oss model's YaRN correction range %.3f..%.3f to %d..%d, as for every "
                    "gpt-oss GGUF, so its rope frequencies differ slightly from transformers' (truncate: false)",
                    low, high, *rounded)


def write_gpt_oss_keys(w: Any, src: ExportSource) -> None:
    """Rope, sliding-window and expert keys (the common ones are written by the caller)."""
    cfg = src.config
    ad = _adapter(src)
    layer = ad.layers()[0]
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(src.head_dim)
    yarn = _yarn(cfg)
    if yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original"])
        w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
    w.add_sliding_window(int(cfg.sliding_window))
    w.add_expert_count(ad.num_experts(layer))
    w.add_expert_used_count(ad.top_k(layer))
    w.add_expert_feed_forward_length(ad.expert_width(layer))


def _name(kind: Any, bid: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


def _attention(src: ExportSource, layer: Any, i: int) -> list[tuple[str, torch.Tensor]]:
    T = gguf.MODEL_TENSOR
    out = []
    for kind, lin in zip((T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT), src.adapter.attn_projections(layer)):
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
        out += [(_name(kind, i), lin.weight), (_name(kind, i, "bias"), bias)]
    sinks = _adapter(src).attention_sinks(layer)
    assert sinks is not None
    out.append((_name(T.ATTN_SINKS, i), sinks))
    return out


def _experts(ad: MoEAdapter, layer: Any, i: int) -> list[tuple[str, torch.Tensor]]:
    T = gguf.MODEL_TENSOR
    gate_up, down = ad.expert_tensors(layer)  # [E, H, 2I], [E, I, H]
    gate_up_b, down_b = ad.expert_biases(layer)  # [E, 2I], [E, H]
    assert gate_up_b is not None and down_b is not None
    router = ad.router(layer)
    return [(_name(T.FFN_GATE_INP, i), router.weight), (_name(T.FFN_GATE_INP, i, "bias"), router.bias),
            (_name(T.FFN_GATE_EXP, i), gate_up[:, :, 0::2].transpose(1, 2).contiguous()),
            (_name(T.FFN_GATE_EXP, i, "bias"), gate_up_b[:, 0::2].contiguous()),
            (_name(T.FFN_UP_EXP, i), gate_up[:, :, 1::2].transpose(1, 2).contiguous()),
            (_name(T.FFN_UP_EXP, i, "bias"), gate_up_b[:, 1::2].contiguous()),
            (_name(T.FFN_DOWN_EXP, i), down.transpose(1, 2).contiguous()),
            (_name(T.FFN_DOWN_EXP, i, "bias"), down_b)]


def gpt_oss_tensors(src: ExportSource) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every gpt-oss weight, in llama.cpp's layout."""
    T = gguf.MODEL_TENSOR
    ad = _adapter(src)
    out: list[tuple[str, torch.Tensor]] = [(_name(T.TOKEN_EMBD), ad.embed().weight)]
    for i, layer in enumerate(ad.layers()):
        out.append((_name(T.ATTN_NORM, i), getattr(layer, ad.spec.attn_norms[0]).weight))
        out += _attention(src, layer, i)
        out.append((_name(T.ATTN_POST_NORM, i), getattr(layer, ad.spec.mlp_norms[0]).weight))
        out += _experts(ad, layer, i)
    out += [(_name(T.OUTPUT_NORM), ad.final_norm().weight), (_name(T.OUTPUT), ad.lm_head().weight)]
    return out
