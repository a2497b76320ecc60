"""GGUF export of Phi-3 (llama.cpp's `phi3` graph: fused qkv and gate_up, partial rotary, longrope) and SmolLM3
(its `smollm3` graph: every 4th layer without rope). Keys and tensors are read back exactly; refusals are one line
and leave no file; the llama.cpp comparisons run only where xllamacpp is installed (as the llama and Gemma 3
checks)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_export import (
    PLANS,
    _assert_top_logprobs_match,
    _read,
    _tensor,
    needs_xllamacpp,
    past_window_prompt,
    source_of,
)

from prunekit.export import ExportError, export_source
from prunekit.export.common import ExportSource
from prunekit.export.gguf import permute_qk
from prunekit.plans import DropTarget, LayerWidth, PruningPlan

# Phi-3 as Phi-4-mini is built: half of each head rotated, longrope factors. Run with a context (256) within
# the original one, so Hugging Face and llama.cpp both use the short factors; the attention factor (from the
# 1024 / 256 ratio) is not 1, so a missing one shows.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.5, 4.0, 9.0, 20.0]}


def phi3_source(plan: PruningPlan | None = None, *, longrope: bool = False) -> ExportSource:
    """Tiny Phi-3 with a sliding window of 64 (longer than every prompt here: llama.cpp's phi3 graph has none)."""
    from transformers import Phi3Config

    cfg = tiny_config("phi3")
    if longrope:
        cfg = Phi3Config(**{**cfg.to_dict(), "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
                            "rope_parameters": dict(LONGROPE)})
    cfg.sliding_window = 64
    return source_of(cfg, plan)


def smollm3_source(plan: PruningPlan | None = None) -> ExportSource:
    """Tiny SmolLM3 with 5 layers, layer 3 without rope: llama.cpp's every-4th rule, with a layer after it."""
    cfg = tiny_config("smollm3")
    cfg.num_hidden_layers = 5
    cfg.no_rope_layers = [1, 1, 1, 0, 1]
    cfg.layer_types = ["full_attention"] * 5
    return source_of(cfg, plan)


CHANNELS = PruningPlan(widths={i: LayerWidth(channels=list(range(0, 128, 2))) for i in range(4)})
PHI3_PLANS = {"dense": None, "mlp-width": CHANNELS, "block-drop": PLANS["block-drop"]}
SMOLLM3_PLANS = {
    "dense": None,
    "uniform-width": PruningPlan(widths={i: LayerWidth(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 128, 2)))
                                         for i in range(5)}),
    # Dropping the last layer keeps layer 3 the only one without rope, as llama.cpp's rule has it.
    "block-drop": PruningPlan(dropped=[DropTarget(4, "block")]),
}


def _export(src, tmp_path, name="m.gguf"):
    return export_source(src, tmp_path / name, format="gguf", quant="f32", progress=False)


# --- Phi-3: keys and tensors read back ----------------------------------------------------------------------

def test_gguf_phi3_writes_fused_tensors_as_they_are(tmp_path, caplog):
    src = phi3_source(CHANNELS)
    f, t = _read(_export(src, tmp_path))
    assert f["general.architecture"] == "phi3"
    assert (f["phi3.attention.head_count"], f["phi3.attention.head_count_kv"], f["phi3.feed_forward_length"]) == (4, 2, 64)
    assert f["phi3.rope.dimension_count"] == 16
    # as the converter writes it; llama.cpp's phi3 graph does not apply the window (64), and the export says so
    assert f["phi3.context_length"] == src.config.max_position_embeddings > 64
    warned = [r.getMessage() for r in caplog.records if "without its sliding window" in r.getMessage()]
    assert len(warned) == 1 and "past 64 tokens" in warned[0]
    a = src.adapter
    layer = a.layers()[1]
    (qkv,), (gate_up,) = a.input_projections(layer, "attn"), a.input_projections(layer, "mlp")
    # NEOX rope: no permutation; q, k, v rows and gate, up rows stay in Hugging Face's order.
    np.testing.assert_array_equal(_tensor(t["blk.1.attn_qkv.weight"]), qkv.weight.detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.1.ffn_up.weight"]), gate_up.weight.detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.1.ffn_down.weight"]),
                                  a.output_projection(layer, "mlp").weight.detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.1.attn_output.weight"]),
                                  a.output_projection(layer, "attn").weight.detach().numpy())
    assert _tensor(t["blk.1.ffn_up.weight"]).shape == (2 * 64, 64)
    assert not [n for n in t if "rope_factors" in n or n.startswith("blk.1.attn_q.")]


