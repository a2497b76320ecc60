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

import copy
from collections.abc import Mapping

import torch
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.adapters.units import Cut, Widths, kept_indices
from prunekit.errors import PlanError
from prunekit.moe.surgery import MoEWidth, apply_moe_width, expert_slices, is_moe_layer, resolve_moe_width
from prunekit.plans import LayerWidth, check_kept

# Head-count attributes some attention implementations cache on the module (HF Llama-style modules only
# cache `num_key_value_groups`; others, and older versions, keep these).
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _resolve_heads(layer_idx: int, w: LayerWidth, num_heads: int, num_kv: int) -> tuple[list[int], list[int]]:
    """Validated (kept query heads, kept KV heads), both ascending.

    GQA rule: query head h reads KV head h // g (g = num_heads // num_kv). After narrowing, the i-th kept
    query head reads the (i // g')-th kept KV head, so every kept KV group must keep the same number g' of
    its own query heads and no query head may stay whose KV head goes."""
    heads = check_kept("query heads", layer_idx, w.heads if w.heads is not None else list(range(num_heads)),
                           num_heads)
    kv = check_kept("KV heads", layer_idx, w.kv_heads if w.kv_heads is not None else list(range(num_kv)),
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


def slice_linear(lin: nn.Module, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0: output features, and the bias) or columns (dim=1: input features) of a projection, or
    entries of a norm's weight (dim=0). Parameters are replaced by sliced copies (same dtype, device and
    `requires_grad`); the module object stays."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, idx).contiguous()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if getattr(lin, "bias", None) is not None:
            b = lin.bias.detach().index_select(0, idx).contiguous()
            lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
        if isinstance(lin, nn.Linear):
            lin.out_features = int(idx.numel())
    elif isinstance(lin, nn.Linear):
        # The bias lives on the output side: unchanged by dropping input columns.
        lin.in_features = int(idx.numel())


def _kept(adapter: ModelAdapter, widths: Widths, part: str,
          keep: Mapping[str, list[int] | None]) -> dict[tuple[str, int], tuple[torch.Tensor, int]]:
    """{(module path in the layer, dim): kept indices} for sub-layer `part` of a layer with `widths`, keeping
    units `keep[kind]` (None: all of that kind). Only modules that hold a narrowed kind are listed, but
    there every block (narrowed kind or not) is listed, as a fused tensor holds several kinds."""
    blocks = adapter.unit_blocks(widths, part)
    touched = {b.module for kind, bs in blocks.items() if keep.get(kind) is not None for b in bs}
    entries = [(b, keep.get(kind) if keep.get(kind) is not None else range(b.count))
               for kind, bs in blocks.items() for b in bs if b.module in touched]
    return kept_indices(entries)


def _narrow(layer: nn.Module, kept: dict[tuple[str, int], tuple[torch.Tensor, int]]) -> None:
    modules = dict(layer.named_modules())
    for (name, dim), (idx, span) in kept.items():
        module = modules[name]
        if module.weight.shape[dim] != span:
            raise PlanError(f"{name} has {module.weight.shape[dim]} {'rows' if dim == 0 else 'columns'}, the units "
                            f"the adapter describes span {span}")
        slice_linear(module, idx, dim)


def narrow_attention(adapter: ModelAdapter, layer: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
    """Keep query heads `heads` and KV heads `kv_heads` (current indices, validated for GQA): their rows and
    columns in every tensor the adapter's unit blocks name (q/k/v/o, a fused qkv, full-width q/k norms)."""
    attn = adapter.attn(layer)
    widths = adapter.unit_widths(layer)
    _narrow(layer, _kept(adapter, widths, "attn", {"heads": heads, "kv_heads": kv_heads}))
    # Per-head q_norm / k_norm (Qwen3, Gemma3) are [head_dim] and shared by all heads: nothing to slice.
    attn.num_key_value_groups = len(heads) // len(kv_heads)
    for name in _HEAD_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(heads))
    for name in _KV_ATTRS:
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, len(kv_heads))
    if adapter.spec.attn_reads_config:
        _own_config(attn, adapter.config, len(heads), len(kv_heads))


def _own_config(attn: nn.Module, shared: object, heads: int, kv_heads: int) -> None:
    """Point an attention that reads its head counts from its config at one that has them: the shared config
    where it agrees, else a copy of it with this layer's counts."""
    if (shared.num_attention_heads, shared.num_key_value_heads) == (heads, kv_heads):  # type: ignore[attr-defined]
        attn.config = shared
        return
    attn.config = copy.copy(shared)
    attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv_heads


def sync_attention_configs(adapter: ModelAdapter) -> None:
    """After the shared config changed (`refresh_config`): every attention that reads its head counts from its
    config (`ArchSpec.attn_reads_config`) gets one that matches its own modules again."""
    if not adapter.spec.attn_reads_config:
        return
    for layer in adapter.layers():
        if adapter.has_attention(layer):
            _own_config(adapter.attn(layer), adapter.config, *adapter.attention_shape(layer))


def narrow_mlp(adapter: ModelAdapter, layer: nn.Module, channels: list[int]) -> None:
    """Keep intermediate channels `channels` (current indices): their rows of gate/up (or the fused gate_up)
    and columns of down."""
    _narrow(layer, _kept(adapter, adapter.unit_widths(layer), "mlp", {"channels": channels}))
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
                channels = check_kept("MLP channels", i, w.channels, width)
        todo.append((layer, heads_kv, channels))
    with torch.no_grad():
        for layer, heads_kv, channels in todo:
            if heads_kv is not None:
                narrow_attention(adapter, layer, *heads_kv)
            if channels is not None:
                narrow_mlp(adapter, layer, channels)
        for layer, mw in moe:
            apply_moe_width(adapter, layer, mw)  # type: ignore[arg-type]


def width_slices(adapter: ModelAdapter, layer: nn.Module, w: LayerWidth,
                 original: Widths | None = None) -> dict[str, Cut]:
    """What `apply_widths(adapter, {i: w})` would cut from an ORIGINAL (un-narrowed) layer, as tensor cuts:
    {tensor name relative to the layer: (dim, kept indices), or an `ExpertCut` for a fused expert tensor}.
    `original`: the original layer's unit counts (default: `layer`'s own, right when it is not narrowed yet);
    a layer already narrowed to `w` needs them where a fused tensor holds several kinds (their offsets are
    original counts).

    Layer streaming reads a narrowed layer straight from the original checkpoint files with these, instead
    of materialising the full layer and narrowing it."""
    widths = original or adapter.unit_widths(layer)
    modules = dict(layer.named_modules())
    out: dict[str, Cut] = {}
    moe = is_moe_layer(adapter, layer)
    if moe:  # an expert's channels are a unit of the experts' fused tensors, not of three projections
        out.update(expert_slices(adapter, layer, w, widths.channels))  # type: ignore[arg-type]
    for part, keep in (("attn", {"heads": w.heads, "kv_heads": w.kv_heads}),
                       ("mlp", {"channels": None if moe else w.channels})):
        if all(v is None for v in keep.values()):
            continue
        keep = {k: None if v is None else sorted(v) for k, v in keep.items()}
        for (name, dim), (idx, _) in _kept(adapter, widths, part, keep).items():
            out[f"{name}.weight"] = (dim, idx)
            if dim == 0 and getattr(modules[name], "bias", None) is not None:
                out[f"{name}.bias"] = (0, idx)
    return out
