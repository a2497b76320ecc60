"""TransAct width pruning: importance math, planners, surgery, shots, checkpoints (tiny models, exact checks)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.data import CalibrationData, token_hash
from prunekit.errors import PlanError
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan, count_parameters
from prunekit.surgery.widths import apply_widths, narrow_attention, narrow_mlp
from prunekit.width import geometric_schedule, width_prune
from prunekit.width.importance import (
    SCORERS,
    SquaredSums,
    channel_scores,
    head_scores,
    kv_group_scores,
    unit_scores,
)

X = torch.tensor([[3, 17, 42, 99, 7, 200, 13, 64, 5, 128, 31, 77],
                  [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


def calib(seed: int = 0, samples: int = 6, seq_len: int = 24, pad: bool = False) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (samples, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -5:] = 0
    return CalibrationData(ids, mask, "random", token_hash(ids))


def wide_model(family: str, seed: int = 0) -> nn.Module:
    """Like conftest's tiny model but with 16 query heads in 4 KV groups (head_dim 16), so that per-layer
    head plans can differ between layers (the stock tiny model has only 2 KV groups of 2 heads)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 16, 4, 16
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def wide_mlp_model(intermediate_size: int, family: str = "llama") -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    cfg.intermediate_size = intermediate_size
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@torch.no_grad()
def lopsided(model: nn.Module, head_mode: str) -> nn.Module:
    """Give layer 0 two clearly weak units out of four, so that a per-layer plan that removes 4 of the 16
    units takes those two first and the other two from layers 1..3: layer 0 ends with 2 units, some other
    layer with at least 3 (a random tiny model's heads are all alike, so its per-layer plans could come out
    uniform by chance).
    kv-groups: shrink the values of KV groups 1 and 2 (their heads' outputs shrink: any scorer sees it);
    query-heads: shrink the o_proj columns of heads 1 and 2 of every group (the weight-activation scorer
    sees it; no activation can single out a query head inside its group without touching attention)."""
    ad = get_adapter(model)
    layer, hd = ad.layers()[0], ad.head_dim
    v, v_start = value_rows(ad, layer)
    o = ad.output_projection(layer, "attn")
    if head_mode == "kv-groups":
        rows = slice(v_start + hd, v_start + 3 * hd)
        v.weight[rows] *= 0.01
        if v.bias is not None:
            v.bias[rows] *= 0.01
    else:
        for k in range(4):
            o.weight[:, (4 * k + 1) * hd:(4 * k + 3) * hd] *= 0.01
    return model


def value_rows(ad, layer: nn.Module) -> tuple[nn.Module, int]:
    """The module holding a layer's value rows (v_proj, or a fused qkv_proj) and where they start in it."""
    block = ad.unit_blocks(ad.unit_widths(layer), "attn")["kv_heads"][1]
    return layer.get_submodule(block.module), block.offset


# Families whose q/k norms span every head: removing heads renormalises the heads that stay, so no zeroing of
# the removed ones gives the same model (tests/test_units.py checks their slices and their exact channels).
FULL_WIDTH_QK_NORMS = {"olmo2": "OLMo 2's q/k norms span all heads: no zeroing equals removing heads"}


SCORER_FOR = {"kv-groups": "activation", "query-heads": "weight-activation"}


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    return model(input_ids=x).logits


def widths_of(model: nn.Module) -> list[tuple[int, int, int]]:
    ad = get_adapter(model)
    return [(*ad.attention_shape(layer), ad.mlp_width(layer)) for layer in ad.layers()]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- importance ---------------------------------------------------------------------------------------------
