"""Width surgery: physically narrow attention (query heads, KV heads) and MLPs (intermediate channels) in place.

Contract of `apply_widths`: the kept indices in each `LayerWidth` index the layer's modules *as they are
when it is called*. For an un-narrowed model that is the ORIGINAL layer, which is what a `PruningPlan`
stores, so `apply_plan(adapter, plan)` on a freshly loaded model is correct. The iterative shot loop in
`prunekit.width` applies shot-relative indices here and composes them back to original indices itself.

Re-applying a plan is harmless: a sub-layer that already has exactly as many units as the plan keeps is left
alone (the only subset of that size is all of it), so `apply_plan(plan)` on the model `width_prune` has
already narrowed, or on a reloaded pruned checkpoint, changes nothing. The check is by count only: it
cannot tell which original indices a narrowed layer holds.

Projections keep their module objects (so anything holding a reference stays valid); their weight and bias
Parameters are replaced by sliced copies with the same dtype, device and `requires_grad`, and
`in_features` / `out_features` are updated. Attention modules cache `num_key_value_groups` (read by the
eager and SDPA attention functions to repeat or pack KV heads); it is recomputed, along with any other
integer head-count attribute the module happens to carry.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.errors import PlanError
from prunekit.moe.surgery import MoEWidth, apply_moe_width, is_moe_layer, resolve_moe_width
from prunekit.plans import LayerWidth

# Head-count attributes some attention implementations cache on the module (HF Llama-style modules only
# cache `num_key_value_groups`; others, and older versions, keep these).
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _check_indices(name: str, layer: int, idx: list[int], size: int) -> list[int]:
    out = sorted(int(i) for i in idx)
    if not out:
        raise PlanError(f"layer {layer}: the plan keeps no {name} (at least one must remain)")
    if len(set(out)) != len(out):
        raise PlanError(f"layer {layer}: the plan lists a kept {name.removesuffix('s')} twice")
    if out[0] < 0 or out[-1] >= size:
        raise PlanError(f"layer {layer}: kept {name} must lie in 0..{size - 1} (got {out[0]}..{out[-1]})")
    return out


def _resolve_heads(layer_idx: int, w: LayerWidth, num_heads: int, num_kv: int) -> tuple[list[int], list[int]]:
    """Validated (kept query heads, kept KV heads), both ascending.

    GQA rule: query head h reads KV head h // g (g = num_heads // num_kv). After narrowing, the i-th kept
    query head reads the (i // g')-th kept KV head, so every kept KV group must keep the same number g' of
    its own query heads and no query head may stay whose KV head goes."""
    heads = _check_indices("query heads", layer_idx, w.heads if w.heads is not None else list(range(num_heads)),
                           num_heads)
    kv = _check_indices("KV heads", layer_idx, w.kv_heads if w.kv_heads is not None else list(range(num_kv)),
                        num_kv)
    g = num_heads // num_kv
    if len(heads) % len(kv):
        raise PlanError(f"layer {layer_idx}: {len(heads)} query heads cannot be shared evenly by {len(kv)} KV heads")
    g_new = len(heads) // len(kv)
    for i, h in enumerate(heads):
        if h // g != kv[i // g_new]:
            raise PlanError(
                f"layer {layer_idx}: kept query heads {heads} do not match kept KV heads {kv} under GQA "
                f"(each kept KV head must keep {g_new} of its own {g} query heads)"
            )
    return heads, kv


def _rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    return (torch.tensor(heads, device=device).unsqueeze(1) * head_dim
            + torch.arange(head_dim, device=device)).reshape(-1)


def slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0: output features, and the bias) or columns (dim=1: input features) of `lin`."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, idx).contiguous()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            b = lin.bias.detach().index_select(0, idx).contiguous()
            lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
        lin.out_features = int(idx.numel())
    else:
        # The bias lives on the output side: unchanged by dropping input columns.
        lin.in_features = int(idx.numel())


def narrow_attention(adapter: ModelAdapter, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
    """Keep query heads `heads` and KV heads `kv_heads` (current indices, validated for GQA)."""
    attn = adapter.attn(layer)
    q, k, v, o = adapter.attn_projections(layer)
    hd = adapter.head_dim
    dev = q.weight.device
    q_rows, kv_rows = _rows(heads, hd, dev), _rows(kv_heads, hd, dev)
    slice_linear(q, q_rows, 0)
    slice_linear(k, kv_rows, 0)
    slice_linear(v, kv_rows, 0)
    slice_linear(o, q_rows, 1)
    # q_norm / k_norm (Qwen3, Gemma3) are [head_dim] and shared by all heads: nothing to slice.
    attn.num_key_value_groups = len(heads) // len(kv_heads)
    for name in _HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(heads))
    for name in _KV_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(kv_heads))


def narrow_mlp(adapter: ModelAdapter, layer: nn.Module, channels: list[int]) -> None:
    """Keep intermediate channels `channels` (current indices): rows of gate/up, columns of down."""
    gate, up, down = adapter.mlp_projections(layer)
    idx = torch.tensor(channels, device=up.weight.device)
    if gate is not None:
        slice_linear(gate, idx, 0)
    slice_linear(up, idx, 0)
    slice_linear(down, idx, 1)
    mlp = adapter.mlp(layer)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(channels)


def apply_widths(adapter: ModelAdapter, widths: Mapping[int, LayerWidth]) -> None:
    """Narrow layers in place to the kept indices in `widths` (layer index -> LayerWidth, indices relative to
    the modules as they are now; see the module docstring). Everything is validated first, so a bad plan
    raises `PlanError` without touching the model. `hidden_size` never changes."""
    layers = adapter.layers()
    todo: list[tuple[nn.Module, tuple[list[int], list[int]] | None, list[int] | None]] = []
    moe: list[tuple[nn.Module, MoEWidth]] = []
    for key, w in sorted(widths.items()):
        i = int(key)
        if not 0 <= i < len(layers):
            raise PlanError(f"the plan narrows layer {i} but the model has layers 0..{len(layers) - 1}")
        layer = layers[i]
        heads_kv = None
        if w.heads is not None or w.kv_heads is not None:
            if not adapter.has_attention(layer):
                raise PlanError(f"the plan narrows the attention of layer {i}, which has no attention")
            adapter.check_narrow_heads()
            nh, nkv = adapter.attention_shape(layer)
            want = (nh if w.heads is None else len(w.heads), nkv if w.kv_heads is None else len(w.kv_heads))
            if want != (nh, nkv):  # equal: already narrowed (or keeps everything), see the module docstring
                heads_kv = _resolve_heads(i, w, nh, nkv)
        channels = None
        if is_moe_layer(adapter, layer):
            moe.append((layer, resolve_moe_width(adapter, i, layer, w)))  # type: ignore[arg-type]
        elif w.experts is not None or w.shared_channels is not None:
            raise PlanError(f"the plan keeps experts of layer {i}, whose MLP is not a block of experts")
        elif w.channels is not None:
            if not adapter.has_mlp(layer):
                raise PlanError(f"the plan narrows the MLP of layer {i}, which has no MLP")
            width = adapter.mlp_width(layer)
            if len(w.channels) != width:
                channels = _check_indices("MLP channels", i, w.channels, width)
        todo.append((layer, heads_kv, channels))
    with torch.no_grad():
        for layer, heads_kv, channels in todo:
            if heads_kv is not None:
                narrow_attention(adapter, layer, *heads_kv)
            if channels is not None:
                narrow_mlp(adapter, layer, channels)
        for layer, mw in moe:
            apply_moe_width(adapter, layer, mw)  # type: ignore[arg-type]


def width_slices(adapter: ModelAdapter, layer: nn.Module, w: LayerWidth) -> dict[str, tuple[int, torch.Tensor]]:
    """What `apply_widths(adapter, {i: w})` would cut from an ORIGINAL (un-narrowed) layer, as tensor slices:
    {tensor name relative to the layer: (dim, kept indices)}. `layer` may be the original layer or one that
    is already narrowed to `w` (only module identities and the head size are read, not weight shapes).

    Layer streaming reads a narrowed layer straight from the original checkpoint files with these, instead
    of materialising the full layer and narrowing it."""
    names = {id(m): n for n, m in layer.named_modules()}

    def entry(module: nn.Module, dim: int, idx: torch.Tensor, out: dict[str, tuple[int, torch.Tensor]]) -> None:
        prefix = names[id(module)] + "."
        out[prefix + "weight"] = (dim, idx)
        if dim == 0 and getattr(module, "bias", None) is not None:
            out[prefix + "bias"] = (0, idx)

    out: dict[str, tuple[int, torch.Tensor]] = {}
    if w.heads is not None or w.kv_heads is not None:
        q, k, v, o = adapter.attn_projections(layer)
        hd = adapter.head_dim
        if w.heads is not None:
            q_rows = _rows(sorted(w.heads), hd, torch.device("cpu"))
            entry(q, 0, q_rows, out)
            entry(o, 1, q_rows, out)
        if w.kv_heads is not None:
            kv_rows = _rows(sorted(w.kv_heads), hd, torch.device("cpu"))
            entry(k, 0, kv_rows, out)
            entry(v, 0, kv_rows, out)
    if w.channels is not None:
        gate, up, down = adapter.mlp_projections(layer)
        idx = torch.tensor(sorted(w.channels))
        if gate is not None:
            entry(gate, 0, idx, out)
        entry(up, 0, idx, out)
        entry(down, 1, idx, out)
    return out
