"""LLM-Drop: exact checks of scoring, plans, surgery, the KV cache and saving, on tiny in-process models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, random_calib, tiny_model

from prunekit.adapters import get_adapter
from prunekit.data import CalibrationData
from prunekit.drop import llm_drop
from prunekit.drop.scorer import SimilarityScorer
from prunekit.errors import CheckpointError, PlanError, UnsupportedArchitectureError
from prunekit.evaluation.perplexity import kv_bytes_per_token
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.io.files import tensor_bytes, weight_bytes
from prunekit.plans import DropTarget, PruningPlan
from prunekit.surgery import apply_plan, count_parameters


def calib(n: int = 6, t: int = 24, seed: int = 1, pad_last: int = 0) -> CalibrationData:
    return random_calib(n=n, t=t, seed=seed, pad_last=pad_last)


def inputs(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def plant_identity_attention(model, layer: int) -> None:
    ad = get_adapter(model)
    with torch.no_grad():
        ad.output_projection(ad.layers()[layer], "attn").weight.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_identity_attention_scores_one_and_is_dropped_first(family):
    model = tiny_model(family)
    plant_identity_attention(model, 2)
    if family == "qwen2":  # o_proj has no bias in Qwen2, but check that nothing else feeds the residual
        assert get_adapter(model).output_projection(get_adapter(model).layers()[2], "attn").bias is None
    ad = get_adapter(model)
    scores = SimilarityScorer(model, adapter=ad, calib=calib(), progress=False).score()
    assert scores.attn[2] == 1.0
    assert all(s < 1.0 for i, s in enumerate(scores.attn) if i != 2)
    x = inputs()
    ref = model(x).logits
    plan = llm_drop(model, ad, calib(), target="attn", n=1, progress=False)
    assert plan.dropped == [DropTarget(2, "attn")]
    apply_plan(ad, plan)
    assert torch.equal(model(x).logits, ref)


def test_scores_match_manual_hidden_states_and_exclude_padding():
    model = tiny_model("llama")
    ad = get_adapter(model)
    data = calib(pad_last=7)
    scores = SimilarityScorer(model, adapter=ad, calib=data, batch_size=4, progress=False).score()
    # Reference: output_hidden_states gives every layer's input; cos over real tokens only.
    with torch.no_grad():
        hs = model.model(input_ids=data.input_ids, attention_mask=data.attention_mask,
                         output_hidden_states=True).hidden_states
    m = data.attention_mask.bool()
    for i in range(ad.num_layers):
        h_in = hs[i][m].double()
        # the last entry of hidden_states has the final norm applied; compute the raw last output instead
        h_out = hs[i + 1][m].double() if i + 1 < ad.num_layers else None
        if h_out is not None:
            ref = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean().item()
            assert scores.block[i] == pytest.approx(ref, abs=1e-6)  # float32 dots, float64 sums
    assert scores.tokens == int(m.sum())
    # pairwise diagonal neighbours equal the block scores (same quantity, two computations)
    for i in range(ad.num_layers):
        assert scores.pairwise[i][i + 1] == pytest.approx(scores.block[i], abs=1e-5)


def test_scores_independent_of_batch_size():
    model = tiny_model("qwen3")
    ad = get_adapter(model)
    a = SimilarityScorer(model, adapter=ad, calib=calib(), batch_size=1, progress=False).score()
    b = SimilarityScorer(model, adapter=ad, calib=calib(), batch_size=4, progress=False).score()
    for x, y in ((a.attn, b.attn), (a.mlp, b.mlp), (a.block, b.block)):
        assert x == pytest.approx(y, abs=1e-12)


def test_iterative_rescore_reruns_only_later_layers_and_equals_full_rescore():
    model = tiny_model("llama")
    ad = get_adapter(model)
    scorer = SimilarityScorer(model, adapter=ad, calib=calib(), progress=False)
    scorer.score()
    from prunekit.surgery import mark_drops

    mark_drops(ad, [DropTarget(2, "attn")])
    calls = {i: 0 for i in range(ad.num_layers)}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(ad.layers())]
    partial = scorer.score(start_layer=2)
    for h in hooks:
        h.remove()
    n_batches = len(scorer.runner.batches)
    assert calls == {0: 0, 1: 0, 2: n_batches, 3: n_batches}  # earlier layers are not re-run
    full = SimilarityScorer(model, adapter=ad, calib=calib(), progress=False).score()
    assert partial.attn == pytest.approx(full.attn, abs=1e-12)
    assert partial.mlp == pytest.approx(full.mlp, abs=1e-12)
    assert partial.attn[2] == 1.0


def test_iterative_drop_plan():
    model = tiny_model("llama")
    ad = get_adapter(model)
    plan = llm_drop(model, ad, calib(), target="joint", n=3, iterative=True, progress=False)
    assert len(plan.history) == 3
    picked = {(h["layer"], h["module"]) for h in plan.history}
    assert len(picked) == 3


def test_plan_json_round_trip(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    plan = llm_drop(model, ad, calib(), target="block", n=2, consecutive=True, progress=False)
    plan.save(tmp_path / "p.json")
    again = PruningPlan.load(tmp_path / "p.json")
    assert again.to_json() == plan.to_json()
    layers = [d.layer for d in plan.dropped]
    assert layers == list(range(layers[0], layers[0] + 2))
    assert plan.calibration["sha256"] == calib().sha256


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_no_cache_after_drop(family, target):
    model = tiny_model(family)
    ad = get_adapter(model)
    # Drop layer 0's module so that the cache's default layer (0) is one without attention.
    drops = [DropTarget(0, target), DropTarget(2, target)]
    apply_plan(ad, PruningPlan(dropped=drops))
    x = inputs()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(x, use_cache=True, **kw)
    no_cache = model.generate(x, use_cache=False, **kw)
    assert torch.equal(with_cache, no_cache)
    # the no-cache forward over the full sequence gives the same next tokens
    logits = model(with_cache, use_cache=False).logits
    assert torch.equal(logits[:, x.shape[1] - 1:-1].argmax(-1), with_cache[:, x.shape[1]:])
    if target == "attn":
        out = model(x, use_cache=True)
        held = [c for c in out.past_key_values.layers if getattr(c, "keys", None) is not None]
        assert len(held) == ad.num_layers - 2
        assert sum(c.keys.nbytes + c.values.nbytes for c in held) == kv_bytes_per_token(ad) * x.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_block_drop_saves_stock_config_and_shrinks_exactly(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    save_checkpoint(model, None, tmp_path / "dense")
    before = count_parameters(model)
    ad = get_adapter(model)
    per_layer = sum(p.numel() for p in ad.layers()[1].parameters())
    apply_plan(ad, PruningPlan(dropped=[DropTarget(1, "block")]))
    x = inputs()
    ref = model(x).logits
    assert count_parameters(model) == before - per_layer
    save_checkpoint(model, None, tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and "auto_map" not in cfg and "prunekit" not in cfg
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 3
    assert tensor_bytes(tmp_path / "dense") - tensor_bytes(tmp_path / "pruned") == per_layer * 4
    assert weight_bytes(tmp_path / "pruned") < weight_bytes(tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(reloaded(x).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_heterogeneous_checkpoint_round_trip(family, tmp_path):
    model = tiny_model(family)
    ad = get_adapter(model)
    before = count_parameters(model)
    layers = ad.layers()
    removed = sum(p.numel() for p in ad.attn(layers[1]).parameters())
    removed += sum(p.numel() for n in ad.spec.attn_norms for p in getattr(layers[1], n).parameters())
    removed += sum(p.numel() for p in ad.mlp(layers[3]).parameters())
    removed += sum(p.numel() for n in ad.spec.mlp_norms for p in getattr(layers[3], n).parameters())
    save_checkpoint(model, None, tmp_path / "dense")
    apply_plan(ad, PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(3, "mlp")]))
    assert count_parameters(model) == before - removed
    x = inputs()
    ref = model(x).logits
    save_checkpoint(model, None, tmp_path / "het")
    assert tensor_bytes(tmp_path / "dense") - tensor_bytes(tmp_path / "het") == removed * 4
    reloaded, _ = load_model(tmp_path / "het", tokenizer=False)
    assert torch.equal(reloaded(x).logits, ref)


def test_heterogeneous_checkpoint_loads_without_prunekit(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    apply_plan(ad, PruningPlan(dropped=[DropTarget(0, "attn"), DropTarget(2, "mlp")]))
    x = inputs()
    ref = model(x).logits
    save_checkpoint(model, None, tmp_path / "het")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("prunekit") is None, "prunekit must not be importable here"
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'het')!r}, trust_remote_code=True).eval()
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            torch.save(m(x).logits, {str(tmp_path / 'logits.pt')!r})
            g1 = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
            g2 = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(g1, g2)
    """)
    proc = run_without_prunekit(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)


