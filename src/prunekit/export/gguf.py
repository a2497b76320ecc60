"""Write a prunekit checkpoint as one GGUF file for llama.cpp.

Which llama.cpp architecture carries which result:
- uniform Llama/Mistral -> `llama`, uniform Qwen2 -> `qwen2`, uniform Qwen3 -> `qwen3`, uniform Granite ->
  `granite` (the stock graphs; Granite's four multipliers as its `*_scale` keys);
- heterogeneous Llama/Mistral/Qwen2 (attention or MLP removed in some layers, per-layer head/KV/MLP widths)
  -> `deci`, llama.cpp's graph for NVIDIA's Nemotron-NAS models, which reads per-layer
  `attention.head_count`, `attention.head_count_kv` and `feed_forward_length` arrays (0 = sub-layer gone);
- uniform Gemma 3 -> `gemma3` (`gguf_gemma3.py`: 1 + w norms, sliding-window keys), uniform Gemma 2 ->
  `gemma2` (`gguf_gemma2.py`: soft-capping keys; what both Gemmas share is in `gguf_gemma.py`), uniform OLMo 2
  -> `olmo2` (`gguf_olmo2.py`: post-norms, full-width q/k norms, query heads never narrowed), uniform Phi-3
  with every query head -> `phi3` (`gguf_phi3.py`: fused tensors, partial rotary, longrope factors), uniform
  SmolLM3 -> `smollm3` (`gguf_smollm3.py`: written while its layers without rope are llama.cpp's every 4th);
  heterogeneous results of those have no llama.cpp graph and are refused, as are heterogeneous Qwen3 and
  Granite results;
- uniform Mixtral -> `llama` with expert tensors, Qwen2-MoE -> `qwen2moe`, Qwen3-MoE -> `qwen3moe`, OLMoE ->
  `olmoe` (`gguf_moe.py`), gpt-oss -> `gpt-oss` (`gguf_gpt_oss.py`); per-layer expert counts or widths have no
  llama.cpp graph and are refused.
The tokenizer part is `gguf_vocab.py`.

References read (written independently, cited for the conventions they fix):
- llama.cpp `convert_hf_to_gguf.py` / `conversion/deci.py` (`DeciModel`): per-layer arrays, the Q/K row
  permutation for llama-style ("normal") rope, `rope.dimension_count`, key/value length.
- llama.cpp `src/models/deci.cpp`: n_head == 0 skips attention and its norm; n_ff == 0 `continue`s the layer
  loop *before* the residual stream is updated (see `_FFN_STANDIN` below); q/k/v/o biases are optional.
- llama.cpp `src/llama-model.cpp` (DECI hparams and tensors): rms eps, per-layer n_embd_k_gqa; rope type NORM.
- gguf-py `gguf/constants.py`: key names, `MODEL_ARCH.DECI` / `LLAMA` / `QWEN2` / `QWEN3` tensor lists.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from prunekit.export.common import ExportError, ExportSource, LayerShape, to_numpy
from prunekit.export.gguf_gemma import gemma_tensors
from prunekit.export.gguf_gemma2 import gemma2_arch, write_gemma2_keys
from prunekit.export.gguf_gemma3 import gemma3_arch, write_gemma3_keys
from prunekit.export.gguf_gpt_oss import gpt_oss_arch, gpt_oss_tensors, write_gpt_oss_keys
from prunekit.export.gguf_moe import (
    MHA_ONLY,
    MOE_ARCHS,
    moe_arch,
    moe_ffn_tensors,
    needs_output,
    repeat_kv_heads,
    write_moe_keys,
)
from prunekit.export.gguf_olmo2 import olmo2_arch, olmo2_tensors
from prunekit.export.gguf_phi3 import phi3_arch, phi3_tensors, write_phi3_keys
from prunekit.export.gguf_smollm3 import smollm3_arch
from prunekit.export.gguf_vocab import bpe_pre_name, write_vocab

__all__ = ["DIRECT_TYPES", "QUANT_TYPES", "bpe_pre_name", "gguf_arch", "permute_qk", "quantizer", "write_gguf"]

# Output types written by this module directly; everything else goes through llama.cpp's quantizer.
DIRECT_TYPES = ("f32", "f16")

# Architecture families prunekit can express in GGUF, keyed by `config.model_type`:
# (stock llama.cpp arch for uniform results, None when a heterogeneous result can go to `deci`, else why it
# cannot).
_FAMILIES: dict[str, tuple[str, str | None]] = {
    "llama": ("llama", None),
    "mistral": ("llama", None),
    "qwen2": ("qwen2", None),
    "qwen3": ("qwen3", "llama.cpp's `deci` graph has no q/k norms"),
    # Granite is Llama's graph with four scalars.
    "granite": ("granite", "llama.cpp's `deci` graph has no embedding, residual, attention or logit multipliers"),
}
# llama.cpp graphs whose rope is "normal" (adjacent pairs; `llama_model_rope_type` returns NORM), so Q/K rows
# are permuted from Hugging Face's rotate-half layout. The rope convention belongs to the graph, not the
# Hugging Face family: Mixtral is written as `llama` and needs it; qwen2/qwen3/qwen2moe/qwen3moe/olmoe are NEOX.
_NORM_ROPE = ("llama", "deci", "granite", "smollm3")


@dataclass(frozen=True)
class Graph:
    """What one llama.cpp graph needs beyond the common keys: its own keys, its tensor list where it is not
    Llama's (`_tensors`), and whether those keys include the rope."""

    keys: Callable[[Any, ExportSource], None] | None = None
    tensors: Callable[[ExportSource], list[tuple[str, torch.Tensor]]] | None = None
    own_rope: bool = False


