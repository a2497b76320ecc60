"""GGUF export of Gemma 2 (llama.cpp's `gemma2` graph: 1 + w norms, soft-capping, a period of sliding layers)
and OLMo 2 (`olmo2`: post-norms, full-width q/k norms, query heads never narrowed): keys and tensors read
back, one-line refusals, and llama.cpp's log-probs against transformers where xllamacpp is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_config
from test_export import (
    GEMMA_PLANS,
    PLANS,
    _assert_top_logprobs_match,
    _read,
    _tensor,
    bpe_tokenizer,
    needs_xllamacpp,
    past_window_prompt,
    tiny_gemma_source,
    tiny_source,
)

from prunekit.adapters import get_adapter
from prunekit.export import ExportError, export_source
from prunekit.export.common import ExportSource, layer_shapes
from prunekit.plans import DropTarget, LayerWidth, PruningPlan

# Caps small enough to bend the tiny model's logits (at Gemma 2's own 50 and 30 they are nearly linear there,
# so a graph that skipped a cap would still pass): they move its log-probs by 0.09 and 0.28.
ATTN_CAP, FINAL_CAP = 0.5, 2.0


def gemma2_source(plan: PruningPlan | None = None) -> ExportSource:
    src = tiny_gemma_source(plan, family="gemma2")
    src.config.attn_logit_softcapping, src.config.final_logit_softcapping = ATTN_CAP, FINAL_CAP
    for layer in src.adapter.layers():
        layer.self_attn.attn_logit_softcapping = ATTN_CAP  # read at call time, copied from the config at build
    return src


def _export(src: ExportSource, path) -> tuple[dict, dict]:
    return _read(export_source(src, path, format="gguf", quant="f32", progress=False))


def _refused(src: ExportSource, tmp_path, message: str) -> None:
    with pytest.raises(ExportError, match=message) as e:
        export_source(src, tmp_path / "m.gguf", format="gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# --- Gemma 2 ---------------------------------------------------------------------------------------------------

def test_gguf_gemma2_keys_norms_and_tensors(tmp_path):
    src = gemma2_source()
    f, t = _export(src, tmp_path / "g.gguf")
    assert f["general.architecture"] == "gemma2"
    assert (f["gemma2.block_count"], f["gemma2.attention.head_count"], f["gemma2.attention.head_count_kv"]) == (4, 4, 2)
    assert f["gemma2.attention.key_length"] == f["gemma2.attention.value_length"] == 16
    assert f["gemma2.attention.sliding_window"] == 8
    assert f["gemma2.attention.sliding_window_pattern"] == 2  # sliding, full, sliding, full
    assert f["gemma2.attn_logit_softcapping"] == ATTN_CAP and f["gemma2.final_logit_softcapping"] == FINAL_CAP
    assert f["gemma2.rope.freq_base"] == src.config.rope_parameters["rope_theta"]
    assert "gemma2.rope.freq_base_swa" not in f  # one rope for every layer, as transformers' Gemma 2
    layer = src.adapter.layers()[1]
    # llama.cpp multiplies by the stored norm weight; Hugging Face's Gemma norm by (1 + w).
    for name, module in (("attn_norm", layer.input_layernorm), ("post_attention_norm", layer.post_attention_layernorm),
                         ("ffn_norm", layer.pre_feedforward_layernorm),
                         ("post_ffw_norm", layer.post_feedforward_layernorm)):
        np.testing.assert_array_equal(_tensor(t[f"blk.1.{name}.weight"]), _np(module.weight) + 1)
    np.testing.assert_array_equal(_tensor(t["output_norm.weight"]), _np(src.adapter.final_norm().weight) + 1)
    # NEOX rope: Q/K unpermuted; the embedding unscaled (the graph multiplies by sqrt(hidden)); no q/k norms.
    for name, lin in zip(("attn_q", "attn_k", "attn_v", "attn_output"), src.adapter.attn_projections(layer)):
        np.testing.assert_array_equal(_tensor(t[f"blk.1.{name}.weight"]), _np(lin.weight))
    np.testing.assert_array_equal(_tensor(t["token_embd.weight"]), _np(src.adapter.embed().weight))
    assert not [n for n in t if "q_norm" in n or "k_norm" in n]
    assert "output.weight" not in t  # tied: the graph reads token_embd


def test_gguf_gemma2_uniform_width_and_periodic_block_drop(tmp_path):
    f, t = _export(gemma2_source(GEMMA_PLANS["uniform-width"]), tmp_path / "w.gguf")
    assert (f["gemma2.attention.head_count"], f["gemma2.attention.head_count_kv"]) == (2, 2)
    assert f["gemma2.feed_forward_length"] == 64
    assert _tensor(t["blk.0.attn_q.weight"]).shape == (2 * 16, 64)
    assert _tensor(t["blk.0.attn_output.weight"]).shape == (64, 2 * 16)
    f, _ = _export(gemma2_source(GEMMA_PLANS["block-drop-periodic"]), tmp_path / "b.gguf")
    assert f["gemma2.block_count"] == 3 and f["gemma2.attention.sliding_window_pattern"] == 3


def test_gguf_gemma2_refuses_what_the_graph_computes_differently(tmp_path):
    _refused(gemma2_source(PLANS["attn-drop"]), tmp_path, "^a heterogeneous Gemma 2 result cannot be written")
    # Block 2 dropped: sliding, full, full follows no period.
    _refused(gemma2_source(PruningPlan(dropped=[DropTarget(2, "block")])), tmp_path, "one period.*SFF")
    src = gemma2_source()
    src.config.final_logit_softcapping = None
    src.config.query_pre_attn_scalar = 256
    src.model.lm_head.weight = torch.nn.Parameter(src.model.lm_head.weight.detach().clone())
    _refused(src, tmp_path, "gemma2 graph: final_logit_softcapping unset .*; an output matrix apart from the "
                            r"embedding .*; attention scale 0.0625 \(llama.cpp uses 0.25")


@needs_xllamacpp
@pytest.mark.parametrize("name", list(GEMMA_PLANS))
def test_llamacpp_gemma2_logprobs_match_transformers_tiny(tmp_path, name):
    """48 prompt tokens: past the sliding window (8), so the window and the pattern count."""
    src = gemma2_source(GEMMA_PLANS[name])
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f32", progress=False)
    prompt = past_window_prompt(src)
    _assert_top_logprobs_match(src, out, prompt, 2e-3, name)


# --- OLMo 2 ----------------------------------------------------------------------------------------------------

OLMO2_PLANS: dict[str, PruningPlan | None] = {
    "dense": None,
    # Channels only: llama.cpp's olmo2 graph sizes the q projection by the hidden size, so heads stay.
    "uniform-width": PruningPlan(widths={i: LayerWidth(channels=list(range(0, 128, 2))) for i in range(4)}),
    "block-drop": PLANS["block-drop"],
}


def test_gguf_olmo2_keys_norms_and_tensors(tmp_path):
    src = tiny_source("olmo2")
    f, t = _export(src, tmp_path / "o.gguf")
    cfg = src.config
    assert f["general.architecture"] == "olmo2"
    assert (f["olmo2.block_count"], f["olmo2.attention.head_count"], f["olmo2.attention.head_count_kv"]) == (4, 4, 2)
    assert f["olmo2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert not [k for k in f if "sliding_window" in k]
    layer = src.adapter.layers()[2]
    attn = layer.self_attn
    # Norms as stored (Olmo2RMSNorm multiplies by w); q/k norms span the whole projection; NEOX rope: no permutation.
    for name, tensor in (("post_attention_norm", layer.post_attention_layernorm.weight),
                         ("post_ffw_norm", layer.post_feedforward_layernorm.weight),
                         ("attn_q_norm", attn.q_norm.weight), ("attn_k_norm", attn.k_norm.weight),
                         ("attn_q", attn.q_proj.weight), ("attn_k", attn.k_proj.weight),
                         ("attn_v", attn.v_proj.weight), ("attn_output", attn.o_proj.weight),
                         ("ffn_gate", layer.mlp.gate_proj.weight), ("ffn_down", layer.mlp.down_proj.weight)):
        np.testing.assert_array_equal(_tensor(t[f"blk.2.{name}.weight"]), _np(tensor))
    assert _tensor(t["blk.2.attn_q_norm.weight"]).shape == (64,) and _tensor(t["blk.2.attn_k_norm.weight"]).shape == (32,)
    assert not [n for n in t if n.endswith(("attn_norm.weight", "ffn_norm.weight")) and n.startswith("blk.")]
    np.testing.assert_array_equal(_tensor(t["output.weight"]), _np(src.adapter.lm_head().weight))
    np.testing.assert_array_equal(_tensor(t["output_norm.weight"]), _np(src.adapter.final_norm().weight))


def _olmo2_with(**overrides) -> ExportSource:
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    cfg = tiny_config("olmo2")
    cfg.vocab_size = len(tok)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    adapter = get_adapter(model)
    return ExportSource(model, tok, adapter, layer_shapes(adapter))


def test_gguf_olmo2_tied_writes_the_embedding_as_output(tmp_path):
    src = _olmo2_with(tie_word_embeddings=True)
    assert src.tied
    _, t = _export(src, tmp_path / "o.gguf")
    np.testing.assert_array_equal(_tensor(t["output.weight"]), _np(src.adapter.embed().weight))


def test_gguf_olmo2_refuses_what_the_graph_computes_differently(tmp_path):
    _refused(tiny_source("olmo2", PLANS["attn-drop"]), tmp_path, "^a heterogeneous OLMo 2 result cannot be written")
    _refused(tiny_source("olmo2", PLANS["uniform-width"]), tmp_path,
             "olmo2 graph: 2 query heads of 16 .*hidden size, 64")
    src = _olmo2_with(attention_bias=True)
    src.config.clip_qkv = 8.0
    _refused(src, tmp_path, r"clip_qkv=8.0 .*; attention biases \(the graph has none\)$")


@needs_xllamacpp
@pytest.mark.parametrize("name", list(OLMO2_PLANS))
def test_llamacpp_olmo2_logprobs_match_transformers_tiny(tmp_path, name):
    src = tiny_source("olmo2", OLMO2_PLANS[name])
    out = export_source(src, tmp_path / "o.gguf", format="gguf", quant="f32", progress=False)
    prompt = src.tokenizer(SAMPLE_TEXT[:80])["input_ids"]
    _assert_top_logprobs_match(src, out, prompt, 2e-3, name)
