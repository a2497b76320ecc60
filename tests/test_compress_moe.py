"""`compress` on Mixture-of-Experts models: a block of experts is one unit of the budget (kept or removed whole,
all its experts, router and shared expert counted), attention is cut by KV groups where the family lets its
heads narrow, else kept or removed whole. Exact checks on tiny in-process models (4 experts, top-2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MOE_FAMILIES, random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.compress.budget import Budget, removed, sublayer_costs
from prunekit.compress.candidate import plan_for
from prunekit.compress.editable import EditableModel
from prunekit.compress.families import WHOLE_MLP_SKIP
from prunekit.compress.search import compress
from prunekit.compress.stats import collect_stats
from prunekit.engine.sources import ResidentLayers
from prunekit.io.checkpoint import load_model
from prunekit.plans import PruningPlan
from prunekit.save import save
from prunekit.surgery import apply_plan
from prunekit.surgery.structure import count_parameters

FIXED_HEADS = {"olmoe", "gpt_oss"}  # `MoESpec.fixed_heads`: attention kept or removed whole


def inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(inputs()).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_moe_block_is_one_unit_holding_every_expert_router_and_shared_expert(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    costs = sublayer_costs(ad)
    for i, layer in enumerate(ad.layers()):
        mlp, attn = costs[(i, "mlp")], costs[(i, "attn")]
        assert (mlp.units, mlp.kv_per_unit) == (1, 0)
        router = ad.router(layer)
        parts = [*ad.expert_tensors(layer), *ad.expert_biases(layer), router.weight, getattr(router, "bias", None)]
        shared = [*(ad.shared_projections(layer) or ()), ad.shared_gate(layer)]
        expected = sum(t.numel() for t in parts if t is not None)
        expected += sum(p.numel() for m in shared if m is not None for p in m.parameters())
        assert mlp.params_per_unit == expected
        assert mlp.fixed_params == sum(p.numel() for n in ad.spec.mlp_norms for p in getattr(layer, n).parameters())
        assert attn.units == (1 if family in FIXED_HEADS else ad.attention_shape(layer)[1])
    # Removing every sub-layer removes exactly what the costs say.
    n0 = count_parameters(model)
    apply_plan(ad, PruningPlan(dropped=plan_for(ad, {s: [] for s in costs})[0]))
    assert n0 - count_parameters(model) == removed(costs, {s: 0 for s in costs}, "params")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zeroed_moe_blocks_and_kv_groups_give_the_logits_of_the_physically_pruned_model(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    costs = sublayer_costs(ad)
    m = EditableModel(ResidentLayers(model, ad), costs)
    calib = random_calib(4, 16)
    stats = collect_stats(model, calib, adapter=ad, progress=False)
    curves = m.curves(stats, 16)
    assert all(curves[(i, "mlp")].ks == [1, 0] and curves[(i, "mlp")].err[1] > 0 for i in range(4))
    counts = {(1, "mlp"): 0, (3, "mlp"): 0, (3, "attn"): 0}
    if family not in FIXED_HEADS:
        counts[(0, "attn")] = 1  # one of two KV groups kept, its output projection refitted
    m.cut(stats, curves, counts, True)
    n_before = count_parameters(model)
    zeroed = logits(model)
    drops, widths = plan_for(ad, {s: m.alive[s] for s in counts})
    apply_plan(ad, PruningPlan(dropped=drops, widths=widths))
    torch.testing.assert_close(logits(model), zeroed, rtol=1e-5, atol=1e-5)
    assert n_before - count_parameters(model) == removed(costs, counts, "params")


def test_reset_gives_back_the_dense_moe_model_exactly():
    model = tiny_model("qwen2_moe")
    ad = get_adapter(model)
    dense = logits(model)
    m = EditableModel(ResidentLayers(model, ad), sublayer_costs(ad))
    stats = collect_stats(model, random_calib(4, 16), adapter=ad, progress=False)
    m.cut(stats, m.curves(stats, 16), {(0, "mlp"): 0, (2, "mlp"): 0}, True)
    assert not torch.equal(logits(model), dense)
    m.reset()
    assert torch.equal(logits(model), dense)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_compress_meets_the_budget_skips_the_width_families_and_reloads(family, tmp_path):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    n0 = count_parameters(model)
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=2,
                      multiple_of=16, progress=False)
    assert count_parameters(model) <= 0.8 * n0
    names = {c["name"] for c in result.candidates}
    assert {"dense", "mixed", "depth", "LLM-Drop mlp", "LLM-Drop block"} <= names
    assert not names & {"uniform-width", "near-uniform-width"}
    assert result.plan.options["skipped_families"] == {"uniform-width": WHOLE_MLP_SKIP,
                                                       "near-uniform-width": WHOLE_MLP_SKIP}
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    assert chosen["at_budget"] and chosen["removed_params"] == pytest.approx(1 - count_parameters(model) / n0)
    # No candidate short of the budget counts as one at it.
    assert all(c["removed_params"] >= 0.2 - 1 / n0 for c in result.candidates if c["at_budget"])
    # The plan on the dense model gives the same structure; only attention output projections were refitted.
    apply_plan(get_adapter(dense), PruningPlan.from_json(result.plan.to_json()), structure_only=True)
    got, ref = model.state_dict(), dense.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    changed = {k for k in got if not torch.equal(got[k], ref[k])}
    assert all(k.endswith("self_attn.o_proj.weight") for k in changed), changed
    ref = logits(model)
    save(model, None, tmp_path / "c", result.plan, progress=False)
    reloaded, _ = load_model(tmp_path / "c", tokenizer=False)
    assert torch.equal(logits(reloaded), ref)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_without_refits_the_plan_on_the_dense_model_is_the_compressed_model(family):
    """Drops only (gpt-oss: whole attention and MoE blocks; Mixtral, asked for drops by a budget its
    KV groups cannot meet alone) and no correction: no weight is refitted, so the plan alone reproduces it."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.7), rounds=1,
                      multiple_of=16, progress=False, correct=False)
    chosen = result.chosen
    if result.plan.widths:  # a refitted width candidate won: the plan alone does not hold its weights
        pytest.skip(f"{chosen} narrows heads")
    apply_plan(get_adapter(dense), PruningPlan.from_json(result.plan.to_json()), structure_only=True)
    assert torch.equal(logits(dense), logits(model))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_kv_budget_on_moe_models(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("kv", 0.5), rounds=1,
                      multiple_of=16, progress=False)
    chosen = next(c for c in result.candidates if c["name"] == result.chosen)
    assert chosen["removed_kv"] >= 0.5
    if family in FIXED_HEADS:  # only whole attention sub-layers can go
        assert not result.plan.widths and all(d.module == "attn" for d in result.plan.dropped)
    ref = logits(model)
    save(model, None, tmp_path / "kv", result.plan, progress=False)
    cfg = json.loads((tmp_path / "kv" / "config.json").read_text())
    stock = "auto_map" not in cfg
    reloaded = (AutoModelForCausalLM.from_pretrained(tmp_path / "kv") if stock
                else load_model(tmp_path / "kv", tokenizer=False)[0])
    assert torch.equal(logits(reloaded), ref)