def _granite_keys(w: Any, src: ExportSource) -> None:
    """Granite's multipliers, always written: llama.cpp reads an absent attention scale as 1/sqrt(head size),
    where Granite uses `attention_multiplier` in its place."""
    cfg = src.config
    w.add_attention_scale(float(cfg.attention_multiplier))
    w.add_embedding_scale(float(cfg.embedding_multiplier))
    w.add_residual_scale(float(cfg.residual_multiplier))
    w.add_logit_scale(float(cfg.logits_scaling))


_LLAMA_STYLE = Graph()
_GRAPHS: dict[str, Graph] = {
    "granite": Graph(keys=_granite_keys),
    "gemma3": Graph(keys=write_gemma3_keys, tensors=gemma_tensors),
    "gemma2": Graph(keys=write_gemma2_keys, tensors=gemma_tensors),
    "olmo2": Graph(tensors=olmo2_tensors),
    "phi3": Graph(keys=write_phi3_keys, tensors=phi3_tensors, own_rope=True),
    "gpt-oss": Graph(keys=write_gpt_oss_keys, tensors=gpt_oss_tensors, own_rope=True),
}
# Families whose own module picks (and checks) their llama.cpp arch, by `config.model_type`.
_OWN_ARCH: dict[str, Callable[[ExportSource], str]] = {
    "gemma3": gemma3_arch, "gemma3_text": gemma3_arch, "gemma2": gemma2_arch, "olmo2": olmo2_arch,
    "phi3": phi3_arch, "smollm3": smollm3_arch, "gpt_oss": gpt_oss_arch}

# A llama.cpp `deci` layer with attention but n_ff == 0 is not usable: deci.cpp `continue`s before
# `inpL = cur`, dropping the attention output, and the llama.cpp in xllamacpp 2026.10 aborts on such a file
# (GGML_ASSERT(buffer) in ggml-backend.cpp; tried). Such a layer is therefore written as an MLP of this width
# whose weights are all zero: silu(0) * 0 @ 0 adds exactly nothing and the attention output reaches the
# residual stream (tested against transformers). 32 is the smallest width every llama.cpp quantization block
# accepts (q8_0/q4_0 blocks are 32 wide). Layers without attention do use n_head = 0, as DeciModel writes.
_FFN_STANDIN = 32