def test_gguf_phi3_longrope_writes_both_factor_sets_and_the_attention_factor(tmp_path):
    src = phi3_source(longrope=True)
    f, t = _read(_export(src, tmp_path))
    assert f["phi3.rope.dimension_count"] == 8  # head_dim 16 * partial_rotary_factor 0.5
    assert f["phi3.context_length"] == 1024
    assert f["phi3.rope.scaling.original_context_length"] == 256
    scale = float(src.model.model.rotary_emb.attention_scaling)
    assert scale > 1.1 and f["phi3.rope.scaling.attn_factor"] == pytest.approx(scale)
    np.testing.assert_array_equal(_tensor(t["rope_factors_short.weight"]), np.float32(LONGROPE["short_factor"]))
    np.testing.assert_array_equal(_tensor(t["rope_factors_long.weight"]), np.float32(LONGROPE["long_factor"]))


# --- SmolLM3: keys and tensors read back ----------------------------------------------------------------------

def test_gguf_smollm3_is_llama_tensors_with_qk_permuted(tmp_path):
    src = smollm3_source(SMOLLM3_PLANS["uniform-width"])
    f, t = _read(_export(src, tmp_path))
    assert f["general.architecture"] == "smollm3"
    assert f["smollm3.block_count"] == 5
    assert (f["smollm3.attention.head_count"], f["smollm3.attention.head_count_kv"]) == (2, 2)
    assert f["smollm3.attention.key_length"] == 16 and f["smollm3.feed_forward_length"] == 64
    q, k, v, _ = src.adapter.attn_projections(src.adapter.layers()[3])
    np.testing.assert_array_equal(_tensor(t["blk.3.attn_q.weight"]), permute_qk(q.weight, 2).detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.3.attn_k.weight"]), permute_qk(k.weight, 2).detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.3.attn_v.weight"]), v.weight.detach().numpy())


def test_gguf_smollm3_block_drop_that_keeps_the_rule_is_written(tmp_path):
    src = smollm3_source(SMOLLM3_PLANS["block-drop"])
    assert list(src.config.no_rope_layers) == [1, 1, 1, 0]
    f, _ = _read(_export(src, tmp_path))
    assert f["smollm3.block_count"] == 4


# --- refusals ---------------------------------------------------------------------------------------------------

def _gelu(src):
    src.config.hidden_act = "gelu_pytorch_tanh"


def _o_bias(src):
    o = src.adapter.output_projection(src.adapter.layers()[0], "attn")
    o.bias = torch.nn.Parameter(torch.zeros(o.out_features))


def _llama3_rope(src):
    src.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 2e6, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


