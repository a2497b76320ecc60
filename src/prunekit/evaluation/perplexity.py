"""Evaluation: perplexity over fixed windows, parameter counts, and KV-cache size per token."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.adapters import ModelAdapter
from prunekit.surgery import count_parameters


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """exp(mean NLL) over every predicted token of non-overlapping windows ([n, length] token ids).

    Each window is scored independently (no state carried across), so results do not depend on the
    batch size."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[i: i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        # float64 sum: tiny per-token differences between models must not drown in rounding.
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                              reduction="none")
        total_nll += float(nll.double().sum())
        total_tokens += nll.numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": int(len(windows)),
            "window_len": int(windows.shape[1])}


def kv_bytes_per_token(adapter: ModelAdapter, dtype_bytes: int | None = None) -> int:
    """Bytes of K and V one token adds to the cache, over the layers that still have attention.

    Read from the actual k/v projection widths, so width-pruned models report their smaller cache."""
    itemsize = dtype_bytes or adapter.dtype().itemsize
    total = 0
    for layer in adapter.layers():
        if adapter.has_attention(layer):
            total += 2 * adapter.attention_shape(layer)[1] * adapter.head_dim * itemsize
    return total


def attention_layers(adapter: ModelAdapter) -> list[int]:
    return [i for i, layer in enumerate(adapter.layers()) if adapter.has_attention(layer)]


def model_summary(adapter: ModelAdapter) -> dict[str, Any]:
    layers = adapter.layers()
    attn = attention_layers(adapter)
    return {
        "params": count_parameters(adapter.model),
        "kv_bytes_per_token": kv_bytes_per_token(adapter),
        "num_layers": len(layers),
        "attention_layers": len(attn),
        "mlp_layers": sum(1 for layer in layers if adapter.has_mlp(layer)),
        "dtype": str(adapter.dtype()).replace("torch.", ""),
    }


def decode_flops_per_token(adapter: ModelAdapter, context: int) -> dict[str, int]:
    """Multiply-add FLOPs (x2) one decoded token costs at `context` tokens of history, split into the
    decoder layers' attention and MLP (what pruning removes) and the LM head (what it never removes).

    Used as the *ideal* speed-up a pruned model could reach if time followed compute exactly."""
    attn = mlp = 0
    hd = adapter.head_dim
    for layer in adapter.layers():
        if adapter.has_attention(layer):
            proj = sum(m.in_features * m.out_features for m in adapter.projections(layer, "attn"))
            heads = adapter.attention_shape(layer)[0]
            attn += 2 * proj + 2 * 2 * context * heads * hd  # projections + scores and weighted sum
        if adapter.has_mlp(layer):
            mlp += 2 * adapter.mlp_macs(layer)  # a Mixture-of-Experts block counts the experts a token runs
    head = adapter.lm_head()
    head_flops = 2 * head.in_features * head.out_features
    return {"attn": attn, "mlp": mlp, "layers": attn + mlp, "lm_head": head_flops, "total": attn + mlp + head_flops}