def gguf_arch(src: ExportSource) -> str:
    """The llama.cpp architecture this checkpoint is written as, or one clear error."""
    mt = src.model_type
    if mt in MOE_ARCHS:
        return moe_arch(src)
    if mt in _OWN_ARCH:
        return _OWN_ARCH[mt](src)
    if mt not in _FAMILIES:
        raise ExportError(f"GGUF export supports model types {', '.join(sorted([*_FAMILIES, *MOE_ARCHS, *_OWN_ARCH]))}; "
                          f"got {mt!r}")
    stock, no_deci = _FAMILIES[mt]
    if not src.heterogeneous:
        return stock
    if no_deci:
        raise ExportError(f"a heterogeneous {mt} result cannot be written as GGUF: {no_deci}; export a uniform result")
    return "deci"


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows (or bias entries) from Hugging Face's rotate-half rope layout (first half of each
    head paired with the second half) to llama.cpp's "normal" rope, which rotates adjacent pairs
    (as convert_hf_to_gguf's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in params:  # per-layer-type rope (Gemma 3 style)
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    return float(theta), scaling


def _write_rope(w: Any, cfg: Any, head_dim: int) -> np.ndarray | None:
    """Rope keys; returns llama3-style per-frequency factors (the `rope_freqs` tensor) when needed."""
    theta, scaling = _rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    kind = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    if kind == "default":
        return None
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "llama3":
        # Same factors as convert_hf_to_gguf's LlamaModel.generate_extra_tensors (Llama 3.1 scaling).
        base = theta
        freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factor = float(scaling.get("factor", 8.0))
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        out = []
        for f in freqs:
            wl = 2 * np.pi / f
            if wl < high_wl:
                out.append(1.0)
            elif wl > low_wl:
                out.append(factor)
            else:
                smooth = (old_ctx / wl - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, dtype=np.float32)
    raise ExportError(f"rope scaling type {kind!r} is not supported by the GGUF export (default, linear, llama3)")


# --- tensors -------------------------------------------------------------------------------------------------

def _tensor_name(kind: Any, bid: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


def _check_arch_tensors(arch: str, names: list[str]) -> None:
    """Every tensor name must be one the architecture declares (gguf-py's MODEL_TENSORS), so a typo can never
    produce a file llama.cpp silently ignores parts of."""
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_enum]}
    for name in names:
        stem = name.rsplit(".", 1)[0]
        generic = stem.split(".")[0] if not stem.startswith("blk.") else "blk.{bid}." + stem.split(".", 2)[2]
        if generic not in allowed:
            raise AssertionError(f"tensor {name} is not part of llama.cpp's {arch} architecture")


