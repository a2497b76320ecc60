"""Mixture-of-Experts families: LLM-Drop on the MoE block, expert drop (router statistics and REAP), expert
slimming, and save/reload, as exact checks on tiny in-process models (4 experts of width 128, top-2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOE_FAMILIES, random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.drop import llm_drop
from prunekit.drop.scorer import SimilarityScorer
from prunekit.errors import PlanError, UnsupportedArchitectureError
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.moe.choose import check_expert_drop, choose_expert_drops, choose_expert_widths, expert_scores
from prunekit.moe.stats import ExpertStats, collect_expert_stats
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan

NEVER = 1  # the planted never-routed expert


def inputs(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(inputs()).logits


@torch.no_grad()
def plant_never_routed(model, expert: int = NEVER) -> None:
    """Make hidden dimension 0 a positive constant of the residual stream (the embedding sets it, no sub-layer
    writes it), then give `expert`'s router row a huge negative weight there: its logit is far below every
    other, so no token picks it and its softmax share is exactly 0."""
    ad = get_adapter(model)
    ad.embed().weight[:, 0] = ad.embed().weight.std()  # positive, and no larger than the other dimensions
    torch.manual_seed(5)
    for layer in ad.layers():
        o = ad.attn_projections(layer)[3]
        o.weight[0] = 0.0
        if o.bias is not None:
            o.bias[0] = 0.0
        _, down = ad.expert_tensors(layer)
        if ad.moe.layout == "interleaved":  # gpt-oss: down [E, I, H] and a bias [E, H]
            down[:, :, 0] = 0.0
            ad.expert_biases(layer)[1][:, 0] = 0.0
        else:
            down[:, 0] = 0.0
        shared = ad.shared_projections(layer)
        if shared is not None:
            shared[2].weight[0] = 0.0
        ad.router(layer).weight.normal_()  # routing that spreads tokens over the other experts
        ad.router(layer).weight[:, 0] = 0.0  # the constant dimension favours no other expert
        ad.router(layer).weight[expert, 0] = -1e4


@torch.no_grad()
def zero_channels(ad, layer, expert, gone: torch.Tensor) -> None:
    """Zero the gate and up weights (and biases) of channels `gone` of `expert` (an index or a slice), in the
    family's layout: their activation is then 0 whatever the input."""
    gate_up, _ = ad.expert_tensors(layer)
    if ad.moe.layout == "interleaved":  # gpt-oss: [E, H, 2I], gate column 2c, up column 2c + 1
        cols = torch.cat([2 * gone, 2 * gone + 1])
        gate_up[expert, :, cols] = 0.0
        ad.expert_biases(layer)[0][expert, cols] = 0.0
    else:  # [E, 2I, H]: gate rows, then up rows
        gate_up[expert, gone] = 0.0
        gate_up[expert, gone + gate_up.shape[1] // 2] = 0.0


def stats_of(model, **kw) -> ExpertStats:
    return collect_expert_stats(model, random_calib(), adapter=get_adapter(model), batch_size=3, progress=False, **kw)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_llm_drop_scores_and_drops_the_moe_block_and_reloads(family, tmp_path):
    model = tiny_model(family)
    ad = get_adapter(model)
    scores = SimilarityScorer(model, adapter=ad, calib=random_calib(), progress=False).score()
    assert all(-1.0 <= s <= 1.0 for s in scores.mlp + scores.attn + scores.block)
    plan = llm_drop(model, ad, random_calib(), target="mlp", n=1, progress=False)
    assert len(plan.dropped) == 1 and plan.dropped[0].module == "mlp"
    ref = logits(model)
    save_checkpoint(model, None, tmp_path / "mlp")
    reloaded, _ = load_model(tmp_path / "mlp", tokenizer=False)
    assert torch.equal(logits(reloaded), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_drop_gives_a_stock_checkpoint(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    apply_plan(get_adapter(model), PruningPlan(dropped=[DropTarget(1, "block"), DropTarget(3, "attn")]))
    apply_plan(get_adapter(model), PruningPlan(dropped=[DropTarget(2, "block")]))
    ref = logits(model)
    save_checkpoint(model, None, tmp_path / "b")
    reloaded, _ = load_model(tmp_path / "b", tokenizer=False)
    assert torch.equal(logits(reloaded), ref)
    only_blocks = tiny_model(family)
    apply_plan(get_adapter(only_blocks), PruningPlan(dropped=[DropTarget(1, "block")]))
    save_checkpoint(only_blocks, None, tmp_path / "stock")
    cfg = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and "prunekit" not in cfg and "auto_map" not in cfg
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "stock")), logits(only_blocks))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_never_routed_expert_is_found_first_and_removing_it_changes_nothing(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    plant_never_routed(model)
    ad = get_adapter(model)
    stats = stats_of(model)
    assert sorted(stats) == [0, 1, 2, 3]
    for st in stats.values():
        assert st.picks[NEVER] == 0 and st.picks.sum() == 2 * st.tokens and st.tokens == 6 * 24
        assert torch.allclose(st.gates.sum(), torch.tensor(st.tokens, dtype=torch.float64))  # renormalised
    for score in ("router", "reap"):
        for s in expert_scores(stats, score).values():
            assert s[NEVER] == 0 and (s[torch.arange(4) != NEVER] > 0).all()
        plan = choose_expert_drops(ad, stats, 1, score)
        assert all(w.experts == [0, 2, 3] for w in plan.widths.values())
    ref = logits(model)
    apply_plan(ad, plan)
    assert all(ad.num_experts(layer) == 3 for layer in ad.layers())
    assert torch.equal(logits(model), ref)
    apply_plan(ad, plan)  # already applied: nothing changes
    assert torch.equal(logits(model), ref)
    save_checkpoint(model, None, tmp_path / "e", plan)
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg[ad.moe.num_experts_field] == 3 and "prunekit" not in cfg and "auto_map" not in cfg
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "e")), ref)
    reloaded, _ = load_model(tmp_path / "e", tokenizer=False)
    assert torch.equal(logits(reloaded), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_dropping_experts_below_top_k_keeps_routing_valid_and_per_layer_counts_reload(family, tmp_path):
    model = tiny_model(family)
    ad = get_adapter(model)
    plan = PruningPlan(widths={0: LayerWidth(experts=[2]), 1: LayerWidth(experts=[0, 3]), 3: LayerWidth(experts=[1, 2, 3])})
    apply_plan(ad, plan)
    layers = ad.layers()
    assert [ad.num_experts(x) for x in layers] == [1, 2, 4, 3]
    assert [ad.top_k(x) for x in layers] == [1, 2, 2, 2]
    ref = logits(model)
    assert torch.isfinite(ref).all()
    save_checkpoint(model, None, tmp_path / "het", plan)
    cfg = json.loads((tmp_path / "het" / "config.json").read_text())
    assert cfg["prunekit"]["layer_overrides"]["0"] == {ad.moe.num_experts_field: 1, "num_experts_per_tok": 1}
    reloaded, _ = load_model(tmp_path / "het", tokenizer=False)
    assert torch.equal(logits(reloaded), ref)
    fresh = tiny_model(family)
    apply_plan(get_adapter(fresh), PruningPlan.from_json(json.loads(json.dumps(plan.to_json()))))
    assert torch.equal(logits(fresh), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zeroed_expert_channels_then_removed_give_the_same_logits(family, tmp_path):
    model = tiny_model(family)
    ad = get_adapter(model)
    kept = list(range(0, 128, 2))
    w = LayerWidth(channels=kept)
    with torch.no_grad():
        for layer in ad.layers():
            zero_channels(ad, layer, slice(None), torch.tensor([c for c in range(128) if c not in kept]))
            shared = ad.shared_projections(layer)
            if shared is not None:
                shared[0].weight[50:] = 0.0
                shared[1].weight[50:] = 0.0
                w = LayerWidth(channels=kept, shared_channels=list(range(50)))
    ref = logits(model)
    plan = PruningPlan(widths={i: w for i in range(4)})
    apply_plan(ad, plan)
    assert all(ad.expert_width(layer) == 64 for layer in ad.layers())
    assert torch.allclose(logits(model), ref, rtol=0, atol=1e-5)
    narrowed = logits(model)
    save_checkpoint(model, None, tmp_path / "w", plan)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg[ad.moe.width_field] == 64 and "prunekit" not in cfg
    reloaded, _ = load_model(tmp_path / "w", tokenizer=False)
    assert torch.equal(logits(reloaded), narrowed)


def test_channel_ranking_finds_planted_dead_channels():
    model = tiny_model("qwen2_moe")
    ad = get_adapter(model)
    with torch.no_grad():
        for layer in ad.layers():
            gate_up, _ = ad.expert_tensors(layer)
            gate_up[:, 128 + 5] = 0.0  # channel 5's up rows: its activation is 0 in every expert
            ad.shared_projections(layer)[1].weight[7] = 0.0
    widths = choose_expert_widths(stats_of(model), {i: (126, 95) for i in range(4)})
    for w in widths.values():
        assert len(w.expert_channels) == 4 and all(5 not in k and len(k) == 126 for k in w.expert_channels)
        assert len({tuple(k) for k in w.expert_channels}) > 1  # each expert ranks its own channels
    assert all(7 not in w.shared_channels and len(w.shared_channels) == 95 for w in widths.values())


def test_expert_statistics_are_summable_and_exclude_padding():
    model = tiny_model("mixtral")
    ad = get_adapter(model)
    full = collect_expert_stats(model, random_calib(pad_last=5), adapter=ad, batch_size=2, progress=False)
    again = ExpertStats.from_tensors(full.to_tensors())
    assert all(torch.equal(again[i].reap, full[i].reap) and again[i].tokens == full[i].tokens for i in full)
    assert full[0].tokens == 6 * 24 - 5
    other = collect_expert_stats(model, random_calib(pad_last=5), adapter=ad, batch_size=3, progress=False)
    assert torch.allclose(other[2].channels, full[2].channels, rtol=1e-9)


def test_bad_expert_requests_fail_before_work():
    ad = get_adapter(tiny_model("olmoe"))
    with pytest.raises(PlanError, match="below the 4 experts"):
        check_expert_drop(ad, 4, "router")
    with pytest.raises(PlanError, match="unknown expert score"):
        check_expert_drop(ad, 1, "magnitude")
    with pytest.raises(UnsupportedArchitectureError, match="Mixture-of-Experts"):
        check_expert_drop(get_adapter(tiny_model("llama")), 1, "router")
    with pytest.raises(PlanError, match="llama has no experts"):
        apply_plan(get_adapter(tiny_model("llama")), PruningPlan(widths={0: LayerWidth(experts=[0])}))
    with pytest.raises(PlanError, match="shared expert"):
        apply_plan(ad, PruningPlan(widths={0: LayerWidth(shared_channels=[0])}))
    with pytest.raises(PlanError, match="multiple of 8 channels"):
        apply_plan(ad, PruningPlan(widths={0: LayerWidth(channels=list(range(50)))}))
    with pytest.raises(PlanError, match="cannot narrow the attention heads of olmoe"):
        apply_plan(ad, PruningPlan(widths={0: LayerWidth(heads=[0, 1], kv_heads=[0])}))


@pytest.fixture
def moe_checkpoint(tiny_checkpoint, tmp_path):
    """A saved tiny Qwen2-MoE (shared expert and all) with a tokenizer, and the calibration text."""
    from conftest import tiny_tokenizer

    _, text = tiny_checkpoint
    return save_checkpoint(tiny_model("qwen2_moe"), tiny_tokenizer(), tmp_path / "tiny-moe"), text


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize("score", ["router", "reap"])
def test_cli_drops_experts_to_a_stock_checkpoint(moe_checkpoint, tmp_path, score):
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    ck, text = moe_checkpoint
    out = tmp_path / "experts"
    assert main(["-q", "drop", str(ck), "--target", "expert", "--n", "3", "--expert-score", score, "--calib",
                 str(text), "--samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    plan = json.loads((out / "prunekit_plan.json").read_text())
    assert plan["method"] == "expert-drop" and plan["options"]["expert_score"] == score
    assert all(len(w["experts"]) == 1 for w in plan["widths"].values()) and len(plan["widths"]) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 1 and cfg["num_experts_per_tok"] == 1 and "prunekit" not in cfg
    model, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))
    dense, _ = load_model(ck, tokenizer=False)
    apply_plan(get_adapter(dense), PruningPlan.load(out / "prunekit_plan.json"))
    assert torch.equal(logits(dense), logits(model))


@pytest.mark.usefixtures("isolated_cache")
def test_cli_refuses_expert_drop_on_dense_models_and_layer_options(tiny_checkpoint, moe_checkpoint, tmp_path, capsys):
    from prunekit.cli import main

    dense, text = tiny_checkpoint
    ck, _ = moe_checkpoint
    common = ["--calib", str(text), "--samples", "4", "--seq-len", "32"]
    assert main(["-q", "drop", str(dense), "--target", "expert", "--n", "1", *common, "--out", str(tmp_path / "a")]) == 2
    assert "Mixture-of-Experts" in capsys.readouterr().err
    assert main(["-q", "drop", str(ck), "--target", "expert", "--n", "4", *common, "--out", str(tmp_path / "b")]) == 2
    assert "below the 4 experts" in capsys.readouterr().err
    assert main(["-q", "drop", str(ck), "--target", "expert", "--n", "1", "--iterative", *common,
                 "--out", str(tmp_path / "c")]) == 2
    assert "--target expert takes none of" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abc")


@pytest.mark.usefixtures("isolated_cache")
def test_cli_width_slims_every_expert_and_the_shared_expert(moe_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    ck, text = moe_checkpoint
    out = tmp_path / "slim"
    assert main(["-q", "width", str(ck), "--mlp-keep", "0.5", "--multiple-of", "1", "--shots", "2", "--calib",
                 str(text), "--samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    plan = PruningPlan.load(out / "prunekit_plan.json")
    assert plan.method == "expert-slim" and sorted(plan.widths) == [0, 1, 2, 3]
    assert all(len(w.expert_channels) == 4 and {len(k) for k in w.expert_channels} == {64}
               and len(w.shared_channels) == 48 for w in plan.widths.values())
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["num_experts"]) == (64, 48, 4)
    assert "prunekit" not in cfg
    model, _ = load_model(out, tokenizer=False)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))
    dense, _ = load_model(ck, tokenizer=False)
    apply_plan(get_adapter(dense), plan)
    assert torch.equal(logits(dense), logits(model))
    assert main(["-q", "width", str(ck), "--heads-keep", "1", "--calib", str(text), "--samples", "4",
                 "--seq-len", "32", "--out", str(tmp_path / "heads")]) == 2


def test_slimming_in_shots_records_original_indices():
    from prunekit.moe.slim import slim_experts

    model = tiny_model("mixtral")
    plan = slim_experts(model, get_adapter(model), random_calib(), mlp_keep=40, shots=3, multiple_of=1,
                        progress=False)
    narrowed = logits(model)
    fresh = tiny_model("mixtral")
    apply_plan(get_adapter(fresh), plan)
    assert all({len(k) for k in w.expert_channels} == {40} for w in plan.widths.values())
    assert torch.equal(logits(fresh), narrowed)


@pytest.mark.usefixtures("isolated_cache")
def test_a_moe_result_llamacpp_cannot_run_is_refused_in_one_line(moe_checkpoint, tmp_path, capsys):
    """This Qwen2-MoE renormalises its top-k weights (norm_topk_prob), which llama.cpp's qwen2moe graph never does."""
    from prunekit.cli import main

    ck, _ = moe_checkpoint
    assert main(["-q", "export", str(ck), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "GGUF" in err and "qwen2_moe" in err and "norm_topk_prob" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.usefixtures("isolated_cache")
def test_eval_counts_the_experts_a_token_runs(moe_checkpoint):
    from prunekit.evaluation.perplexity import decode_flops_per_token

    ck, _ = moe_checkpoint
    model, _ = load_model(ck, tokenizer=False)
    ad = get_adapter(model)
    per_layer = 4 * 64 + 2 * 3 * 64 * 128 + 3 * 64 * 96 + 64  # router, top-2 experts, shared expert and its gate
    assert decode_flops_per_token(ad, 8)["mlp"] == 2 * 4 * per_layer


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zeroed_channels_of_each_expert_then_removed_with_experts_give_the_same_logits(family, tmp_path):
    """Each expert keeps its own channels, one count for all; a never-routed expert goes in the same plan."""
    model = tiny_model(family)
    plant_never_routed(model)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    per_expert = [sorted(torch.randperm(128, generator=g)[:72].tolist()) for _ in range(4)]
    with torch.no_grad():
        for layer in ad.layers():
            for e, kept in enumerate(per_expert):
                zero_channels(ad, layer, e, torch.tensor([c for c in range(128) if c not in kept]))
    ref = logits(model)
    plan = PruningPlan(widths={i: LayerWidth(expert_channels=per_expert, experts=[0, 2, 3]) for i in range(4)})
    plan = PruningPlan.from_json(json.loads(json.dumps(plan.to_json())))
    apply_plan(ad, plan)
    assert all(ad.expert_width(layer) == 72 and ad.num_experts(layer) == 3 for layer in ad.layers())
    assert torch.allclose(logits(model), ref, rtol=0, atol=1e-5)
    pruned = logits(model)
    apply_plan(ad, plan)
    assert torch.equal(logits(model), pruned)
    save_checkpoint(model, None, tmp_path / "x", plan)
    reloaded, _ = load_model(tmp_path / "x", tokenizer=False)
    assert torch.equal(logits(reloaded), pruned)


def test_bad_expert_channel_plans_fail_on_load():
    from prunekit.errors import PlanError as E

    for bad, message in (({"expert_channels": [[0, 1], [0]]}, "different numbers of channels"),
                         ({"expert_channels": [[0], None]}, "kept-channel lists"),
                         ({"expert_channels": [[0]], "channels": [0]}, "both channels and expert_channels")):
        with pytest.raises(E, match=message):
            PruningPlan.from_json({"format": 1, "widths": {"0": bad}})


# LLM-Drop's own exact checks (test_drop.py), run on the MoE families: the MoE block is the MLP sub-layer.
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_llm_drop_contract_on_moe_families(family, tmp_path):
    import test_drop

    if family == "gpt_oss":  # o_proj has a bias there: a planted identity attention zeroes it too
        model = tiny_model(family)
        ad = get_adapter(model)
        with torch.no_grad():
            ad.attn_projections(ad.layers()[2])[3].weight.zero_()
            ad.attn_projections(ad.layers()[2])[3].bias.zero_()
        scores = SimilarityScorer(model, adapter=ad, calib=random_calib(), progress=False).score()
        assert scores.attn[2] == 1.0 and all(s < 1.0 for i, s in enumerate(scores.attn) if i != 2)
    else:
        test_drop.test_planted_identity_attention_scores_one_and_is_dropped_first(family)
    for target in ("attn", "mlp", "block"):
        test_drop.test_generate_with_cache_equals_no_cache_after_drop(family, target)
    test_drop.test_block_drop_saves_stock_config_and_shrinks_exactly(family, tmp_path / "block")
    test_drop.test_heterogeneous_checkpoint_round_trip(family, tmp_path / "het")


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_per_layer_expert_counts_load_without_prunekit(family, tmp_path):
    import textwrap

    from test_drop import run_without_prunekit

    model = tiny_model(family)
    apply_plan(get_adapter(model), PruningPlan(dropped=[DropTarget(2, "mlp")],
                                               widths={0: LayerWidth(experts=[1, 3]), 1: LayerWidth(experts=[0])}))
    ref = logits(model)
    save_checkpoint(model, None, tmp_path / "het")
    script = textwrap.dedent(f"""
        import importlib.util
        assert importlib.util.find_spec("prunekit") is None, "prunekit must not be importable here"
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'het')!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(m(torch.tensor({inputs().tolist()})).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    proc = run_without_prunekit(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_lora_adapts_attention_and_a_shared_expert_not_the_fused_experts(family):
    from prunekit.recovery import lora_targets

    model = tiny_model(family)
    names = dict(model.named_modules())
    targets = lora_targets(model)
    assert all(t in names for t in targets)
    mlp = [t for t in targets if ".mlp." in t]
    assert mlp == ([f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(4)
                    for p in ("gate_proj", "up_proj", "down_proj")] if family == "qwen2_moe" else [])


def test_expert_statistics_of_two_shards_add_up_to_the_whole():
    """What data-parallel runs rely on: every statistic is a sum over tokens, so shards' sums total exactly."""
    from prunekit.data import CalibrationData

    model = tiny_model("qwen2_moe")
    ad = get_adapter(model)
    calib = random_calib(pad_last=4)
    halves = [CalibrationData(calib.input_ids[s], calib.attention_mask[s], "half", "x")
              for s in (slice(0, 2), slice(2, None))]
    whole = collect_expert_stats(model, calib, adapter=ad, batch_size=2, progress=False).to_tensors()
    parts = [collect_expert_stats(model, h, adapter=ad, batch_size=2, progress=False).to_tensors() for h in halves]
    assert parts[0].keys() == parts[1].keys() == whole.keys()
    for k in whole:
        assert torch.allclose(parts[0][k] + parts[1][k], whole[k], rtol=1e-12, atol=1e-12), k


@torch.no_grad()
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_linear_map_folds_exactly_into_every_expert_and_the_shared_expert(family):
    """The MoE block's output times T equals the output of the block with T folded into its residual outputs
    (every expert's down tensor and bias, the shared expert's down projection): routing reads the block's
    input only, so the fold is exact."""
    from prunekit.engine.sources import as_source
    from prunekit.repair.linear import _write_fold

    model = tiny_model(family)  # float32: the fused expert kernels take no float64
    ad = get_adapter(model)
    mlp = ad.mlp(ad.layers()[1])
    h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    t = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(5))

    def block(x):
        return ad.mlp_output(mlp(x))

    want = block(h) @ t
    names = [n for n, _ in ad.residual_outputs(ad.layers()[1], "mlp")]
    before, scale = block(h), want.abs().max()
    assert any("experts" in n for n in names) and (family != "qwen2_moe" or any("shared" in n for n in names))
    _write_fold(as_source(model), 1, "mlp", t)
    # float32 rounding only: the map moves the output by over 10% of its scale, a fold along a wrong axis or
    # a missed expert or bias would leave an error of that order
    assert (before - want).abs().max() > 0.1 * scale
    assert (block(h) - want).abs().max() < 1e-5 * scale


@pytest.mark.usefixtures("isolated_cache")
def test_cli_attention_drop_with_linear_repair_on_a_moe_model_reloads(moe_checkpoint, tmp_path):
    """The carriers of dropped attention sub-layers are MoE blocks: the repair folds into their experts, keeps
    the structure, and the saved model reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    ck, text = moe_checkpoint
    out = tmp_path / "repaired"
    assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "2", "--repair", "linear", "--calib", str(text),
                 "--samples", "8", "--seq-len", "32", "--out", str(out)]) == 0
    plan = json.loads((out / "prunekit_plan.json").read_text())
    spans = plan["repair"]["spans"]
    assert spans and all(s["carrier"]["module"] in ("mlp", "attn") for s in spans)
    assert plan["repair"]["check_loss"] <= plan["repair"]["check_loss_unrepaired"]
    model, _ = load_model(out, tokenizer=False)
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(logits(plain), logits(model))