def test_squared_sums_exclude_padding_and_scores_exact():
    x = torch.tensor([[[3.0, 0.0, 1.0, 2.0], [4.0, 1.0, 0.0, 2.0], [100.0, 100.0, 100.0, 100.0]],
                      [[0.0, 2.0, 2.0, 1.0], [0.0, 2.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the 100s are padding
    acc = SquaredSums(4)
    acc.update(x, mask)
    assert acc.tokens == 5
    assert acc.sums.dtype == torch.float64
    assert torch.equal(acc.sums, torch.tensor([25.0, 9.0, 21.0, 9.0], dtype=torch.float64))
    # activation: L2 norm over tokens of each channel.
    assert torch.equal(channel_scores("activation", acc.sums, None),
                       torch.tensor([5.0, 3.0, math.sqrt(21.0), 3.0], dtype=torch.float64))
    # Heads of 2 columns: head 0 = columns 0,1 (25 + 9), head 1 = columns 2,3 (21 + 9).
    assert torch.equal(head_scores("activation", acc.sums, None, 2),
                       torch.tensor([math.sqrt(34.0), math.sqrt(30.0)], dtype=torch.float64))
    # One KV group holding both heads: the norm of everything.
    assert torch.equal(kv_group_scores("activation", acc.sums, None, 2, 1),
                       torch.tensor([8.0], dtype=torch.float64))
    # weight-activation: sum_j |W[j, c]| * ||x_c||.
    w = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-1.0, 1.0, 0.5, -3.0]])
    norms = torch.tensor([5.0, 3.0, math.sqrt(21.0), 3.0], dtype=torch.float64)
    col = torch.tensor([2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    assert torch.equal(channel_scores("weight-activation", acc.sums, w), col * norms)
    assert torch.equal(head_scores("weight-activation", acc.sums, w, 2),
                       torch.stack([(col * norms)[:2].sum(), (col * norms)[2:].sum()]))
    assert torch.equal(kv_group_scores("weight-activation", acc.sums, w, 2, 1), (col * norms).sum().reshape(1))


def test_kv_group_scores_aggregate_their_query_heads():
    # 4 query heads of head_dim 1 in 2 KV groups: heads 0,1 -> group 0, heads 2,3 -> group 1.
    sums = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    assert torch.equal(kv_group_scores("activation", sums, None, 4, 2),
                       torch.tensor([math.sqrt(5.0), 5.0], dtype=torch.float64))
    units = torch.tensor([[0, 2], [1, 3]])  # "one head from every group" slices
    assert torch.equal(unit_scores(SCORERS["activation"], sums, None, units),
                       torch.tensor([math.sqrt(10.0), math.sqrt(20.0)], dtype=torch.float64))


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_planted_zero_channel_and_group_are_removed_first(scorer):
    model = tiny_model("qwen2")  # q/k/v biases: the planted head must zero them too
    ad = get_adapter(model)
    dead_channel = {0: 5, 1: 77, 2: 0, 3: 127}
    dead_group = {0: 1, 1: 0, 2: 1, 3: 0}
    with torch.no_grad():
        for i, layer in enumerate(ad.layers()):
            _, up, _ = ad.mlp_projections(layer)
            up.weight[dead_channel[i]].zero_()  # act(gate) * 0 = 0 on every token
            _, _, v, _ = ad.attn_projections(layer)
            rows = slice(dead_group[i] * ad.head_dim, (dead_group[i] + 1) * ad.head_dim)
            v.weight[rows].zero_()
            v.bias[rows].zero_()  # attention output of the group's query heads is then exactly 0
    plan = width_prune(model, ad, calib(), mlp_keep=127, heads_keep=1, shots=1, scorer=scorer, multiple_of=1,
                       progress=False)
    for i in range(4):
        assert plan.widths[i].channels == [c for c in range(128) if c != dead_channel[i]]
        assert plan.widths[i].kv_heads == [1 - dead_group[i]]
        g = 1 - dead_group[i]
        assert plan.widths[i].heads == [2 * g, 2 * g + 1]


def test_geometric_schedule():
    assert geometric_schedule(128, 32, 4) == [91, 64, 45, 32]
    assert geometric_schedule(3, 2, 8) == [3, 3, 3, 2, 2, 2, 2, 2]  # 3 * (2/3)^(4/8) = 2.45
    assert geometric_schedule(10, 10, 3) == [10, 10, 10]
    assert geometric_schedule(100, 1, 1) == [1]


# --- surgery ------------------------------------------------------------------------------------------------
def test_keeping_everything_is_exact(family):
    model = tiny_model(family)
    ref = logits(model)
    ad = get_adapter(model)
    with torch.no_grad():
        for layer in ad.layers():  # slice with every index: new Parameters, same values
            narrow_attention(ad, layer, [0, 1, 2, 3], [0, 1])
            narrow_mlp(ad, layer, list(range(128)))
    assert torch.equal(logits(model), ref)
    # And through the whole pipeline: targets of 1.0 remove nothing and change nothing.
    plan = width_prune(model, ad, calib(), mlp_keep=1.0, heads_keep=1.0, shots=2, progress=False)
    assert torch.equal(logits(model), ref)
    fresh = tiny_model(family)
    apply_plan(get_adapter(fresh), plan)
    assert torch.equal(logits(fresh), ref)


def _zeroed_reference(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A copy of the ORIGINAL model with the removed channels/heads silenced instead of removed:
    rows of up (and gate) zeroed for channels, o_proj columns zeroed for query heads."""
    ref = copy.deepcopy(model)
    ad = get_adapter(ref)
    hd = ad.head_dim
    with torch.no_grad():
        for i, w in plan.widths.items():
            layer = ad.layers()[i]
            if w.channels is not None:
                for block in ad.unit_blocks(ad.unit_widths(layer), "mlp")["channels"]:
                    if block.dim == 0:  # rows of up and gate (separate or fused)
                        gone = [block.offset + c for c in range(block.count) if c not in w.channels]
                        layer.get_submodule(block.module).weight[gone] = 0
            if w.heads is not None:
                o = ad.output_projection(layer, "attn")
                for h in range(o.in_features // hd):
                    if h not in w.heads:
                        o.weight[:, h * hd:(h + 1) * hd] = 0
    return ref


@pytest.mark.parametrize("mode", ["uniform", "per-layer"])
@pytest.mark.parametrize("head_mode", ["kv-groups", "query-heads"])
def test_removing_equals_zeroing(family, mode, head_mode):
    if family in FULL_WIDTH_QK_NORMS:
        pytest.skip(FULL_WIDTH_QK_NORMS[family])
    original = lopsided(wide_model(family), head_mode) if mode == "per-layer" else tiny_model(family)
    heads_keep = {("uniform", "kv-groups"): 1, ("uniform", "query-heads"): 2,
                  ("per-layer", "kv-groups"): 3, ("per-layer", "query-heads"): 12}[(mode, head_mode)]
    pruned = copy.deepcopy(original)
    ad = get_adapter(pruned)
    plan = width_prune(pruned, ad, calib(pad=True), mlp_keep=0.5, heads_keep=heads_keep, mode=mode, shots=2,
                       head_mode=head_mode, scorer=SCORER_FOR[head_mode], multiple_of=1, progress=False)
    widths = widths_of(pruned)
    if mode == "per-layer":
        # The global ranking really gives layers different widths (the test would be vacuous otherwise).
        assert len({w[2] for w in widths}) > 1 and len({w[:2] for w in widths}) > 1
        assert widths[0][:2] == ((8, 2) if head_mode == "kv-groups" else (8, 4))  # the weak units went first
        assert sum(w[2] for w in widths) == 4 * 64
        assert sum(w[0] for w in widths) == 4 * 12  # 3 of 4 groups of 4 heads / 12 query heads per layer
    else:
        assert widths == [(2, 1, 64)] * 4 if head_mode == "kv-groups" else widths == [(2, 2, 64)] * 4
    for i, w in plan.widths.items():
        g = len(w.heads) // len(w.kv_heads)
        assert len(w.heads) % len(w.kv_heads) == 0
        assert all(h // (get_adapter(original).attention_shape(get_adapter(original).layers()[i])[0]
                         // get_adapter(original).attention_shape(get_adapter(original).layers()[i])[1])
                   == w.kv_heads[n // g] for n, h in enumerate(w.heads))
        if head_mode == "query-heads":
            assert w.kv_heads == list(range(len(w.kv_heads))) and len(w.kv_heads) in (2, 4)
    zeroed = _zeroed_reference(original, plan)
    assert (logits(pruned) - logits(zeroed)).abs().max().item() < 1e-5
    # The plan alone (original indices) rebuilds the same model from the original.
    fresh = copy.deepcopy(original)
    apply_plan(get_adapter(fresh), plan)
    assert torch.equal(logits(fresh), logits(pruned))
    assert count_parameters(fresh) == count_parameters(pruned) < count_parameters(original)


def test_reapplying_the_plan_changes_nothing():
    model = wide_model("llama")
    ad = get_adapter(model)
    plan = width_prune(model, ad, calib(), mlp_keep=0.5, heads_keep=2, mode="per-layer", shots=2, multiple_of=1,
                       progress=False)
    before = logits(model)
    apply_plan(ad, plan)
    assert torch.equal(logits(model), before)


def test_bad_width_plans_raise_before_any_change():
    model = tiny_model("llama")
    ad = get_adapter(model)
    before = state(model)
    bad = [
        {1: LayerWidth(heads=[0, 2], kv_heads=[0])},  # head 2 is in group 1, which goes
        {1: LayerWidth(heads=[0, 1, 2], kv_heads=[0, 1])},  # 3 heads over 2 KV heads
        {1: LayerWidth(heads=[0, 1], kv_heads=[1])},  # heads of group 0 with KV head 1
        {0: LayerWidth(channels=list(range(64))), 1: LayerWidth(channels=[])},  # valid layer 0, empty layer 1
        {0: LayerWidth(channels=[0, 0, 1])},
        {0: LayerWidth(channels=[0, 128])},
        {7: LayerWidth(channels=[0])},
    ]
    for widths in bad:
        with pytest.raises(PlanError):
            apply_widths(ad, widths)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


# --- shots and targets --------------------------------------------------------------------------------------
def test_shots_reach_the_exact_targets():
    model = tiny_model("llama")
    ad = get_adapter(model)
    calls = []
    plan = width_prune(model, ad, calib(), mlp_keep=0.25, heads_keep=1, shots=4, multiple_of=1,
                       between_shots=lambda m, s: calls.append((s, widths_of(m)[0])), progress=False)
    assert widths_of(model) == [(2, 1, 32)] * 4
    assert [h["shot"] for h in plan.history] == [1, 2, 3, 4]
    assert [h["widths"]["0"]["channels"] for h in plan.history] == [91, 64, 45, 32]
    # Heads go 2 -> 1 KV groups: 2 * 0.5^(1/4) = 1.68 rounds to 2, 2 * 0.5^(2/4) = 1.41 to 1.
    assert [h["widths"]["0"]["kv_heads"] for h in plan.history] == [2, 1, 1, 1]
    assert calls == [(1, (4, 2, 91)), (2, (2, 1, 64)), (3, (2, 1, 45)), (4, (2, 1, 32))]
    assert all(len(plan.widths[i].channels) == 32 for i in range(4))
    assert plan.method == "transact" and plan.options["shots"] == 4 and plan.options["schedule"] == "geometric"
    assert plan.calibration["sha256"] == calib().sha256
    # The config follows the modules, and the plan survives its JSON round trip.
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) \
        == (32, 2, 1)
    again = PruningPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.widths == plan.widths

    per_layer = tiny_model("llama")
    plan = width_prune(per_layer, get_adapter(per_layer), calib(), mlp_keep=40, mode="per-layer", shots=4,
                       multiple_of=1, progress=False)
    assert sum(w[2] for w in widths_of(per_layer)) == 160
    assert [sum(h["widths"][str(i)]["channels"] for i in range(4)) for h in plan.history] == \
        geometric_schedule(512, 160, 4)
    assert all(w[2] >= 13 for w in widths_of(per_layer))  # floor: ceil(0.1 * 128)


@pytest.mark.parametrize("kwargs", [
    dict(mlp_keep=0),
    dict(mlp_keep=0.0),
    dict(mlp_keep=1.5),
    dict(mlp_keep=129),
    dict(mlp_keep=0.001),  # rounds to 0 channels
    dict(heads_keep=3),  # only 2 KV groups
    dict(heads_keep=0.1),  # rounds to 0 groups
    dict(heads_keep=3, head_mode="query-heads"),  # not a multiple of the 2 KV heads
    dict(heads_keep=0.75, head_mode="query-heads"),  # 3 of 4 query heads: same
    dict(heads_keep=1, head_mode="query-heads"),  # fewer query heads than KV heads
    dict(mlp_keep=2, mode="per-layer", min_layer_keep=0.5, multiple_of=1),  # 8 channels in all, floors need 4 * 64
    dict(mlp_keep=0.5, shots=0),
    dict(mlp_keep=0.5, scorer="magic"),
    dict(mlp_keep=0.5, mode="global"),
    dict(mlp_keep=0.5, head_mode="heads"),
    dict(),  # nothing to prune
])
def test_bad_targets_raise_and_leave_the_model_unchanged(kwargs):
    model = tiny_model("llama")
    before, ref, cfg = state(model), logits(model), model.config.to_dict()
    with pytest.raises(PlanError) as e:
        width_prune(model, get_adapter(model), calib(), progress=False, **kwargs)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model), ref) and model.config.to_dict() == cfg


# --- checkpoints and generation -----------------------------------------------------------------------------
def test_uniform_result_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    plan = width_prune(model, get_adapter(model), calib(), mlp_keep=0.75, heads_keep=1, shots=2, multiple_of=1,
                       progress=False)
    out = save_checkpoint(model, None, tmp_path / "uniform", plan)
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "prunekit" not in cfg
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) \
        == (96, 2, 1, 16)
    assert not (out / "modeling_prunekit.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded), logits(model))
    assert PruningPlan.load(out / "prunekit_plan.json").widths == plan.widths


def test_per_layer_result_reloads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lopsided(wide_model(family), "kv-groups")
    plan = width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, heads_keep=0.75, mode="per-layer",
                       shots=2, multiple_of=1, progress=False)
    assert len({w[2] for w in widths_of(model)}) > 1 and len({w[:2] for w in widths_of(model)}) > 1
    out = save_checkpoint(model, None, tmp_path / "per-layer", plan)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_prunekit.")
    assert cfg["prunekit"]["layer_overrides"]
    ref = logits(model)
    reloaded, _ = load_model(out, tokenizer=False)
    assert widths_of(reloaded) == widths_of(model)
    assert torch.equal(logits(reloaded), ref)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(logits(remote), ref)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uniform_heads_the_config_class_rejects(family, tmp_path):
    """12 heads of 16 with hidden 64: LlamaConfig refuses hidden_size % num_attention_heads != 0 on load (even
    with an explicit head_dim), so the head count must travel as per-layer overrides; Qwen2Config has no
    such check and stays stock."""
    from transformers import AutoModelForCausalLM

    model = wide_model(family)
    width_prune(model, get_adapter(model), calib(), heads_keep=3, shots=1, progress=False)
    assert widths_of(model) == [(12, 3, 128)] * 4
    out = save_checkpoint(model, None, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 3
    if family == "llama":
        assert cfg["num_attention_heads"] == 16 and "auto_map" in cfg
        assert cfg["prunekit"]["layer_overrides"] == {str(i): {"num_attention_heads": 12} for i in range(4)}
        reloaded, _ = load_model(out, tokenizer=False)
    else:
        assert cfg["num_attention_heads"] == 12 and "auto_map" not in cfg
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_per_layer_checkpoint_loads_without_prunekit(tmp_path):
    model = wide_model("qwen3")
    width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, heads_keep=8, mode="per-layer",
                head_mode="query-heads", shots=1, progress=False)
    out = save_checkpoint(model, None, tmp_path / "ck")
    torch.save(logits(model), tmp_path / "ref.pt")
    code = f"""
import sys; sys.path = [p for p in sys.path if 'src' not in p]
import importlib.util; assert importlib.util.find_spec('prunekit') is None
import torch; from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad(): out = m(input_ids=torch.tensor({X.tolist()})).logits
assert torch.equal(out, torch.load({str(tmp_path / 'ref.pt')!r})), (out - torch.load({str(tmp_path / 'ref.pt')!r})).abs().max()
print("ok")
"""
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("mode", ["uniform", "per-layer"])
def test_generate_with_cache_matches_no_cache(family, mode):
    model = lopsided(wide_model(family), "kv-groups")
    width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, heads_keep=0.75, mode=mode, shots=2,
                progress=False)
    assert (len({w[:2] for w in widths_of(model)}) > 1) == (mode == "per-layer")
    x = X[:, :6]
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        uncached = model.generate(x, use_cache=False, **kw)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


def test_width_and_depth_compose(family, tmp_path):
    original = lopsided(wide_model(family), "kv-groups")
    probe = copy.deepcopy(original)
    plan = width_prune(probe, get_adapter(probe), calib(), mlp_keep=0.5, heads_keep=0.75, mode="per-layer",
                       shots=2, multiple_of=1, progress=False)
    plan.dropped = [DropTarget(1, "attn"), DropTarget(2, "block"), DropTarget(3, "mlp")]
    model = copy.deepcopy(original)
    ad = get_adapter(model)
    apply_plan(ad, plan)
    assert ad.num_layers == 3
    assert model.config.prunekit["dropped_attn"] == [1] and model.config.prunekit["dropped_mlp"] == [2]
    ref = logits(model)
    # Same as silencing the removed widths and then dropping the modules.
    if family not in FULL_WIDTH_QK_NORMS:
        zeroed = _zeroed_reference(original, plan)
        apply_plan(get_adapter(zeroed), PruningPlan(dropped=plan.dropped))
        assert (logits(zeroed) - ref).abs().max().item() < 1e-5
    out = save_checkpoint(model, None, tmp_path / "both", plan)
    reloaded, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(reloaded), ref)
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(X[:, :6]), pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(reloaded.generate(X[:, :6], use_cache=True, **kw),
                           reloaded.generate(X[:, :6], use_cache=False, **kw))


# --- CLI ----------------------------------------------------------------------------------------------------
def test_cli_width(tiny_checkpoint, tmp_path, capsys, isolated_cache):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    out = tmp_path / "narrow"
    argv = ["width", str(ck), "--mlp-keep", "0.5", "--heads-keep", "0.5", "--shots", "2", "--calib", str(text),
            "--samples", "4", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters_after"] < summary["parameters_before"] and not summary["heterogeneous"]
    model, tok = load_model(out)
    assert tok is not None and widths_of(model) == [(2, 1, 64)] * 4
    assert PruningPlan.load(out / "prunekit_plan.json").options["mlp_keep"] == 0.5
    # An existing output is refused before any work; a bad target is one clear sentence, exit code 2.
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main(argv[:-3] + ["--heads-keep", "3", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bar comes first)
    assert last == "prunekit: error: heads keep target (layer 0, 2 KV groups): cannot keep 3 when only 2 remain"


def test_cli_parse_keep():
    from prunekit.cli.options import parse_keep
    from prunekit.cli.width import HEAD_MODE_NAMES, SCORER_NAMES
    from prunekit.width import HEAD_MODES

    assert set(SCORER_NAMES) == set(SCORERS) and HEAD_MODE_NAMES == HEAD_MODES

    assert parse_keep("0.75") == 0.75 and isinstance(parse_keep("1"), float) and parse_keep("96") == 96
    assert isinstance(parse_keep("96"), int) and isinstance(parse_keep("2.0"), float)


# --- multiples ----------------------------------------------------------------------------------------------
def test_weight_columns_stand_in_for_the_weight():
    from prunekit.width.importance import weight_columns

    acc = SquaredSums(4)
    acc.update(torch.tensor([[3.0, 1.0, 2.0, 0.5]]))
    w = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-1.0, 1.0, 0.5, -3.0]])
    assert torch.equal(weight_columns(w), torch.tensor([2.0, 3.0, 0.5, 4.0], dtype=torch.float64))
    assert torch.equal(channel_scores("weight-activation", acc.sums, weight_columns(w)),
                       channel_scores("weight-activation", acc.sums, w))
    with pytest.raises(ValueError, match="3 input columns"):
        channel_scores("weight-activation", acc.sums, torch.ones(3, dtype=torch.float64))


def test_round_counts_keeps_multiples_and_the_total():
    from prunekit.width.targets import round_counts as _round_counts

    cur = {0: 128, 1: 128, 2: 128}
    ones = {0: 1, 1: 1, 2: 1}
    # Down to multiples of 32 (layer 2 up to its floor of one block): 64 + 96 + 32 = 192, 8 below 200.
    assert _round_counts({0: 70, 1: 100, 2: 30}, cur, ones, 32, 200) == {0: 64, 1: 96, 2: 32}
    # 64 + 64 + 32 = 160 is 40 short: one block goes back, to the layer that lost most (tie: lower index).
    assert _round_counts({0: 90, 1: 90, 2: 20}, cur, ones, 32, 200) == {0: 96, 1: 64, 2: 32}
    # Floors hold after rounding up to a multiple (layer 0: 40 -> 64), and a layer narrower than m is left
    # alone; 64 + 96 + 20 = 180 is 20 above 160, so one block comes off, from layer 1 (layer 0 is at its floor).
    assert _round_counts({0: 40, 1: 100, 2: 20}, {0: 128, 1: 128, 2: 20}, {0: 40, 1: 1, 2: 1}, 32, 160) \
        == {0: 64, 1: 64, 2: 20}


@pytest.mark.parametrize("mode", ["uniform", "per-layer"])
def test_multiple_of_gives_multiples_and_the_target(mode):
    model = tiny_model("llama")
    # 0.6 * 128 = 76.8 -> 77 channels, rounded to 80 (a multiple of 16) in every layer; per-layer keeps the
    # same total, 320, in multiples of 16.
    plan = width_prune(model, get_adapter(model), calib(), mlp_keep=0.6, mode=mode, shots=3, multiple_of=16,
                       progress=False)
    widths = [w for _, _, w in widths_of(model)]
    assert all(w % 16 == 0 for w in widths) and sum(widths) == 320
    if mode == "uniform":
        assert widths == [80] * 4
    assert plan.options["multiple_of"] == 16
    assert [len(plan.widths[i].channels) for i in range(4)] == widths
    # The plan rebuilds the same model from the original.
    again = tiny_model("llama")
    apply_plan(get_adapter(again), plan)
    assert torch.equal(logits(again), logits(model))


def test_mlp_widths_are_multiples_of_64_by_default():
    """Engines serve multiples of 64 best (llama.cpp quantization blocks of 32/256, GPU tiles), so that is the
    default everywhere: the Python API, the job and the CLI."""
    import inspect

    from prunekit.cli import build_parser
    from prunekit.jobs import width_job

    assert inspect.signature(width_prune).parameters["multiple_of"].default == 64
    assert inspect.signature(width_job).parameters["multiple_of"].default == 64
    assert build_parser().parse_args(["width", "m", "--mlp-keep", "0.5", "--out", "o"]).multiple_of == 64
    model = wide_mlp_model(320)
    # 0.7 * 320 = 224 channels, 3.5 blocks of 64: rounded (halves up) to 256.
    plan = width_prune(model, get_adapter(model), calib(), mlp_keep=0.7, shots=2, progress=False)
    assert [w for _, _, w in widths_of(model)] == [256] * 4 and plan.options["multiple_of"] == 64


def test_per_layer_plan_that_ends_uniform_saves_a_stock_config(tmp_path):
    """Per-layer shots differ between layers before the last one rounds every layer to 64 channels: the saved
    config must not keep the loader (auto_map) an intermediate, heterogeneous shot pointed to."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    plan = width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, mode="per-layer", shots=2, multiple_of=64,
                       progress=False)
    assert len({tuple(sorted(w.items())) for w in plan.history[0]["widths"].values()}) > 1  # shot 1: per layer
    assert widths_of(model) == [(4, 2, 64)] * 4
    cfg = json.loads((save_checkpoint(model, None, tmp_path / "ck", plan) / "config.json").read_text())
    assert "auto_map" not in cfg and "prunekit" not in cfg
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()), logits(model))


def test_multiple_of_errors():
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(PlanError, match="multiple of 256 channels cannot be kept from 128"):
        width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, multiple_of=256, progress=False)
    with pytest.raises(PlanError, match="multiple_of must be a positive integer"):
        width_prune(model, get_adapter(model), calib(), mlp_keep=0.5, multiple_of=0, progress=False)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_width_checks_options_before_loading_the_model(tmp_path, capsys):
    from prunekit.cli import main

    missing = tmp_path / "no-such-model"
    for extra, message in ((["--multiple-of", "0"], "multiple_of must be a positive integer"),
                           (["--scorer", "activation", "--shots", "0"], "shots must be a positive integer"),
                           (["--mlp-keep", "1.5"], "MLP keep target: a keep ratio must be in (0, 1], got 1.5")):
        argv = ["-q", "width", str(missing), "--mlp-keep", "0.5", *extra, "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        assert message in capsys.readouterr().err  # not "no such checkpoint": nothing was loaded
    assert not (tmp_path / "out").exists()