def run_without_prunekit(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """`script` in a clean interpreter where prunekit cannot be imported: no PYTHONPATH, no `src/` on sys.path,
    and without the editable install's finder and path hook (-S would drop site-packages too, so they are
    filtered out instead)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    prelude = ("import sys\n"
               "sys.path = [p for p in sys.path if not p.endswith('/src')]\n"
               "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower() "
               "and 'prunekit' not in repr(f).lower()]\n"
               "sys.path_hooks = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
               "sys.path_importer_cache.clear()\n")
    return subprocess.run([sys.executable, "-I", "-c", prelude + script], capture_output=True, text=True, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def test_bad_inputs(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    with pytest.raises(PlanError, match="at most 3"):
        llm_drop(model, ad, calib(), target="attn", n=4, progress=False)
    with pytest.raises(PlanError):
        llm_drop(model, ad, calib(), target="joint", n=8, progress=False)
    with pytest.raises(PlanError):
        llm_drop(model, ad, calib(), target="mlp", n=0, progress=False)
    with pytest.raises(PlanError, match="consecutive"):
        llm_drop(model, ad, calib(), target="attn", n=1, consecutive=True, progress=False)
    model.config.model_type = "not-a-model"
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        get_adapter(model)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(tmp_path, tokenizer=False)


def test_corrupt_weights_and_existing_output(tmp_path):
    model = tiny_model("llama")
    save_checkpoint(model, None, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="exists"):
        save_checkpoint(model, None, tmp_path / "ck")
    st = tmp_path / "ck" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "ck", tokenizer=False)
    # no temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
