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
    # The best of all, corrected or not, expert drop included.
    assert chosen["check_loss"] == min(c["check_loss"] for c in result.candidates if c["at_budget"])
    assert {"experts (router)", "experts (reap)"} <= names
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


@pytest.mark.parametrize("family", sorted(FIXED_HEADS))
def test_without_refits_the_plan_on_the_dense_model_is_the_compressed_model(family):
    """Heads fixed (attention and MoE blocks kept or removed whole, or experts dropped) and no correction: no
    weight is refitted, so the plan alone reproduces the model."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.7), rounds=1,
                      multiple_of=16, progress=False, correct=False)
    assert not any(w.kv_heads or w.channels for w in result.plan.widths.values())
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
    assert result.plan.options["skipped_families"]["expert drop"] == "expert drop removes no KV cache"
    assert not any(c["name"].startswith("experts") for c in result.candidates)
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
def test_cli_compress_on_a_moe_checkpoint_saves_a_model_that_loads_back(tiny_checkpoint, tmp_path, capsys):
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
    assert (plan.repair is not None) == bool(plan.dropped)  # removed spans are linearly repaired on MoE too
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
    assert rows[result.chosen]["check_kl"] == min(c["check_kl"] for c in result.candidates if c["at_budget"])
    assert all(rows[f"experts ({s})"]["check_kl"] > 0 for s in ("router", "reap"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_removed_for_a_check_give_the_pruned_logits_and_are_put_back_exactly(family):
    from prunekit.compress.experts import removed_params
    from prunekit.moe.surgery import experts_removed
    from prunekit.plans import LayerWidth

    model = tiny_model(family)
    ad = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = logits(model)
    kept = {0: [1, 3], 1: [0, 2, 3], 2: [3], 3: [0, 1, 2]}
    pruned = copy.deepcopy(model)
    n0 = count_parameters(pruned)
    apply_plan(get_adapter(pruned), PruningPlan(widths={i: LayerWidth(experts=k) for i, k in kept.items()}))
    assert n0 - count_parameters(pruned) == removed_params(ad, kept)
    with experts_removed(ad, kept):
        assert torch.equal(logits(model), logits(pruned))
    assert torch.equal(logits(model), dense)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.num_experts_per_tok == 2 and ad.top_k(ad.layers()[2]) == 2


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_drop_candidates_are_scored_as_the_physically_pruned_model(family):
    from conftest import whole_model_loss

    from prunekit.compress.budget import removal_target
    from prunekit.compress.experts import expert_drop_candidates, removed_params
    from prunekit.losses import split_check
    from prunekit.moe.stats import collect_expert_stats
    from prunekit.plans import LayerWidth

    model = tiny_model(family)
    dense = copy.deepcopy(model)
    calib = random_calib(8, 24)
    n0 = count_parameters(model)
    result = compress(model, get_adapter(model), calib, Budget("params", 0.8), rounds=1, multiple_of=16,
                      progress=False, correct=False)
    rows = {c["name"]: c for c in result.candidates}
    fit, check = split_check(calib, "compress")
    ad = get_adapter(dense)
    need = removal_target(dense, sublayer_costs(ad), Budget("params", 0.8))
    stats = collect_expert_stats(dense, fit, adapter=ad, progress=False)
    for score in ("router", "reap"):
        row = rows[f"experts ({score})"]
        kept = {i: k for i, k in expert_drop_candidates(ad, stats, need)[f"experts ({score})"].items()}
        (left,) = {len(k) for k in kept.values()}  # one count for every layer: the fewest that meet the budget
        assert removed_params(ad, {i: k + [-1] for i, k in kept.items()}) < need <= removed_params(ad, kept)
        pruned = copy.deepcopy(dense)
        apply_plan(get_adapter(pruned), PruningPlan(widths={i: LayerWidth(experts=k) for i, k in kept.items()}))
        assert row["at_budget"] and count_parameters(pruned) <= 0.8 * n0
        assert row["removed_params"] == pytest.approx(1 - count_parameters(pruned) / n0)
        assert row["check_loss"] == pytest.approx(whole_model_loss(pruned, check), rel=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_never_routed_experts_are_dropped_first_and_the_result_is_the_dense_model(family, tmp_path):
    """With one expert per layer that no token picks, removing it is free (KL exactly 0 from the dense model,
    where every drop costs some): compress chooses it, and the saved stock checkpoint gives the dense logits."""
    from test_moe import NEVER, plant_never_routed
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    plant_never_routed(model)
    dense = copy.deepcopy(model)
    # At this budget one expert per layer is enough in every family (Qwen2-MoE's shared expert included).
    result = compress(model, get_adapter(model), random_calib(8, 24), Budget("params", 0.85), rounds=1,
                      multiple_of=16, criterion="kl", progress=False, correct=False)
    assert result.chosen == "experts (router)"
    assert {c["name"]: c["check_kl"] for c in result.candidates}["experts (reap)"] == 0.0
    assert all(w.experts == [e for e in range(4) if e != NEVER] for w in result.plan.widths.values())
    assert torch.equal(logits(model), logits(dense))
    save(model, None, tmp_path / "c", result.plan, progress=False)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert "auto_map" not in cfg  # one expert count for every layer: a stock config
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "c")), logits(dense))
    apply_plan(get_adapter(dense), PruningPlan.from_json(result.plan.to_json()), structure_only=True)
    assert torch.equal(logits(dense), logits(model))