@pytest.mark.usefixtures("isolated_cache")
def test_cli_compress_on_a_moe_checkpoint_saves_a_repaired_model_that_loads_back(tiny_checkpoint, tmp_path, capsys):
    from conftest import tiny_tokenizer

    from prunekit.cli import main
    from prunekit.io.checkpoint import save_checkpoint

    _, text = tiny_checkpoint
    ck = save_checkpoint(tiny_model("qwen2_moe"), tiny_tokenizer(), tmp_path / "tiny-moe")
    out = tmp_path / "small"
    assert main(["-q", "compress", str(ck), "--budget", "params=0.8", "--rounds", "1", "--multiple-of", "16",
                 "--calib", str(text), "--samples", "8", "--seq-len", "24", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    plan = PruningPlan.load(out / "prunekit_plan.json")
    assert plan.method == "compress" and plan.options["chosen"] == summary["chosen"]
    assert set(plan.options["skipped_families"]) == {"uniform-width", "near-uniform-width"}
    assert plan.repair is not None  # linear repair of the removed spans is tried on MoE models too
    model, _ = load_model(out, tokenizer=False)
    dense, _ = load_model(ck, tokenizer=False)
    assert count_parameters(model) <= 0.8 * count_parameters(dense)


def test_memory_estimate_counts_the_statistics_of_moe_blocks_exactly():
    from prunekit.compress.memory import memory_estimate

    model = tiny_model("qwen2_moe")
    ad = get_adapter(model)
    stats = collect_stats(model, random_calib(2, 16), adapter=ad, progress=False)
    assert all(stats.layers[(i, "mlp")].gram.shape == (64, 64) for i in range(4))  # the blocks' outputs
    held = sum(t.numel() * t.element_size() for st in stats.layers.values() for t in (st.gram, st.fisher))
    est = memory_estimate(ad, 8, 16)
    assert est["grams"] + est["fishers"] == held
    m = EditableModel(ResidentLayers(model, ad), sublayer_costs(ad))
    assert est["weights"] == 3 * sum(m.weight(s).numel() * m.weight(s).element_size() for s in m.costs)


def test_kl_criterion_on_a_moe_model():
    model = tiny_model("mixtral")
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.8), rounds=1,
                      multiple_of=16, criterion="kl", progress=False)
    rows = {c["name"]: c for c in result.candidates}
    assert rows["dense"]["check_kl"] == 0.0
    assert rows[result.chosen]["check_kl"] == min(c["check_kl"] for c in result.candidates if c["at_budget"]) > 0
