"""GGUF export of uniform Mixture-of-Experts results: the keys and expert tensors read back, the refusals, and
(slow, needs xllamacpp) llama.cpp's top-5 log-probs against transformers on tiny models of each family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_moe_config
from test_export import _assert_top_logprobs_match, _read, _tensor, bpe_tokenizer, needs_xllamacpp

from prunekit.adapters import get_adapter
from prunekit.errors import ExportError
from prunekit.export import export_source
from prunekit.export.common import ExportSource, layer_shapes
from prunekit.export.gguf_moe import MOE_ARCHS
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan

GGUF_FAMILIES = list(MOE_ARCHS)  # gpt-oss has its own writer and checks: tests/test_export_gpt_oss.py
DROP_ONE = PruningPlan(widths={i: LayerWidth(experts=[0, 2, 3]) for i in range(4)})
SLIM = PruningPlan(widths={i: LayerWidth(expert_channels=[list(range(e, 128, 2))[:64] for e in range(2)] * 2,
                                         shared_channels=list(range(0, 96, 2)))
                           for i in range(4)})
PLANS = {"dense": None, "expert-drop": DROP_ONE, "expert-slim": SLIM,
         "both": PruningPlan(widths={i: LayerWidth(experts=[1, 3], channels=list(range(64))) for i in range(4)})}


def moe_source(family: str, plan: PruningPlan | None = None, *, renormalise: bool | None = None,
               **overrides) -> ExportSource:
    """A tiny MoE model of `family` with the BPE tokenizer, routing normalised as llama.cpp's graph does unless
    `renormalise` says otherwise (Mixtral and gpt-oss have no choice); `overrides` are config fields."""
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    if family not in ("mixtral", "gpt_oss"):
        overrides["norm_topk_prob"] = MOE_ARCHS[family][1] if renormalise is None else renormalise
    cfg = tiny_moe_config(family, vocab_size=len(tok), **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ad = get_adapter(model)
    if plan is not None:
        if ad.moe.shared_expert is None:  # the plans name Qwen2-MoE's shared expert too
            plan = PruningPlan(dropped=plan.dropped, widths={
                i: LayerWidth(**{k: v for k, v in vars(w).items() if k != "shared_channels"})
                for i, w in plan.widths.items()})
        apply_plan(ad, plan)
    return ExportSource(model, tok, ad, layer_shapes(ad))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
@pytest.mark.parametrize("name", list(PLANS))
def test_gguf_of_a_uniform_moe_result_holds_its_experts(family, name, tmp_path):
    src = moe_source(family, PLANS[name])
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant="f32", progress=False)
    fields, tensors = _read(out)
    arch = MOE_ARCHS[family][0]
    ad = src.adapter
    layer = ad.layers()[1]
    experts, width = ad.num_experts(layer), ad.expert_width(layer)
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == experts and fields[f"{arch}.expert_used_count"] == ad.top_k(layer)
    assert fields[f"{arch}.feed_forward_length"] == width
    gate_up, down = ad.expert_tensors(layer)
    for key, want in (("ffn_gate_inp", ad.router(layer).weight), ("ffn_gate_exps", gate_up[:, :width]),
                      ("ffn_up_exps", gate_up[:, width:]), ("ffn_down_exps", down)):
        np.testing.assert_array_equal(_tensor(tensors[f"blk.1.{key}.weight"]), want.detach().numpy())
    if family == "qwen2_moe":
        gate, up, down_s = ad.shared_projections(layer)
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == up.out_features
        assert fields["qwen2moe.expert_feed_forward_length"] == width
        np.testing.assert_array_equal(_tensor(tensors["blk.1.ffn_down_shexp.weight"]), down_s.weight.detach().numpy())
        np.testing.assert_array_equal(_tensor(tensors["blk.1.ffn_gate_inp_shexp.weight"]),
                                      ad.shared_gate(layer).weight.detach().numpy().reshape(-1))
    if family in ("qwen2_moe", "olmoe"):
        assert "output.weight" in tensors  # their graphs do not fall back to the embedding
    _assert_attention_as_written(src, fields, tensors, arch)


def _assert_attention_as_written(src, fields, tensors, arch):
    """Mixtral goes to `llama`, whose rope rotates adjacent pairs: each head's Q/K rows are interleaved from
    the two halves transformers rotates together. `olmoe` is multi-head only: query head h reads a copy of KV
    head h // group, k-norm weights with it. The other graphs take the rows as they are."""
    ad = src.adapter
    layer = ad.layers()[1]
    q, k, v, _ = (lin.weight.detach().numpy() for lin in ad.attn_projections(layer))
    n_head, n_kv, hd = fields[f"{arch}.attention.head_count"], ad.config.num_key_value_heads, src.head_dim
    got = {key: _tensor(tensors[f"blk.1.{key}.weight"]) for key in ("attn_q", "attn_k", "attn_v")}
    if arch == "llama":
        pairs = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).reshape(-1)
        for key, w, heads in (("attn_q", q, n_head), ("attn_k", k, n_kv)):
            want = np.concatenate([w[h * hd:(h + 1) * hd][pairs] for h in range(heads)])
            np.testing.assert_array_equal(got[key], want)
        return
    np.testing.assert_array_equal(got["attn_q"], q)
    if arch != "olmoe":
        assert fields[f"{arch}.attention.head_count_kv"] == n_kv
        np.testing.assert_array_equal(got["attn_k"], k)
        return
    assert fields["olmoe.attention.head_count_kv"] == n_head
    kn = ad.qk_norms(layer)[1].weight.detach().numpy()
    copy = [h // (n_head // n_kv) for h in range(n_head)]
    for key, w in (("attn_k", k), ("attn_v", v)):
        np.testing.assert_array_equal(got[key], np.concatenate([w[j * hd:(j + 1) * hd] for j in copy]))
    np.testing.assert_array_equal(_tensor(tensors["blk.1.attn_k_norm.weight"]),
                                  np.concatenate([kn[j * hd:(j + 1) * hd] for j in copy]))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_refuses_what_the_moe_graphs_cannot_express(family, tmp_path):
    per_layer = PruningPlan(widths={0: LayerWidth(experts=[0, 1, 2])})
    for plan, message in ((per_layer, "whose layers differ"),
                          (PruningPlan(dropped=[DropTarget(1, "mlp")]), "needs both in every layer")):
        with pytest.raises(ExportError, match=message):
            export_source(moe_source(family, plan), tmp_path / "x.gguf", format="gguf", quant="f32", progress=False)
    if family != "mixtral":  # Mixtral always renormalises, as llama.cpp's llama graph does
        with pytest.raises(ExportError, match="norm_topk_prob"):
            export_source(moe_source(family, renormalise=not MOE_ARCHS[family][1]), tmp_path / "y.gguf",
                          format="gguf", quant="f32", progress=False)
    windowed = moe_source(family)
    windowed.model.config.sliding_window, windowed.model.config.use_sliding_window = 8, True
    with pytest.raises(ExportError, match="sliding window of 8"):
        export_source(windowed, tmp_path / "w.gguf", format="gguf", quant="f32", progress=False)
    assert not any(tmp_path.iterdir())


def test_gguf_refuses_olmoe_with_clipped_qkv(tmp_path):
    clipped = moe_source("olmoe")
    clipped.model.config.clip_qkv = 8.0
    with pytest.raises(ExportError, match="clip_qkv"):
        export_source(clipped, tmp_path / "y.gguf", format="gguf", quant="f32", progress=False)  # not in its graph
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@needs_xllamacpp
@pytest.mark.parametrize("family", GGUF_FAMILIES)
@pytest.mark.parametrize("name", list(PLANS))
def test_llamacpp_moe_logprobs_match_transformers_tiny(tmp_path, family, name):
    src = moe_source(family, PLANS[name])
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant="f32", progress=False)
    prompt = src.tokenizer(SAMPLE_TEXT[:80])["input_ids"]
    _assert_top_logprobs_match(src, out, prompt, 2e-3, f"{family}/{name}")