def _tensors(src: ExportSource, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight, in llama.cpp's layout (Q/K permuted where the arch needs it)."""
    T = gguf.MODEL_TENSOR
    a = src.adapter
    permute = arch in _NORM_ROPE
    mha = arch in MHA_ONLY
    out: list[tuple[str, torch.Tensor]] = [(_tensor_name(T.TOKEN_EMBD), a.embed().weight)]
    hidden = a.hidden_size
    for i, (layer, shape) in enumerate(zip(a.layers(), src.shapes)):
        if shape.has_attn:
            out.append((_tensor_name(T.ATTN_NORM, i), getattr(layer, a.spec.attn_norms[0]).weight))
            (q, qb), (k, kb), (v, vb) = a.split_weights(layer, "attn")  # a fused qkv (Phi-3) as three
            o = a.output_projection(layer, "attn")
            for kind, wt, bias, heads in ((T.ATTN_Q, q, qb, shape.n_head), (T.ATTN_K, k, kb, shape.n_head_kv),
                                          (T.ATTN_V, v, vb, None), (T.ATTN_OUT, o.weight, o.bias, None)):
                if mha and kind in (T.ATTN_K, T.ATTN_V):
                    wt, bias = (None if x is None else repeat_kv_heads(x, shape.n_head_kv, shape.n_head)
                                for x in (wt, bias))
                if permute and heads:
                    wt = permute_qk(wt, heads)
                    bias = permute_qk(bias, heads) if bias is not None else None
                out.append((_tensor_name(kind, i), wt))
                if bias is not None:
                    out.append((_tensor_name(kind, i, "bias"), bias))
            qn, kn = a.qk_norms(layer)
            if qn is not None:
                out.append((_tensor_name(T.ATTN_Q_NORM, i), qn.weight))
                kw = repeat_kv_heads(kn.weight, shape.n_head_kv, shape.n_head) if mha else kn.weight
                out.append((_tensor_name(T.ATTN_K_NORM, i), kw))
        if shape.has_mlp and src.model_type in MOE_ARCHS:
            out.append((_tensor_name(T.FFN_NORM, i), getattr(layer, a.spec.mlp_norms[0]).weight))
            out += moe_ffn_tensors(src, layer, i)
        elif shape.has_mlp:
            out.append((_tensor_name(T.FFN_NORM, i), getattr(layer, a.spec.mlp_norms[0]).weight))
            (gate, _), (up, _) = a.split_weights(layer, "mlp")
            out += [(_tensor_name(T.FFN_GATE, i), gate), (_tensor_name(T.FFN_UP, i), up),
                    (_tensor_name(T.FFN_DOWN, i), a.output_projection(layer, "mlp").weight)]
        elif arch == "deci" and shape.has_attn:
            n = _FFN_STANDIN
            out += [(_tensor_name(T.FFN_NORM, i), torch.ones(hidden)),
                    (_tensor_name(T.FFN_GATE, i), torch.zeros(n, hidden)),
                    (_tensor_name(T.FFN_UP, i), torch.zeros(n, hidden)),
                    (_tensor_name(T.FFN_DOWN, i), torch.zeros(hidden, n))]
    out.append((_tensor_name(T.OUTPUT_NORM), a.final_norm().weight))
    if not src.tied or needs_output(arch):  # llama.cpp reuses token_embd when `output` is absent, where it can
        out.append((_tensor_name(T.OUTPUT), a.lm_head().weight))
    return out


def written_shapes(src: ExportSource, arch: str) -> list[LayerShape]:
    """Per-layer (n_head, n_head_kv, n_ff) as written into the GGUF (MLP stand-ins included)."""
    if arch in MHA_ONLY:
        return [LayerShape(s.n_head, s.n_head, s.n_ff) for s in src.shapes]
    if arch != "deci":
        return list(src.shapes)
    return [LayerShape(s.n_head, s.n_head_kv, s.n_ff or (_FFN_STANDIN if s.has_attn else 0)) for s in src.shapes]


def write_gguf(src: ExportSource, path: Path, *, ftype: str = "f16", name: str | None = None,
               progress: bool = False) -> str:
    """Write `src` to `path` (a plain, non-atomic write: callers pass a temporary path). Returns the arch."""
    if ftype not in DIRECT_TYPES:
        raise ExportError(f"write_gguf writes {', '.join(DIRECT_TYPES)}; got {ftype!r}")
    arch = gguf_arch(src)
    cfg = src.config
    shapes = written_shapes(src, arch)
    hd = src.head_dim
    for i, s in enumerate(shapes):
        if s.has_attn and s.n_head % s.n_head_kv:
            raise ExportError(f"layer {i}: {s.n_head} query heads are not a multiple of {s.n_head_kv} KV heads")
    graph = _GRAPHS.get(arch, _LLAMA_STYLE)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or str(getattr(cfg, "_name_or_path", "") or "prunekit model"))
    w.add_block_count(len(shapes))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    if arch == "deci":
        w.add_head_count([s.n_head for s in shapes])
        w.add_head_count_kv([s.n_head_kv for s in shapes])
        w.add_feed_forward_length([s.n_ff for s in shapes])
    else:
        w.add_head_count(shapes[0].n_head)
        w.add_head_count_kv(shapes[0].n_head_kv)
        w.add_feed_forward_length(shapes[0].n_ff)
    # Always explicit: llama.cpp would otherwise derive head size as hidden / n_head, wrong once heads are pruned.
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    rope_freqs = None if graph.own_rope else _write_rope(w, cfg, hd)
    if graph.keys is not None:
        graph.keys(w, src)
    if src.model_type in MOE_ARCHS:
        write_moe_keys(w, src, arch)
    file_type = gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    w.add_file_type(file_type)
    write_vocab(w, src.tokenizer, int(cfg.vocab_size))

    tensors = graph.tensors(src) if graph.tensors else _tensors(src, arch)
    if rope_freqs is not None:
        tensors.append((_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), torch.from_numpy(rope_freqs)))
    _check_arch_tensors(arch, [n for n, _ in tensors])
    big = np.float32 if ftype == "f32" else np.float16
    for tname, t in tensors:
        # Norms, biases (gpt-oss's expert biases are [E, I]) and rope factors stay float32 (as convert_hf_to_gguf
        # does); matrices take the file type.
        w.add_tensor(tname, to_numpy(t, np.float32 if t.ndim == 1 or tname.endswith(".bias") else big))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()
    return arch


# --- quantization --------------------------------------------------------------------------------------------

QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")
LLAMACPP_HINT = "install llama-cpp-python (`make llamacpp`, or pip install 'prunekit[llamacpp]')"


def quantizer() -> Callable[[Path, Path, str], None]:
    """llama.cpp's own quantizer through llama-cpp-python (xllamacpp exposes none), or one clear error."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"quantized GGUF output needs llama.cpp's quantizer: {LLAMACPP_HINT}") from e

    def run(src_f16: Path, dst: Path, qtype: str) -> None:
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
        if ftype is None:
            raise ExportError(f"this llama-cpp-python has no quantization type {qtype!r}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        rc = llama_cpp.llama_model_quantize(str(src_f16).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"llama.cpp's quantizer failed ({qtype}, return code {rc})")

    return run


logging.getLogger("gguf").setLevel(logging.WARNING)
