"""Write a prunekit checkpoint in NVIDIA's Nemotron-NAS layout (`DeciLMForCausalLM`, model_type
`nemotron-nas`), which vLLM serves natively: one `block_configs[i]` per layer says whether its attention and
FFN exist and how wide they are.

What the format can carry (as vLLM's `vllm/model_executor/models/nemotron_nas.py` reads it, written
independently from that file and llama.cpp's `DeciModel` converter):
- `attention.no_op` (sub-layer gone) or `attention.n_heads_in_group`: KV heads = num_attention_heads //
  n_heads_in_group. The number of *query* heads is the global `num_attention_heads` for every layer, so
  per-layer query-head counts cannot be expressed (GGUF's `deci` can).
- `ffn.no_op` or the FFN width: vLLM takes `ffn_mult` when present (width = DeciLM's rounding of
  2 * ffn_mult * hidden / 3 up to a multiple of 256), else `intermediate_size`. prunekit writes
  `intermediate_size` always and `ffn_mult` only when that rounding reproduces the width exactly.
- Weights keep Hugging Face Llama names (`model.layers.i.self_attn.q_proj.weight`, ...); a removed
  sub-layer has no weights and no norm (vLLM builds `input_layernorm` only with attention and
  `post_attention_layernorm` only with an FFN). Rope stays rotate-half (vLLM uses neox style): no permutation.
- vLLM reads `block_configs` with attribute access through the checkpoint's config class; transformers has
  none for `nemotron-nas`, so the export carries `configuration_decilm.py` (prunekit's own, imports only
  transformers) and an `auto_map` to it: load with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prunekit.export.common import ExportError, ExportSource

# Families whose layers are Llama's (pre-norm, SwiGLU, rope): only their weights mean the same thing under
# DeciLM's layer. Qwen2 adds q/k/v biases, which vLLM's DeciLM takes through `qkv_bias`.
_FAMILIES = ("llama", "mistral", "qwen2")
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 4 * 1024**3
REMOTE_CONFIG = "configuration_decilm"


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's rule (vLLM `_ffn_mult_to_intermediate_size`): int(2 * mult * hidden / 3), rounded up to 256."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def _exact_ffn_mult(intermediate: int, hidden: int) -> float | None:
    """An ffn_mult that DeciLM's rule maps back to `intermediate` exactly, or None."""
    if intermediate % 256:
        return None
    for mult in (round(1.5 * intermediate / hidden, 6), 1.5 * intermediate / hidden):
        if ffn_mult_to_intermediate_size(mult, hidden) == intermediate:
            return mult
    return None


def block_configs(src: ExportSource) -> tuple[int, list[dict[str, Any]]]:
    """(num_attention_heads, one block config per layer), or one clear error for what cannot be expressed."""
    if src.model_type not in _FAMILIES:
        raise ExportError(f"nemotron-nas export supports model types {', '.join(_FAMILIES)} (Llama-style layers); "
                          f"got {src.model_type!r}: export GGUF or keep the Hugging Face checkpoint")
    heads = sorted({s.n_head for s in src.shapes if s.has_attn})
    if len(heads) > 1:
        per_layer = ", ".join(f"{i}:{s.n_head}" for i, s in enumerate(src.shapes) if s.has_attn)
        raise ExportError(f"nemotron-nas keeps one query-head count for all layers (only KV heads vary, through "
                          f"n_heads_in_group), but this model has per-layer query heads ({per_layer}): export "
                          "--format gguf (llama.cpp `deci` carries them) or prune heads uniformly")
    n_head = heads[0] if heads else int(src.config.num_attention_heads)
    hidden = int(src.config.hidden_size)
    blocks = []
    for s in src.shapes:
        attn: dict[str, Any] = {"no_op": not s.has_attn, "replace_with_linear": False,
                                "n_heads_in_group": (s.n_head // s.n_head_kv) if s.has_attn else None}
        ffn: dict[str, Any] = {"no_op": not s.has_mlp, "replace_with_linear": False}
        if s.has_mlp:
            mult = _exact_ffn_mult(s.n_ff, hidden)
            if mult is not None:
                ffn["ffn_mult"] = mult
            ffn["intermediate_size"] = s.n_ff
        blocks.append({"attention": attn, "ffn": ffn})
    return n_head, blocks


def nemotron_config(src: ExportSource) -> dict[str, Any]:
    """The exported config.json: the stock fields that still hold for every layer, plus `block_configs`."""
    n_head, blocks = block_configs(src)
    cfg = src.model.config.to_dict()
    for key in ("prunekit", "auto_map", "num_key_value_heads", "intermediate_size", "layer_types",
                "quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    rope = dict(cfg.get("rope_parameters") or {})
    cfg.update({
        "model_type": "nemotron-nas",
        "architectures": ["DeciLMForCausalLM"],
        "num_attention_heads": n_head,
        "head_dim": src.head_dim,
        "num_hidden_layers": len(blocks),
        "block_configs": blocks,
        # Older readers (transformers 4.x remote code, vLLM's config) look for these two instead of
        # rope_parameters.
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
    })
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    # transformers has no class for this model_type: the export carries its own (imports only transformers).
    cfg["auto_map"] = {"AutoConfig": f"{REMOTE_CONFIG}.DeciLMConfig"}
    if src.model_type == "qwen2":
        # vLLM's DeciLM: `qkv_bias` biases q/k/v only, `attention_bias` would also bias o_proj (Qwen2 has none).
        cfg["attention_bias"] = False
        cfg["qkv_bias"] = True
    return cfg


def write_nemotron_nas(src: ExportSource, out_dir: Path, *, dtype: str = "f16") -> None:
    """Weights (safetensors, sharded above 4 GiB), config.json and the tokenizer into `out_dir` (the caller's
    temporary directory, renamed into place when complete)."""

    if dtype not in _DTYPES:
        raise ExportError(f"nemotron-nas writes f32, f16 or bf16 weights; got {dtype!r}")
    config = nemotron_config(src)
    config["torch_dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, t in src.model.state_dict().items():
        if src.tied and name == "lm_head.weight":
            continue  # tie_word_embeddings: the head is the embedding
        # One dtype for every tensor, norms included, as transformers' save_pretrained writes a half model.
        tensors[name] = t.detach().to(_DTYPES[dtype]).contiguous().clone()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    remote = Path(__file__).parent / "remote" / f"{REMOTE_CONFIG}.py"
    (out_dir / remote.name).write_text(remote.read_text())
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(out_dir)
