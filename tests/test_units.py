"""Prunable units (`prunekit.adapters.units`): for every family and unit kind, silencing units through the
blocks the adapter describes and removing them give the same logits; fused tensors (Phi-3) are cut where the
blocks say; full-width q/k norms (OLMo 2) are sliced with their heads; streamed reads cut the same tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, random_calib, tiny_model, tiny_tokenizer

from prunekit.adapters import get_adapter
from prunekit.adapters.units import UnitBlock, kept_indices
from prunekit.engine.streamed import StreamedLayers
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import LayerWidth
from prunekit.surgery import apply_widths
from prunekit.surgery.widths import width_slices
from prunekit.width import width_prune

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=X).logits


@torch.no_grad()
def silence(model: torch.nn.Module, layer_idx: int, kind: str, gone: list[int]) -> None:
    """Make units `gone` of one kind contribute nothing, through the adapter's blocks only: a channel's rows
    of gate and up, a query head's output-projection columns, a KV head's value rows (its query heads then
    read zeros)."""
    ad = get_adapter(model)
    layer = ad.layers()[layer_idx]
    part = "mlp" if kind == "channels" else "attn"
    blocks = ad.unit_blocks(ad.unit_widths(layer), part)[kind]
    if kind == "kv_heads":
        blocks = [blocks[1]]  # key rows, then value rows
    elif kind == "heads":
        blocks = [b for b in blocks if b.dim == 1]
    else:
        blocks = [b for b in blocks if b.dim == 0]
    for b in blocks:
        module = layer.get_submodule(b.module)
        idx = b.indices(gone)
        if b.dim == 0:
            module.weight[idx] = 0
            if getattr(module, "bias", None) is not None:
                module.bias[idx] = 0
        else:
            module.weight[:, idx] = 0


# (kind, units removed, the LayerWidth that removes them) on the tiny models (4 heads in 2 KV groups, 128
# channels); removing query heads keeps one head of every group, removing a KV head takes its two heads.
CASES = {
    "channels": ([3, 40, 41, 127], LayerWidth(channels=[c for c in range(128) if c not in (3, 40, 41, 127)])),
    "heads": ([1, 2], LayerWidth(heads=[0, 3], kv_heads=[0, 1])),
    "kv_heads": ([1], LayerWidth(heads=[0, 1], kv_heads=[0])),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_silencing_units_equals_removing_them(family, kind):
    if kind != "channels" and get_adapter(tiny_model(family)).spec.qk_norm_full_width:
        pytest.skip("q/k norms over all heads: removing heads renormalises the rest (see the slice test)")
    gone, width = CASES[kind]
    original = tiny_model(family)
    zeroed = copy.deepcopy(original)
    silence(zeroed, 1, kind, gone if kind != "heads" else gone)
    removed = copy.deepcopy(original)
    ad = get_adapter(removed)
    apply_widths(ad, {1: width})
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in original.parameters())
    assert (logits(removed) - logits(zeroed)).abs().max().item() < 1e-5
    assert (logits(removed) - logits(original)).abs().max().item() > 1e-4  # the units did matter


def test_fused_phi3_tensors_are_cut_where_the_blocks_say():
    original = tiny_model("phi3")
    model = copy.deepcopy(original)
    ad = get_adapter(model)
    apply_widths(ad, {0: LayerWidth(heads=[2, 3], kv_heads=[1], channels=[5, 9])})
    hd = ad.head_dim
    qkv0 = original.model.layers[0].self_attn.qkv_proj.weight
    rows = [*range(2 * hd, 4 * hd), *range(4 * hd + hd, 4 * hd + 2 * hd), *range(6 * hd + hd, 6 * hd + 2 * hd)]
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, qkv0[rows])
    gate_up0 = original.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, gate_up0[[5, 9, 128 + 5, 128 + 9]])
    assert ad.layer_widths(ad.layers()[0]) == {"num_attention_heads": 2, "num_key_value_heads": 1,
                                                "intermediate_size": 2}


def test_olmo2_full_width_qk_norms_are_sliced_with_their_heads(tmp_path):
    original = tiny_model("olmo2")
    model = copy.deepcopy(original)
    ad = get_adapter(model)
    hd = ad.head_dim
    apply_widths(ad, {i: LayerWidth(heads=[2, 3], kv_heads=[1]) for i in range(4)})
    for before, after in zip(original.model.layers, model.model.layers):
        assert torch.equal(after.self_attn.q_norm.weight, before.self_attn.q_norm.weight[2 * hd:4 * hd])
        assert torch.equal(after.self_attn.k_norm.weight, before.self_attn.k_norm.weight[hd:2 * hd])
    from prunekit.surgery import refresh_config

    refresh_config(ad)
    ref = logits(model)
    reloaded, _ = load_model(save_checkpoint(model, tiny_tokenizer(), tmp_path / "olmo2"), tokenizer=False)
    assert "prunekit" not in reloaded.config.to_dict()  # uniform: the stock config
    assert torch.equal(logits(reloaded), ref)


def test_blocks_must_tile_their_tensor():
    gap = [(UnitBlock("m", 0, 0, 2, 2), [0]), (UnitBlock("m", 0, 6, 2, 1), [0])]
    with pytest.raises(ValueError, match="gap"):
        kept_indices(gap)
    idx, span = kept_indices([(UnitBlock("m", 0, 0, 2, 3), [0, 2]), (UnitBlock("m", 0, 6, 1, 2), [1])])["m", 0]
    assert idx.tolist() == [0, 1, 4, 5, 7] and span == 8


@pytest.mark.parametrize("family", ["phi3", "olmo2"])
def test_streamed_width_reads_equal_in_memory_surgery(family, tmp_path):
    """The streamed reader cuts the stored (un-narrowed) tensors with `width_slices` at the stored offsets,
    which in a fused tensor depend on the original unit counts."""
    path = save_checkpoint(tiny_model(family), tiny_tokenizer(), tmp_path / family)
    data = random_calib(n=6, t=16)
    model, _ = load_model(path, tokenizer=False)
    ref = width_prune(model, get_adapter(model), data, mlp_keep=0.5, heads_keep=0.5, shots=2, batch_size=3,
                      progress=False)
    sm = StreamedLayers(path)
    from prunekit.width.stats import ActivationCollector

    got = width_prune(sm.model, sm.adapter, data, mlp_keep=0.5, heads_keep=0.5, shots=2, batch_size=3,
                      progress=False, collector=ActivationCollector(sm, data, batch_size=3, progress=False))
    assert got.to_json() == ref.to_json()
    sm.set_widths(got.widths)
    for i in range(sm.adapter.num_layers):
        with sm.layer(i) as layer:
            mem = dict(get_adapter(model).layers()[i].state_dict())
            assert all(torch.equal(v, mem[k]) for k, v in layer.state_dict().items())
    # The slices of an already narrowed layer, from the stored counts, are those of the original layer.
    fresh = get_adapter(tiny_model(family))
    w = ref.widths[0]
    want = width_slices(fresh, fresh.layers()[0], w)
    have = width_slices(sm.adapter, sm.adapter.layers()[0], w, sm._stored[id(sm.adapter.layers()[0])])
    assert want.keys() == have.keys() and all(torch.equal(want[k][1], have[k][1]) for k in want)