def _sliding(src):
    src.config.use_sliding_window, src.config.sliding_window = True, 8
    src.config.layer_types = ["full_attention"] * 3 + ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("make,plan,edit,message", [
    (partial(phi3_source, longrope=True), PLANS["uniform-width"], None,
     r"fewer query heads or per-layer shapes.*\(8 of 16 rotated, rope 'longrope'\)"),
    (partial(phi3_source, longrope=True), PLANS["mlp-drop"], None, "fewer query heads or per-layer shapes"),
    (phi3_source, None, _gelu, "activation 'gelu_pytorch_tanh'"),
    (phi3_source, None, _o_bias, "projection biases"),
    (smollm3_source, PruningPlan(dropped=[DropTarget(0, "block")]), None, r"\(1101, 1 = rope\) no longer follow"),
    (smollm3_source, PLANS["attn-drop"], None, "heterogeneous smollm3.*ropes every layer"),
    (smollm3_source, None, _sliding, "sliding-window layers"),
    (smollm3_source, None, _llama3_rope, "llama3 rope scaling"),
])
def test_gguf_phi3_and_smollm3_refuse_what_the_graph_cannot_compute(tmp_path, make, plan, edit, message):
    src = make(plan)
    if edit is not None:
        edit(src)
    with pytest.raises(ExportError, match=message) as e:
        export_source(src, tmp_path / "m.gguf", format="gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


# --- llama.cpp against transformers -----------------------------------------------------------------------------

def _prompt(src) -> list[int]:
    return past_window_prompt(src)


@needs_xllamacpp
@pytest.mark.parametrize("name", list(PHI3_PLANS))
def test_llamacpp_phi3_logprobs_match_transformers_tiny(tmp_path, name):
    src = phi3_source(PHI3_PLANS[name])
    _assert_top_logprobs_match(src, _export(src, tmp_path), _prompt(src), 2e-3, name)


# Phi-3 results the phi3 graph cannot load, written for the Llama graphs with the fused projections split.
PHI3_AS_LLAMA = {"uniform-width": ("llama", PLANS["uniform-width"]), "per-layer-width": ("deci", PLANS["per-layer-width"]),
                 "attn-drop": ("deci", PLANS["attn-drop"])}


@pytest.mark.parametrize("name", list(PHI3_AS_LLAMA))
def test_gguf_phi3_with_fewer_heads_or_per_layer_shapes_goes_to_the_llama_graphs_split(tmp_path, name):
    arch, plan = PHI3_AS_LLAMA[name]
    src = phi3_source(plan)
    f, t = _read(_export(src, tmp_path))
    assert f["general.architecture"] == arch
    a = src.adapter
    layer = a.layers()[0]
    (qkv,), (gate_up,) = a.input_projections(layer, "attn"), a.input_projections(layer, "mlp")
    heads, kv = a.attention_shape(layer)
    q, k, v = qkv.weight.detach().split([heads * 16, kv * 16, kv * 16])
    width = a.mlp_width(layer)
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_q.weight"]), permute_qk(q, heads).numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_k.weight"]), permute_qk(k, kv).numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_v.weight"]), v.numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.ffn_gate.weight"]), gate_up.weight.detach()[:width].numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.ffn_up.weight"]), gate_up.weight.detach()[width:].numpy())


@needs_xllamacpp
@pytest.mark.parametrize("name", list(PHI3_AS_LLAMA))
def test_llamacpp_phi3_as_llama_logprobs_match_transformers_tiny(tmp_path, name):
    src = phi3_source(PHI3_AS_LLAMA[name][1])
    _assert_top_logprobs_match(src, _export(src, tmp_path), _prompt(src), 2e-3, name)


@needs_xllamacpp
@pytest.mark.parametrize("name", ["dense", "mlp-width"])
def test_llamacpp_phi3_longrope_partial_rotary_logprobs_match_transformers_tiny(tmp_path, name):
    src = phi3_source(PHI3_PLANS[name], longrope=True)
    _assert_top_logprobs_match(src, _export(src, tmp_path), _prompt(src), 2e-3, f"longrope {name}")


@needs_xllamacpp
@pytest.mark.parametrize("name", list(SMOLLM3_PLANS))
def test_llamacpp_smollm3_logprobs_match_transformers_tiny(tmp_path, name):
    src = smollm3_source(SMOLLM3_PLANS[name])
    _assert_top_logprobs_match(src, _export(src, tmp_path), _prompt(src), 2e-3, name)
